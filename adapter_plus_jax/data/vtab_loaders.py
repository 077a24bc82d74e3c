"""The VTAB-1k loaders: the task table (`vtab.TASKS`) read through `tfds_io`, the 1k training
splits into memory, the test splits streamed."""

from __future__ import annotations

import logging
from pathlib import Path

from adapter_plus_jax.data.pipeline import CACHED_SPLITS, LoaderOptions
from adapter_plus_jax.data.tfds_io import tfds_builder, tfds_eval_loader, tfds_train_loader
from adapter_plus_jax.data.vtab import SPLIT_NAMES, TaskSpec, get_task

log = logging.getLogger(__name__)


def vtab_splits(spec: TaskSpec, builder) -> dict[str, str]:
    """The task's split strings for the prepared builder's `train` size, as the reference
    computes them (the standard size when the builder has no split info, e.g. when mocked)."""
    if spec.train_percent is None or "train" not in builder.info.splits:
        return spec.splits
    n = builder.info.splits["train"].num_examples
    if n != spec.num_train:
        log.warning(
            "%s: the train split has %d examples, not the standard %d; the 1k subsets differ "
            "from the paper's",
            spec.name,
            n,
            spec.num_train,
        )
    return spec.split_strings(n)


def _vtab_split(task: str | TaskSpec, split: str, data_dir: str | Path | None):
    spec = get_task(task)
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
    builder = tfds_builder(spec, data_dir)
    return spec, builder, vtab_splits(spec, builder)[split]


def vtab_train_loader(
    task: str | TaskSpec,
    split: str = "train800val200",
    *,
    options: LoaderOptions,
    data_dir: str | Path | None = None,
):
    """Training batches of a VTAB-1k task (shuffled per epoch, last partial batch dropped).
    The 1k splits are read into memory once; the full train split is streamed."""
    spec, builder, split_str = _vtab_split(task, split, data_dir)
    small = split in CACHED_SPLITS
    return tfds_train_loader(builder, split_str, spec.image_fn, spec.label_fn, options,
                             cache=small, in_memory=small)  # fmt: skip


def vtab_eval_loader(
    task: str | TaskSpec,
    split: str = "test",
    *,
    options: LoaderOptions,
    data_dir: str | Path | None = None,
):
    """Evaluation batches of a VTAB-1k task over this process's slice of `split`, with 'mask'
    marking the real examples of the padded last batch."""
    spec, builder, split_str = _vtab_split(task, split, data_dir)
    return tfds_eval_loader(builder, split_str, spec.image_fn, spec.label_fn, options,
                            cache=split in CACHED_SPLITS)  # fmt: skip
