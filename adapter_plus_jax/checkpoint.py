"""Training checkpoints with Orbax: trainable params, optimizer state, step, config, data position.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (and the next run deletes the unfinished one).
Each checkpoint also records a digest of its arrays: a checkpoint whose files were damaged
afterwards (a half-copied directory, files deleted or zeroed by a full disk or a sync tool)
fails to restore or to match its digest, and `find_good` falls back to the newest one that
restores, moving the damaged ones to WORKDIR/damaged_checkpoints. Ctrl-C during a save takes
effect once the save has finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from adapter_plus_jax.errors import SetupError

CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory being written


class CheckpointError(SetupError):
    """A checkpoint could not be written (the previous one is kept)."""


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block is delivered to the handler it replaced when the block
    ends. A KeyboardInterrupt raised inside Orbax's save left the step unwritten, losing the
    epoch just trained (tests/test_multiprocess.py sends one as the first save begins). Only
    the main thread can do this; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _: pressed.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            signal.raise_signal(signal.SIGINT)


def digest(state: Any) -> str:
    """A hash of the arrays of `state`, independent of the containers that hold them (a
    restore without a target gives dicts where the saved tree had dataclasses)."""
    parts = sorted(_leaf_hash(leaf) for leaf in jax.tree.leaves(state))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _leaf_hash(leaf: Any) -> str:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)  # replicated: every process holds the whole array
    a = np.ascontiguousarray(np.asarray(leaf))
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


class Checkpointer:
    """Saves and restores {'state': pytree, 'meta': json dict} under WORKDIR/checkpoints.

    `read_only` (for readers such as export, which may run beside the training run): nothing
    is created, removed or moved, and damaged checkpoints are only skipped."""

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 2, read_only: bool = False):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS_DIR
        self.read_only = read_only
        if jax.process_index() == 0 and self.directory.is_dir() and not read_only:
            # What a killed or failed save left; removed before Orbax reuses its name.
            for unfinished in self.directory.glob(f"*{TMP_MARK}*"):
                shutil.rmtree(unfinished, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save synchronously (the state is small: adapters, head and their optimizer state).
        Raises CheckpointError when the write fails; the previous checkpoint stays usable.
        Ctrl-C during the save raises KeyboardInterrupt when the checkpoint is complete."""
        meta = {**meta, "digest": digest(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            with _interrupts_deferred():
                self._manager.save(step, args=args, force=True)
                self._manager.wait_until_finished()
        except Exception as e:  # Orbax re-raises the writer thread's error, wrapped or not
            kept = [s for s in self._manager.all_steps() if s != step]
            last = f"step {max(kept)}" if kept else "none yet"
            raise CheckpointError(
                f"Could not write the checkpoint of step {step} to {self.directory} "
                f"({_root_cause(e)}). The last good checkpoint ({last}) is kept: fix the cause "
                "(free disk space?) and rerun the same command to resume from it."
            ) from e

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def read(self, step: int, abstract_state: Any = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`, checked against its digest. With `abstract_state`, restored
        into its structure, shapes and shardings; without, as numpy arrays in plain containers,
        whatever devices and processes saved it (a check on one host reads a checkpoint that
        a cluster wrote)."""
        if abstract_state is None:
            path = self.directory / str(step) / "state"
            tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
            abstract_state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)
        state_args = ocp.args.StandardRestore(abstract_state)
        args = ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        state, meta = restored["state"], dict(restored["meta"])
        if digest(state) != meta.get("digest"):
            raise ValueError("its arrays do not match the digest written with them")
        return state, meta

    def find_good(self) -> tuple[int, dict[str, Any]] | None:
        """(step, meta) of the newest checkpoint that restores and verifies, or None if there
        is no checkpoint. Newer ones that fail are reported and moved to WORKDIR/damaged_
        checkpoints; if every one fails, SetupError (nothing is moved)."""
        failures = []
        for step in reversed(self.steps()):
            try:
                _, meta = self.read(step)
            except Exception as e:  # any damage: missing, truncated or altered files
                failures.append((step, _root_cause(e)))
                print(f"WARNING: checkpoint {self.directory / str(step)} is damaged "
                      f"({failures[-1][1]}).", flush=True)  # fmt: skip
                continue
            for bad, _ in failures:
                self._quarantine(bad)
            if failures:
                where = "left in place" if self.read_only else f"in {self.workdir / DAMAGED_DIR}"
                print(f"Falling back to the checkpoint of step {step}; the damaged ones are "
                      f"{where}.", flush=True)  # fmt: skip
            return step, meta
        if failures:
            raise SetupError(
                f"No checkpoint in {self.directory} can be restored (steps "
                f"{', '.join(str(s) for s, _ in failures)} are damaged). To start over, move "
                f"{self.directory} away (or use another --workdir)."
            )
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() != 0 or self.read_only:  # one process moves it
            return
        target = self.workdir / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        self._manager.reload()

    def reload(self) -> None:
        """See the checkpoints as they are on disk now (another process may have moved some)."""
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether WORKDIR/checkpoints holds a finished step, without creating anything."""
    directory = Path(workdir) / CHECKPOINTS_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
