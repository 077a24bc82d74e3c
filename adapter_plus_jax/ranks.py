"""Choose the adapter (or LoRA) rank per task as the paper does (docs/recipe.md, "Per-task
rank"): train each rank of a grid on the training part, score it on the validation part, take
the best (ties: the smaller rank), retrain that rank on training + validation and test once.

    apj suite select-rank --config configs/vtab.py:dtd \\
        --ranks 1,2,4,8,16,32 --workdir runs/dtd_ranks

Each rank trains in WORKDIR/rank<r> and the final run in WORKDIR/final, through `runner.run`,
so a rerun resumes where it stopped and skips what is finished. WORKDIR/rank_selection.json
holds the validation accuracy per rank, the chosen rank and the final test accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from adapter_plus_jax import runner
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.workdir import write_json_atomic

SELECTION_FILE = "rank_selection.json"
# dataset -> (train_split, eval_split) of the selection runs. VTAB-1k: the paper's 800/200;
# FGVC: VPT's train/val json splits (needs fgvc_root); folders: val/ (or a seeded holdout of
# train/); other TFDS datasets: the last fifth of train (override with `selection_splits`).
SELECTION_SPLITS = {
    "vtab": ("train800", "val200"),
    "fgvc": ("train", "val"),
    "folder": ("train", "val"),
    "tfds": ("train[:80%]", "train[80%:]"),
}


def choose(val_accuracy: Mapping[int, float]) -> int:
    """The rank with the best validation accuracy; among equals, the smallest."""
    return max(val_accuracy, key=lambda r: (val_accuracy[r], -r))


def with_rank(
    config: ml_collections.ConfigDict, rank: int, splits: tuple[str, str]
) -> ml_collections.ConfigDict:
    """`config` with adapter (or LoRA) rank `rank`, trained on splits[0], scored on splits[1]."""
    out = copy.deepcopy(config)
    key = "adapter" if out.adapter is not None else "lora" if out.lora is not None else None
    if key is None:
        raise SetupError(f"Rank selection needs adapters or LoRA; method {out.method!r} has none.")
    out[key].dim = rank
    out.train_split, out.eval_split = splits
    return out


def select_rank(
    config: ml_collections.ConfigDict,
    ranks: Sequence[int],
    workdir: str | Path,
    selection_splits: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Run the selection and the final training; returns (and writes) the record."""
    workdir = Path(workdir)
    ranks = sorted(set(ranks))
    if not ranks or min(ranks) < 1:
        raise SetupError(f"--ranks must be positive integers; got {ranks}.")
    splits = selection_splits or SELECTION_SPLITS.get(config.dataset)
    if splits is None:
        raise SetupError(f"No validation split is known for dataset {config.dataset!r}.")
    # Built before the first run trains (a method without ranks fails here); each run checks
    # its config's values as it starts, before any compute.
    runs = {r: with_rank(config, r, splits) for r in ranks}
    val_accuracy = {}
    for i, (rank, c) in enumerate(runs.items(), 1):
        print(f"[{i}/{len(ranks)}] rank {rank}: train on {splits[0]}, score on {splits[1]}",
              flush=True)  # fmt: skip
        val_accuracy[rank] = runner.run(c, workdir / f"rank{rank}")["test_accuracy"]
    best = choose(val_accuracy)
    print(f"chosen rank {best} (validation accuracy {val_accuracy[best]:.4f}); retraining on "
          f"{config.train_split}, testing on {config.eval_split}", flush=True)  # fmt: skip
    final = runner.run(with_rank(config, best, (config.train_split, config.eval_split)),
                       workdir / "final")  # fmt: skip
    record = {
        "task": config.task,
        "dataset": config.dataset,
        "method": config.method,
        "seed": config.seed,
        "selection_splits": list(splits),
        "final_splits": [config.train_split, config.eval_split],
        "val_accuracy": {str(r): a for r, a in val_accuracy.items()},
        "chosen_rank": best,
        "test_accuracy": final["test_accuracy"],
        "trainable_params": final["trainable_params"],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / SELECTION_FILE, record)
    rows = "\n".join(f"  r={r:<3} {100 * a:6.2f}%" + ("  <- chosen" if r == best else "")
                     for r, a in val_accuracy.items())  # fmt: skip
    print(f"validation accuracy per rank:\n{rows}\ntest accuracy with r={best}: "
          f"{final['test_accuracy']:.4f}; record in {workdir / SELECTION_FILE}", flush=True)
    return record
