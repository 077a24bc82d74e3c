"""Images to model inputs without TensorFlow: decoding files with Pillow, the evaluation
preprocessing of the training pipelines in numpy (for `predict` and exported tasks), and the
input normalisation every model applies, in JAX.

    image = decode(path)                               # uint8 HxWx3 RGB
    x = preprocess(image, {"kind": "resize", "size": [224, 224]})   # float32 in [0, 255]
    x = normalize(x, module.config.mean, module.config.std)        # what the model takes

Two preprocessings exist (docs/recipe.md, sections 4 and 5): 'resize' (VTAB-1k, TFDS
datasets, image folders, the demo) is TF1's bilinear resize on the legacy grid, computed here
as TF computes it; 'resize_shorter_crop' (FGVC) resizes the shorter side (bicubic,
antialiased) and centre-crops, with Pillow here where training used TF's resampler: pixels
close to, not equal to, training's.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".heic", ".heif", ".avif")
KINDS = ("resize", "resize_shorter_crop")
# Formats Pillow reads only with a plugin: suffix -> (module, what to install).
PLUGINS = {".heic": ("pillow_heif", "pillow-heif"), ".heif": ("pillow_heif", "pillow-heif")}
# JPEGs resized to a side S are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
# at least DRAFT_MARGIN x S pixels on each side (docs/performance.md, "Decoding photos").
DRAFT_MARGIN = 2


class ImageError(ValueError):
    """An image file that cannot be read, with what to do about it."""


@functools.cache
def _plugin(module: str) -> bool:
    """Register a Pillow plugin (pillow_heif: HEIC/HEIF) once; False where it is missing."""
    try:
        plugin = importlib.import_module(module)
    except ImportError:
        return False
    plugin.register_heif_opener()
    return True


def decode(path: str | Path, size: int | None = None) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB, upright: the EXIF orientation is applied (phones
    store photos sideways and say so there). Grayscale, palette, RGBA (alpha dropped), CMYK
    and 16-bit images become 8-bit RGB, GIFs give their first frame; HEIC/HEIF needs
    pillow-heif, AVIF a Pillow with AVIF support.

    `size`: the side the image will be resized to; a JPEG is then decoded at a reduced DCT
    scale that keeps at least DRAFT_MARGIN x size pixels (much faster for photos; the pixels
    after the resize are close to, not equal to, those of the full decode). Raises ImageError
    for a missing plugin, and what Pillow raises for a file it cannot read (OSError,
    ValueError, Image.DecompressionBombError, ...)."""
    from PIL import Image, ImageOps, features

    suffix = Path(path).suffix.lower()
    if suffix in PLUGINS and not _plugin(PLUGINS[suffix][0]):
        raise ImageError(f"reading {suffix} files needs {PLUGINS[suffix][1]}: "
                         f"pip install {PLUGINS[suffix][1]}")  # fmt: skip
    if suffix == ".avif" and not features.check("avif"):
        raise ImageError("reading .avif files needs a Pillow built with AVIF support: "
                         "pip install -U pillow")  # fmt: skip
    with Image.open(path) as image:
        image.seek(0)  # GIF: the first frame
        limit = Image.MAX_IMAGE_PIXELS
        if limit and image.width * image.height > limit:  # Pillow only warns up to twice that
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} pixels, over Pillow's limit of {limit} "
                "(PIL.Image.MAX_IMAGE_PIXELS)"
            )
        if size and image.format in ("JPEG", "MPO"):  # MPO: phones' multi-picture JPEGs
            image.draft("RGB", (DRAFT_MARGIN * size, DRAFT_MARGIN * size))
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit) grayscale
            values = np.asarray(image).astype(np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
            gray = np.clip(np.round(values * 255.0 / peak), 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_bilinear_v1(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWxC -> size[0] x size[1] x C float32 as `tf.compat.v1.image.resize(..., BILINEAR,
    align_corners=False)` computes it: source coordinate = dst * (in / out) in float32, the
    lower neighbour clamped below, the upper one at the border, and TF's lerp order (along x
    within the two source rows, then along y)."""
    src = np.asarray(image)  # converted to float32 row by row, as they are used
    if src.shape[:2] == tuple(size):
        return src.astype(np.float32)
    ys, y0, y1 = _grid(src.shape[0], size[0])
    xs, x0, x1 = _grid(src.shape[1], size[1])
    xs = xs[None, :, None]

    def along_x(rows: np.ndarray) -> np.ndarray:
        left, right = rows[:, x0].astype(np.float32), rows[:, x1].astype(np.float32)
        return left + (right - left) * xs

    if src.shape[0] <= 2 * size[0]:  # every source row is used: interpolate each one once
        across = along_x(src)
        top, bottom = across[y0], across[y1]
    else:
        top, bottom = along_x(src[y0]), along_x(src[y1])
    return top + (bottom - top) * ys[:, None, None]


def _grid(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(in_size) / np.float32(out_size)
    coords = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    return (coords - lower.astype(np.float32)).astype(np.float32), lower, upper


def resize_shorter_crop(image: np.ndarray, shorter: int, crop: int) -> np.ndarray:
    """Resize the shorter side to `shorter` (bicubic, antialiased), then centre-crop `crop` x
    `crop`, with the FGVC pipeline's sizes and offsets; float32 in [0, 255]."""
    from PIL import Image

    h, w = image.shape[:2]
    # As the FGVC pipeline: the longer side int(shorter * long / short) in float64, the width
    # counting as the shorter side on a tie, offsets rounded half to even.
    w_short = w <= h
    short, long = (w, h) if w_short else (h, w)
    new_long = int(shorter * np.float64(long) / np.float64(short))
    new_h, new_w = (new_long, shorter) if w_short else (shorter, new_long)
    resized = np.asarray(
        Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC), np.float32
    )
    top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
    return resized[top : top + crop, left : left + crop]


def resized_uint8(path: str | Path, size: int) -> np.ndarray:
    """A file as image folders train on it: decoded for a resize to `size` (`decode`), resized
    with `resize_bilinear_v1` and rounded to uint8 (size x size x 3)."""
    resized = resize_bilinear_v1(decode(path, size), (size, size))
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def preprocess_file(path: str | Path, spec: Mapping[str, Any]) -> np.ndarray:
    """An image file as the model's float32 input in [0, 255], as `spec` (an exported task's
    'preprocessing') says; `spec['uint8']` (image folders): as `resized_uint8`."""
    if spec.get("uint8"):
        size = tuple(spec["size"])
        if size[0] != size[1]:
            raise ValueError(f"uint8 preprocessing takes a square size, not {size}")
        return resized_uint8(path, size[0]).astype(np.float32)
    return preprocess(decode(path), spec)


def preprocess(image: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """uint8 HxWx3 -> the model's float32 input in [0, 255] (the mean/std normalisation is the
    model's, done on the device), as `spec` (an exported task's 'preprocessing') says."""
    kind = spec["kind"]
    if kind == "resize":
        return resize_bilinear_v1(image, tuple(spec["size"]))
    if kind == "resize_shorter_crop":
        return resize_shorter_crop(image, int(spec["shorter"]), int(spec["size"][0]))
    raise ValueError(f"Unknown preprocessing {kind!r}; expected one of {KINDS}.")


def shown(path: str | Path) -> str:
    """A path as text that can always be printed (names that are not UTF-8 escaped)."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def find_images(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, by extension), sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
    )


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """[0, 255] images (..., 3) -> (images / 255 - mean) / std per channel, float32, with IEEE
    divisions like the reference's preprocessing (mean and std: the backbone's, e.g.
    `module.config.mean`).

    XLA turns a division by a broadcast value into a multiplication by its reciprocal, which
    is off by an ulp; hiding the broadcast divisors behind an optimisation barrier keeps true
    divisions (the tests check the result against numpy bit for bit).
    """
    images = images.astype(jnp.float32)
    scale, std = jax.lax.optimization_barrier(
        (
            jnp.full(images.shape, 255.0, jnp.float32),
            jnp.broadcast_to(jnp.asarray(std, jnp.float32), images.shape),
        )
    )
    return (images / scale - jnp.asarray(mean, jnp.float32)) / std
