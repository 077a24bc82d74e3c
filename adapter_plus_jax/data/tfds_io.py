"""TFDS access: builders pinned to the recipe's versions, splits in stored order, one process's
slice of a split, and the train/eval loaders of any TFDS split resized like VTAB-1k (training
splits optionally read into memory)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from adapter_plus_jax.data.pipeline import ArrayTrainLoader, LoaderOptions
from adapter_plus_jax.data.tfdata import (
    EvalLoader,
    Example,
    TrainLoader,
    read_into_memory,
    resize_bilinear_v1,
)


class TFDSVersionError(RuntimeError):
    """The TFDS builder does not resolve to the version the recipe (and the paper) used."""


class ManualDownloadError(RuntimeError):
    """Files that TFDS cannot fetch by itself are missing; the message says which, and where."""


class _BuilderSpec(Protocol):
    """What `tfds_builder` and `prepare` need from a VTAB `TaskSpec` or an FGVC spec."""

    name: str
    tfds_name: str
    version: str
    manual: str
    manual_files: tuple[str, ...]
    extras: tuple[str, ...]


def tfds_builder(spec: _BuilderSpec, data_dir: str | Path | None = None):
    """The TFDS builder of `spec`, refusing any version other than `spec.version`.

    `data_dir` None means the TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    hint = (
        f"The experiments use {spec.tfds_name} at version {spec.version}, the version "
        "tensorflow-datasets 4.9.6 resolves to (installed: "
        f"{tfds.__version__}). Install tensorflow-datasets==4.9.6, or put data already prepared "
        f"at {spec.version} into the data_dir."
    )
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    except AssertionError as e:  # TFDS's way of saying that no version matches the pattern
        raise TFDSVersionError(f"{spec.name}: {e}\n{hint}") from e
    if str(builder.info.version) != spec.version:
        raise TFDSVersionError(
            f"{spec.name}: {spec.tfds_name} resolved to version {builder.info.version}.\n{hint}"
        )
    return builder


def read_split(
    builder,
    split: Any,
    image_fn: Callable[[Example], tf.Tensor],
    label_fn: Callable[[Example], tf.Tensor],
) -> tf.data.Dataset:
    """`split` of `builder` in its stored order as {'image': uint8 HxWx3, 'label': int64}."""
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        read_config=tfds.ReadConfig(try_autocache=False),  # caching is ours to decide
    )
    return ds.map(
        lambda ex: {"image": image_fn(ex), "label": label_fn(ex)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def num_examples(ds: tf.data.Dataset) -> int:
    """The size of a TFDS split's dataset (TFDS records it in the cardinality)."""
    n = int(ds.cardinality())
    if n < 0:
        raise ValueError("the dataset's size is unknown; TFDS datasets always record it")
    return n


def process_split(
    builder, split: str, process_index: int, process_count: int
) -> tuple[Any, int, int]:
    """This process's slice of `split`: (subsplit, its size, the largest size of any slice).

    `tfds.even_splits` slices every '+'-part of the split separately and gives the first
    processes the extra examples, so process 0 always holds the largest slice.
    """
    parts = tfds.even_splits(split, n=process_count)
    size = num_examples(builder.as_dataset(split=parts[process_index]))
    largest = num_examples(builder.as_dataset(split=parts[0]))
    return parts[process_index], size, largest


def tfds_train_loader(
    builder,
    split: str,
    image_fn: Callable[[Example], tf.Tensor],
    label_fn: Callable[[Example], tf.Tensor],
    options: LoaderOptions,
    *,
    cache: bool,
    in_memory: bool = False,
) -> TrainLoader | ArrayTrainLoader:
    """Training batches of a TFDS split, resized as VTAB (TF1 bilinear to
    `options.image_size`, no augmentation), shuffled per epoch, last partial batch dropped.
    `in_memory`: the split is read and resized once into host memory and batched from there
    (`pipeline.ArrayTrainLoader`); else streamed, its decoded images cached if `cache`."""
    examples = read_split(builder, split, image_fn, label_fn)
    size = options.image_size
    if in_memory:
        return ArrayTrainLoader(*read_into_memory(examples, size), options)
    return TrainLoader(
        examples,
        num_examples(examples),
        lambda ex, _: (resize_bilinear_v1(ex["image"], size), ex["label"]),
        options,
        drop_remainder=True,
        cache=cache,
    )


def tfds_eval_loader(
    builder,
    split: str,
    image_fn: Callable[[Example], tf.Tensor],
    label_fn: Callable[[Example], tf.Tensor],
    options: LoaderOptions,
    *,
    cache: bool,
) -> EvalLoader:
    """Evaluation batches over this process's slice of a TFDS split, resized as VTAB, with
    'mask' marking the real examples of the padded last batch."""
    sub, size, largest = process_split(builder, split, jax.process_index(), jax.process_count())
    image_size = options.image_size
    return EvalLoader(
        read_split(builder, sub, image_fn, label_fn),
        size,
        largest,
        lambda ex: (resize_bilinear_v1(ex["image"], image_size), ex["label"]),
        options,
        cache=cache,
    )
