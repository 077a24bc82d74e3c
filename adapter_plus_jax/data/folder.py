"""Your own images: one folder per class.

    ROOT/train/<class>/*   training images (required; the class names are these folder names,
                           sorted, and the labels their indices)
    ROOT/val/<class>/*     optional: trained on with train (train_split 'train+val', as VTAB's
                           train800val200), or the validation set of rank selection
    ROOT/test/<class>/*    optional: evaluated on; without it (or without val/ when that is
                           evaluated) a seeded, stratified holdout of the training images
                           (HOLDOUT_FRACTION of each class) takes its place

JPEG, PNG, BMP, GIF (first frame), WebP, HEIC/HEIF (pillow-heif) and AVIF files are read with
Pillow, in class folders and their subfolders (linked folders followed once); the EXIF
orientation is applied; grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images
become 8-bit RGB. Every image is decoded once, on the host's cores, and resized at once to the
model's input (TF1 bilinear, as VTAB, then rounded to uint8) into a memory-mapped cache file
(`image_cache`) that later runs over the same files read back; batches are read from it, so
a folder larger than memory trains. A file that cannot be read (corrupt, over Pillow's pixel
limit, no permission, no plugin) or a folder that cannot be listed is skipped and named in a
warning, and results.json lists and counts them (`skipped_images`, `skipped_counts`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from adapter_plus_jax.data.image_cache import decode_files
from adapter_plus_jax.data.pipeline import (
    ArrayEvalLoader,
    ArrayTrainLoader,
    LoaderOptions,
    array_loaders,
)
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.images import EXTENSIONS, shown

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0  # the same holdout for every training seed


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The checked layout: the class names and each present split's files as (path, label)."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, tuple[tuple[Path, int], ...]]  # 'train', and 'val' / 'test' if present
    problems: tuple[tuple[str, str], ...] = ()  # (path, reason): what could not be listed


def _image_files(folder: Path, seen: set[str], problems: list) -> list[Path]:
    """The image files under `folder` (subfolders included), sorted. Linked folders are
    followed once: a folder already read (a link loop, two links to one folder) is skipped
    and named in `problems`, as is a folder that cannot be read."""
    found = []

    def unreadable(error: OSError) -> None:
        problems.append((shown(error.filename), f"{type(error).__name__}: {error.strerror}"))

    for where, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(where)
        if real in seen:
            problems.append((shown(where), "LinkedTwice: a folder already read (followed once)"))
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found += [Path(where, n) for n in names
                  if not n.startswith(".") and Path(n).suffix.lower() in EXTENSIONS]  # fmt: skip
    return sorted(found)


def _class_files(split_dir: Path, problems: list) -> dict[str, list[Path]]:
    try:
        entries = sorted(split_dir.iterdir())
    except OSError as e:
        raise SetupError(f"Cannot read {shown(split_dir)}: {e.strerror}.") from None
    classes = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        raise SetupError(
            f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/."
        )
    files, seen = {}, set()
    for c in classes:
        before = len(problems)
        images = _image_files(c, seen, problems)
        if not images and len(problems) == before:
            raise SetupError(
                f"{shown(c)} holds no image file ({', '.join(EXTENSIONS)}); add images or "
                "remove it."
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
    problems: list[tuple[str, str]] = []
    found = {"train": _class_files(path / "train", problems)}
    classes = tuple(found["train"])
    if len(classes) < 2:
        raise SetupError(f"{path / 'train'} has one class folder ({classes[0]}); need two or more.")
    for name in ("val", "test"):
        if (path / name).is_dir():
            found[name] = _class_files(path / name, problems)
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
    return ImageFolder(path, classes, splits, tuple(problems))


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


# The kinds of file a run skips, by the error that skipped it, as results.json counts them.
SKIPPED_KINDS = {
    "DecompressionBombError": "too_large",
    "PermissionError": "unreadable",
    "ImageError": "needs_plugin",
    "LinkedTwice": "linked_twice",
}


def skipped_counts(skipped: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """How many files or folders were skipped, by kind (SKIPPED_KINDS; else 'undecodable')."""
    counts: dict[str, int] = {}
    for _, reason in skipped:
        kind = SKIPPED_KINDS.get(reason.split(":")[0], "undecodable")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@functools.lru_cache(maxsize=1)  # describe() after training reads what the loaders read
def load(root: str, splits: tuple[str, str], size: int, cache: str | None) -> dict[str, Any]:
    """Every image of the two splits decoded once at size x size (`image_cache`, in `cache`;
    None: in memory only): {'train': (images, labels), 'eval': ..., 'skipped': ((path,
    reason), ...), 'holdout': note or None}."""
    folder = scan(root)
    train_pairs, eval_pairs, note = select(folder, *splits)
    if note:
        print(f"{folder.root}: {note}.", flush=True)
    data, skipped = {"holdout": note}, folder.problems
    for name, pairs, split in (("train", train_pairs, splits[0]), ("eval", eval_pairs, splits[1])):
        decoded = decode_files([p for p, _ in pairs], size, cache)
        labels = np.array([y for _, y in pairs], np.int32)[decoded.kept]
        if not len(labels):
            raise SetupError(f"No readable image for {split} in {folder.root}.")
        data[name], skipped = (decoded.images, labels), skipped + decoded.skipped
    if skipped:
        names = ", ".join(p for p, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"WARNING: skipped {len(skipped)} image file(s) or folder(s) "
              f"({skipped_counts(skipped)}): {names}", flush=True)  # fmt: skip
    data["skipped"] = skipped
    return data


def describe(root: str, splits: tuple[str, str], size: int, cache: str | None) -> dict[str, Any]:
    """What results.json records about the folder."""
    data = load(root, splits, size, cache)
    return {
        "class_names": list(scan(root).classes),
        "eval_set": "holdout" if data["holdout"] else f"{splits[1]}/",
        "holdout": data["holdout"],
        "num_train": len(data["train"][1]),
        "num_eval": len(data["eval"][1]),
        "skipped_images": [p for p, _ in data["skipped"]],
        "skipped_counts": skipped_counts(data["skipped"]),
    }


def folder_loaders(
    root: str, splits: tuple[str, str], options: LoaderOptions, cache: str | None
) -> tuple[ArrayTrainLoader, ArrayEvalLoader]:
    """Train batches (shuffled per epoch, last partial batch dropped) and padded eval batches
    of `splits` = (train_split, eval_split), as `select` reads them, from the decoded images'
    memory-mapped cache (`cache`; None: from memory)."""
    data = load(root, splits, options.image_size, cache)
    if len(data["train"][1]) < options.batch_size:
        raise SetupError(f"{len(data['train'][1])} training images are fewer than "
                         f"batch_size={options.batch_size}.")  # fmt: skip
    return array_loaders(data["train"], data["eval"], options)
