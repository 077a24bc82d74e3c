"""Your own images: one folder per class.

    ROOT/train/<class>/*   training images (required; the class names are these folder names,
                           sorted, and the labels their indices)
    ROOT/val/<class>/*     optional: trained on with train (train_split 'train+val', as VTAB's
                           train800val200), or the validation set of rank selection
    ROOT/test/<class>/*    optional: evaluated on; without it (or without val/ when that is
                           evaluated) a seeded, stratified holdout of the training images
                           (HOLDOUT_FRACTION of each class) takes its place

JPEG, PNG, BMP, GIF (first frame) and WebP files are read with Pillow; grayscale, palette, RGBA
(alpha dropped) and 16-bit images become 8-bit RGB. A file that cannot be decoded is skipped and
named in a warning, and the count goes to results.json. Images are decoded once, at the start,
resized to the model's input as the VTAB pipeline resizes (TF1 bilinear, `images.
resize_bilinear_v1`) and kept in memory (`pipeline.array_loaders`); no TensorFlow is needed.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from adapter_plus_jax.data.pipeline import (
    ArrayEvalLoader,
    ArrayTrainLoader,
    LoaderOptions,
    array_loaders,
)
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.images import EXTENSIONS, decode, resize_bilinear_v1

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0  # the same holdout for every training seed


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The checked layout: the class names and each present split's files as (path, label)."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, tuple[tuple[Path, int], ...]]  # 'train', and 'val' / 'test' if present


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SetupError(
            f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/."
        )
    files = {}
    for c in classes:
        images = sorted(p for p in c.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not images:
            raise SetupError(
                f"{c} holds no image file ({', '.join(EXTENSIONS)}); add images or remove it."
            )
        files[c.name] = images
    return files


@functools.lru_cache(maxsize=8)
def scan(root: str) -> ImageFolder:
    """Check ROOT's layout (no image is decoded yet); raises SetupError saying what to fix."""
    path = Path(root).expanduser()
    if not (path / "train").is_dir():
        what = "does not exist" if not path.exists() else "has no train/ folder"
        raise SetupError(
            f"Image folder {path} {what}: expected {path}/train/<class>/<images> "
            "(and optionally val/ and test/ with the same class folders)."
        )
    found = {"train": _class_files(path / "train")}
    classes = tuple(found["train"])
    if len(classes) < 2:
        raise SetupError(f"{path / 'train'} has one class folder ({classes[0]}); need two or more.")
    for name in ("val", "test"):
        if (path / name).is_dir():
            found[name] = _class_files(path / name)
            unknown = sorted(set(found[name]) - set(classes))
            if unknown:
                raise SetupError(
                    f"{path / name} has classes that train/ does not: {unknown}. Every class "
                    "must have training images."
                )
    label = {c: i for i, c in enumerate(classes)}
    splits = {
        name: tuple((f, label[c]) for c, fs in files.items() for f in fs)
        for name, files in found.items()
    }
    return ImageFolder(path, classes, splits)


def select(
    folder: ImageFolder, train_split: str, eval_split: str
) -> tuple[tuple, tuple, str | None]:
    """(train pairs, eval pairs, how the eval set was held out or None).

    train_split 'train' or 'train+val' (val/ added when present); eval_split 'test' or 'val'.
    A missing eval folder is replaced by a seeded, stratified holdout of train/.
    """
    if train_split not in ("train", "train+val") or eval_split not in ("test", "val"):
        raise SetupError(
            f"Image folders take train_split 'train' or 'train+val' and eval_split 'test' or "
            f"'val'; got {train_split!r} and {eval_split!r}."
        )
    if eval_split == "val" and train_split == "train+val":
        raise SetupError("eval_split='val' needs train_split='train' (val/ cannot be in both).")
    train, note = folder.splits["train"], None
    if eval_split in folder.splits:
        evaluation = folder.splits[eval_split]
    else:
        rng = np.random.default_rng(HOLDOUT_SEED)
        held = set()
        for c in range(len(folder.classes)):
            members = [i for i, (_, y) in enumerate(train) if y == c]
            k = min(int(round(HOLDOUT_FRACTION * len(members))), len(members) - 1)
            held.update(rng.choice(members, size=k, replace=False).tolist())
        evaluation = tuple(p for i, p in enumerate(train) if i in held)
        train = tuple(p for i, p in enumerate(train) if i not in held)
        note = (f"no {eval_split}/ folder: {HOLDOUT_FRACTION:.0%} of each class of train/ held "
                f"out (seed {HOLDOUT_SEED})")  # fmt: skip
        if not evaluation:
            raise SetupError(f"{folder.root} has no {eval_split}/ folder and too few images to "
                             "hold some out.")  # fmt: skip
    if train_split == "train+val" and "val" in folder.splits:
        train = train + folder.splits["val"]
    return train, evaluation, note


def _decode_all(pairs: tuple[tuple[Path, int], ...]) -> tuple[list[np.ndarray], list[int], list]:
    images, labels, skipped = [], [], []
    for path, label in pairs:
        try:
            images.append(decode(path))
        except Exception as e:  # Pillow raises several types for broken files
            skipped.append((path, f"{type(e).__name__}: {e}"))
            continue
        labels.append(label)
    return images, labels, skipped


@functools.lru_cache(maxsize=1)  # the suite's seeds decode a folder once
def load(root: str, train_split: str, eval_split: str) -> dict[str, Any]:
    """Decode every image of the two splits once: {'train': (images, labels), 'eval': ...,
    'skipped': [(path, error)], 'holdout': note or None}."""
    folder = scan(root)
    train_pairs, eval_pairs, note = select(folder, train_split, eval_split)
    if note:
        print(f"{folder.root}: {note}.", flush=True)
    train_images, train_labels, skipped = _decode_all(train_pairs)
    eval_images, eval_labels, skipped_eval = _decode_all(eval_pairs)
    skipped += skipped_eval
    if skipped:
        names = ", ".join(str(p) for p, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"WARNING: skipped {len(skipped)} image file(s) that cannot be decoded: {names}",
              flush=True)  # fmt: skip
    for split, labels in ((train_split, train_labels), (eval_split, eval_labels)):
        if not labels:
            raise SetupError(f"No readable image for {split} in {folder.root}.")
    return {"train": (train_images, train_labels), "eval": (eval_images, eval_labels),
            "skipped": skipped, "holdout": note}  # fmt: skip


def describe(root: str, train_split: str, eval_split: str) -> dict[str, Any]:
    """What results.json records about the folder."""
    data = load(root, train_split, eval_split)
    return {
        "class_names": list(scan(root).classes),
        "eval_set": "holdout" if data["holdout"] else f"{eval_split}/",
        "holdout": data["holdout"],
        "num_train": len(data["train"][1]),
        "num_eval": len(data["eval"][1]),
        "skipped_images": [str(p) for p, _ in data["skipped"]],
    }


def _arrays(images: list[np.ndarray], labels: list[int], size: int) -> tuple[np.ndarray, ...]:
    """The images resized to size x size (float32 in [0, 255]; uint8 when all had that size
    already) as one array, and the labels."""
    if all(image.shape[:2] == (size, size) for image in images):
        stacked = np.stack(images)
    else:
        stacked = np.stack([resize_bilinear_v1(image, (size, size)) for image in images])
    return stacked, np.asarray(labels, np.int32)


def folder_loaders(
    root: str, splits: tuple[str, str], options: LoaderOptions
) -> tuple[ArrayTrainLoader, ArrayEvalLoader]:
    """Train batches (shuffled per epoch, last partial batch dropped) and padded eval batches
    of `splits` = (train_split, eval_split), as `select` reads them, from memory."""
    data = load(root, *splits)
    if len(data["train"][1]) < options.batch_size:
        raise SetupError(f"{len(data['train'][1])} training images are fewer than "
                         f"batch_size={options.batch_size}.")  # fmt: skip
    size = options.image_size
    return array_loaders(_arrays(*data["train"], size), _arrays(*data["eval"], size), options)
