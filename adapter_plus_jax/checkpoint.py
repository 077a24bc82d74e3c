"""Training checkpoints with Orbax: trainable params, optimizer state, step, config, data position.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; `restore_latest` ignores unfinished ones.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores {'state': pytree, 'meta': json dict} under WORKDIR/checkpoints."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(directory, options=options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save synchronously (the state is small: adapters, head and their optimizer state)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the state into the structure, shapes and shardings of `abstract_state`."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()
