"""A small real-image dataset that needs no network and no TensorFlow: scikit-learn's bundled
handwritten digits (1,797 8x8 grey images, 10 classes), held in memory.

The images are upscaled to 32x32 RGB (nearest neighbour) when they are loaded. The
split is fixed: a seeded permutation, the first 1,000 for training and the remaining 797 for
testing, like VTAB-1k's 1,000 training images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_TRAIN = 1000


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


def splits(size: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)) at `size` x `size`: uint8 at the stored
    32x32, else resized as every image-folder pipeline resizes (`images.resize_bilinear_v1`,
    float32 in [0, 255])."""
    from adapter_plus_jax.images import resize_bilinear_v1

    images, labels = _images()
    if images.shape[1] != size:
        images = np.stack([resize_bilinear_v1(image, (size, size)) for image in images])
    return (images[:NUM_TRAIN], labels[:NUM_TRAIN]), (images[NUM_TRAIN:], labels[NUM_TRAIN:])
