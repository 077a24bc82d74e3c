"""A small real-image dataset that needs no network: scikit-learn's bundled handwritten digits
(1,797 8x8 grey images, 10 classes), written as a local TFDS dataset.

The images are upscaled to 32x32 RGB (nearest neighbour) when the dataset is prepared. The
split is fixed: a seeded permutation, the first 1,000 for training and the remaining 797 for
testing, like VTAB-1k's 1,000 training images.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

NAME = "sklearn_digits"
NUM_TRAIN = 1000


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits as a TFDS dataset with 'train' and 'test' splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "32x32 RGB, 1000 train / 797 test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        images, labels = _images()
        return {
            "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN]),
            "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:]),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


def _images() -> tuple[np.ndarray, np.ndarray]:
    """Every digit as uint8 32x32x3 with its label, in the dataset's seeded order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    # 0..16 grey levels -> 0..255, 8x8 -> 32x32, grey -> RGB.
    images = np.round(digits.images[order] * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)
    return np.repeat(images[..., None], 3, axis=-1), digits.target[order]


def write_test_images(out: str | Path, count: int = 20) -> list[Path]:
    """The first `count` test images as OUT/digit_<n>_label<k>.png (to try `predict` on)."""
    from PIL import Image

    images, labels = _images()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(min(count, len(labels) - NUM_TRAIN)):
        path = out / f"digit_{n:03d}_label{labels[NUM_TRAIN + n]}.png"
        Image.fromarray(images[NUM_TRAIN + n]).save(path)
        paths.append(path)
    return paths


def prepare(data_dir: str | Path | None = None) -> tfds.core.DatasetBuilder:
    """Write the dataset under `data_dir` (None: TFDS's default) once; return its builder.

    Processes that start at the same time (two runs, a suite's shards) take turns through a
    lock file: TFDS's final rename fails for the second writer of the same dataset.
    """
    data_dir = None if data_dir is None else str(data_dir)
    root = Path(SklearnDigits(data_dir=data_dir).data_dir_root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = SklearnDigits(data_dir=data_dir)  # sees what an earlier holder wrote
        builder.download_and_prepare()
    return builder
