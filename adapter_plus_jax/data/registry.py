"""The datasets the runner knows, by `config.dataset`: each one's class count (checked before
any compute: a known task, a prepared dataset) and its train and eval loaders. A new dataset is
added here, in `DATASETS`.

TensorFlow is imported only by the datasets read through TFDS (vtab, fgvc, tfds); the demo and
image folders are held in memory and need none of it.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter_plus_jax.data.pipeline import LoaderOptions, array_loaders
from adapter_plus_jax.errors import SetupError

# ----------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset the runner knows.

    num_classes(config): the class count, after checking that the data can be read (raises
      SetupError with what to do); writes nothing.
    loaders(config, options): (train loader, eval loader): `pipeline`'s in-memory loaders or
      `tfdata`'s streamed ones, with the same batches and interface.
    describe(config, image_size): what results.json records about the data (class names,
      skipped files, ...), once the loaders have read it.
    """

    num_classes: Callable[[Any], int]
    loaders: Callable[[Any, LoaderOptions], tuple[Any, Any]]
    describe: Callable[[Any, int], dict[str, Any]] = lambda config, image_size: {}


def _check_prepared(tfds_name: str, data_dir: str | None, how: str) -> None:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown names and versions
        raise SetupError(f"Cannot open TFDS dataset {tfds_name!r}: {e}") from e
    if not builder.is_prepared():
        raise SetupError(
            f"The dataset {tfds_name} is not prepared in {builder.data_dir_root}. "
            f"Prepare it first ({how}), or point --config.data_dir at the directory that has it."
        )


def _vtab_classes(config: Any) -> int:
    from adapter_plus_jax.data.vtab import TASKS

    if config.task not in TASKS:
        raise SetupError(f"Unknown VTAB-1k task {config.task!r}; expected one of {sorted(TASKS)}.")
    _check_prepared(
        TASKS[config.task].tfds_name,
        config.data_dir,
        f"apj data prepare --tasks {config.task}",
    )
    return TASKS[config.task].num_classes


def _vtab_loaders(config: Any, options: LoaderOptions) -> tuple[Any, Any]:
    from adapter_plus_jax.data.vtab_loaders import vtab_eval_loader, vtab_train_loader

    where = dict(options=options, data_dir=config.data_dir)
    return (
        vtab_train_loader(config.task, config.train_split, **where),
        vtab_eval_loader(config.task, config.eval_split, **where),
    )


def _fgvc_classes(config: Any) -> int:
    from adapter_plus_jax.data import fgvc

    if config.task not in fgvc.FGVC:
        raise SetupError(
            f"Unknown FGVC dataset {config.task!r}; expected one of {sorted(fgvc.FGVC)}."
        )
    spec = fgvc.FGVC[config.task]
    if config.fgvc_root:
        if not Path(config.fgvc_root, "train.json").is_file():
            raise SetupError(f"{config.fgvc_root} has no train.json (VPT's FGVC layout).")
    elif not spec.tfds_name:
        raise SetupError(
            f"{config.task} has no TFDS builder; set --config.fgvc_root to its folder in "
            "VPT's layout (train.json, val.json, test.json and the images)."
        )
    else:
        _check_prepared(
            spec.tfds_name,
            config.data_dir,
            f"apj data prepare --tasks {config.task}",
        )
    return spec.num_classes


def _fgvc_loaders(config: Any, options: LoaderOptions) -> tuple[Any, Any]:
    from adapter_plus_jax.data import fgvc

    # FGVC crops to 224 whatever the model's size; the model must take 224 x 224.
    where = dict(options=options, root=config.fgvc_root, data_dir=config.data_dir)
    return (
        fgvc.fgvc_train_loader(config.task, config.train_split, **where),
        fgvc.fgvc_eval_loader(config.task, config.eval_split, **where),
    )


def _tfds_classes(config: Any) -> int:
    """`config.num_classes`, or (0) the class count of the builder's 'label' feature."""
    import tensorflow_datasets as tfds

    _check_prepared(config.tfds_name, config.data_dir, "tfds build / download_and_prepare")
    features = tfds.builder(config.tfds_name, data_dir=config.data_dir).info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise SetupError(
            f"The TFDS dataset {config.tfds_name} has no {' or '.join(map(repr, missing))} "
            f"feature (it has {sorted(features)}); image classification needs both."
        )
    if config.num_classes:
        return config.num_classes
    num_classes = getattr(features["label"], "num_classes", None)
    if not num_classes:
        raise SetupError(
            f"The 'label' of {config.tfds_name} is not a ClassLabel; set --config.num_classes."
        )
    return num_classes


def _tfds_loaders(config: Any, options: LoaderOptions) -> tuple[Any, Any]:
    """A TFDS dataset with 'image' and 'label', resized like VTAB."""
    import tensorflow_datasets as tfds

    from adapter_plus_jax.data.tfds_io import tfds_eval_loader, tfds_train_loader

    builder = tfds.builder(config.tfds_name, data_dir=config.data_dir)
    fields = (operator.itemgetter("image"), operator.itemgetter("label"))
    return (
        tfds_train_loader(builder, config.train_split, *fields, options, cache=True),
        tfds_eval_loader(builder, config.eval_split, *fields, options, cache=False),
    )


def _demo_loaders(config: Any, options: LoaderOptions) -> tuple[Any, Any]:
    """The offline demo, in memory."""
    from adapter_plus_jax.data import demo

    return array_loaders(*demo.splits(options.image_size), options)


def _folder_classes(config: Any) -> int:
    from adapter_plus_jax.data import folder

    if not config.data_dir:
        raise SetupError("dataset=folder needs the image folder: configs/folder.py:/path/to/root.")
    return len(folder.scan(config.data_dir).classes)


def _folder_cache(config: Any) -> str | None:
    """Where a folder's decoded images are cached: `config.data_cache`, else
    $ADAPTER_PLUS_JAX_DATA_CACHE, else image_cache.DEFAULT_DIR; None for 'off'."""
    from adapter_plus_jax.data.image_cache import CACHE_ENV, DEFAULT_DIR

    value = config.data_cache or os.environ.get(CACHE_ENV) or DEFAULT_DIR
    return None if value.strip().lower() in ("off", "none", "false", "0") else value


def _folder_loaders(config: Any, options: LoaderOptions) -> tuple[Any, Any]:
    from adapter_plus_jax.data import folder

    splits = (config.train_split, config.eval_split)
    return folder.folder_loaders(config.data_dir, splits, options, _folder_cache(config))


def _folder_describe(config: Any, image_size: int) -> dict[str, Any]:
    from adapter_plus_jax.data import folder

    splits = (config.train_split, config.eval_split)
    return folder.describe(config.data_dir, splits, image_size, _folder_cache(config))


DATASETS: dict[str, Dataset] = {
    "vtab": Dataset(_vtab_classes, _vtab_loaders),
    "fgvc": Dataset(_fgvc_classes, _fgvc_loaders),
    "tfds": Dataset(_tfds_classes, _tfds_loaders),
    "demo": Dataset(lambda config: config.num_classes, _demo_loaders),
    "folder": Dataset(_folder_classes, _folder_loaders, _folder_describe),
}


def get_dataset(name: str) -> Dataset:
    """`DATASETS[name]`, with a clear error for an unknown name."""
    if name not in DATASETS:
        raise SetupError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}.")
    return DATASETS[name]
