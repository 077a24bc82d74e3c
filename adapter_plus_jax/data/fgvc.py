"""FGVC (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) input pipelines.

Two sources (docs/recipe.md, section 5):

- TFDS builders, for the 4 datasets TFDS has. Their official train split (train+validation for
  flowers) is VPT's `trainval` and their test split is VPT's `test`, which is the main FGVC
  protocol.
- VPT's layout, for every dataset and for the train/val ablation: `ROOT/{train,val,test}.json`,
  each a dict {image path relative to the image root: class id}, and the images under
  `ROOT/<image root>` (`images/` for cub and nabirds, `Images/` for stanforddogs, ROOT itself for
  oxfordflower and stanfordcars). Class ids are remapped to 0..C-1 by sorting the unique ids of
  *each json file separately*, as the reference does. `trainval` is train.json + val.json.

Transforms, in tf.data with tf.image ops:

- train: timm's RandomResizedCrop (scale 0.08-1, log-uniform ratio 3/4-4/3, 10 attempts, then
  a centre-crop fallback) to 224 with bilinear or bicubic picked at random, a horizontal flip
  with p=0.5;
- eval: resize the shorter side to 256 = floor(224/0.875) (bicubic), centre crop 224;
- both: round to uint8 as PIL does; /255 and (x - mean)/std then run in JAX
  (`adapter_plus_jax.data.pipeline`).

The crop and flip parameters follow timm's algorithm, but the random numbers come from TF
stateless ops (so the same seed gives other crops than timm), and TF's antialiased resize, its
rounding and its JPEG decoder are not PIL's: for a given crop the pixels are close to
timm/PIL's (within a grey level or two, tests/test_fgvc.py), not identical. Exact
equality is not needed here, unlike VTAB-1k whose fixed preprocessing `adapter_plus_jax.data`
reproduces exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from adapter_plus_jax.data.pipeline import IMAGE_SIZE, LoaderOptions
from adapter_plus_jax.data.tfdata import EvalLoader, Example, TrainLoader
from adapter_plus_jax.data.tfds_io import num_examples, process_split, tfds_builder

CROP_PCT = 0.875
RESIZE_SIZE = math.floor(IMAGE_SIZE / CROP_PCT)  # 256
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
JSON_SPLITS = {
    "train": ("train",),
    "val": ("val",),
    "trainval": ("train", "val"),
    "test": ("test",),
}


@dataclasses.dataclass(frozen=True)
class FgvcSpec:
    """One FGVC dataset.

    Attributes:
      name: the dataset name (the key in `FGVC`).
      num_classes: class count.
      image_root: folder of the images relative to the dataset root (VPT layout); '' = root.
      tfds_name: TFDS builder with version, or '' when TFDS has none.
      version: the version `tfds_name` must resolve to.
      tfds_splits: TFDS split strings of 'trainval' and 'test'.
      manual, manual_files, extras: as in `adapter_plus_jax.data.vtab.TaskSpec` (for `prepare`).
    """

    name: str
    num_classes: int
    image_root: str
    tfds_name: str = ""
    version: str = ""
    tfds_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    manual: str = ""
    manual_files: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()


_TRAIN_TEST = {"trainval": "train", "test": "test"}
_CARS196_FILES = (
    "cars_train.tgz",
    "cars_test.tgz",
    "cars_test_annos_withlabels.mat",
    "car_devkit.tgz",
)

FGVC: dict[str, FgvcSpec] = {
    s.name: s
    for s in [
        FgvcSpec("cub", 200, "images", "caltech_birds2011:0.1.1", "0.1.1", _TRAIN_TEST),
        FgvcSpec("nabirds", 555, "images"),
        FgvcSpec(
            "oxfordflower",
            102,
            "",
            "oxford_flowers102:2.1.1",
            "2.1.1",
            {"trainval": "train+validation", "test": "test"},
            extras=("scipy",),
        ),
        FgvcSpec("stanforddogs", 120, "Images", "stanford_dogs:0.2.0", "0.2.0", _TRAIN_TEST),
        FgvcSpec(
            "stanfordcars",
            196,
            "",
            "cars196:2.1.0",
            "2.1.0",
            _TRAIN_TEST,
            manual=(
                "The ai.stanford.edu URLs are dead: place "
                + ", ".join(_CARS196_FILES)
                + " (the files of TFDS's cars196 checksums) in MANUAL_DIR."
            ),
            manual_files=_CARS196_FILES,
            extras=("scipy",),
        ),
    ]
}


def get_fgvc(name: str) -> FgvcSpec:
    """`FGVC[name]` with a clear error for an unknown name."""
    try:
        return FGVC[name]
    except KeyError:
        raise KeyError(f"unknown FGVC dataset {name!r}; known: {', '.join(FGVC)}") from None


# ----------------------------------------------------------------------------------------------
# Sources.


def read_json_split(path: str | Path) -> tuple[list[str], list[int]]:
    """One VPT split file -> (relative image paths, labels 0..C-1 by sorted unique class id)."""
    entries = json.loads(Path(path).read_text())
    ids = sorted(set(entries.values()))
    index = {cid: i for i, cid in enumerate(ids)}
    return list(entries), [index[cid] for cid in entries.values()]


def json_examples(spec: FgvcSpec, split: str, root: str | Path) -> tuple[list[str], list[int]]:
    """(absolute image paths, labels) of `split` in VPT's layout under `root`."""
    if split not in JSON_SPLITS:
        raise ValueError(f"unknown FGVC split {split!r}; expected one of {tuple(JSON_SPLITS)}")
    root = Path(root)
    paths: list[str] = []
    labels: list[int] = []
    for part in JSON_SPLITS[split]:
        rel, lab = read_json_split(root / f"{part}.json")
        paths += [str(root / spec.image_root / p) for p in rel]
        labels += lab
    return paths, labels


def _process_slice(count: int, index: int, processes: int) -> slice:
    """Process `index`'s contiguous share of `count` items (the first ones get the rest)."""
    base, rest = divmod(count, processes)
    start = index * base + min(index, rest)
    return slice(start, start + base + (index < rest))


def _json_dataset(paths: Sequence[str], labels: Sequence[int]) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {"file": list(paths), "label": np.asarray(labels, np.int64)}
    )


def _tfds_dataset(spec: FgvcSpec, split: str, data_dir: str | Path | None):
    """(builder, TFDS split string); images stay encoded and are decoded after shuffling."""
    if not spec.tfds_name:
        raise ValueError(f"{spec.name} has no TFDS builder: pass root= (VPT's json layout)")
    if split not in spec.tfds_splits:
        raise ValueError(
            f"{spec.name}: TFDS provides {tuple(spec.tfds_splits)}; the {split!r} split needs "
            "root= (VPT's json layout)"
        )
    return tfds_builder(spec, data_dir), spec.tfds_splits[split]


def _read_encoded(builder, split) -> tf.data.Dataset:
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        # Only the image (kept encoded) and the label: the mock data and the segmentation masks
        # of some builders are never decoded.
        decoders=tfds.decode.PartialDecoding(
            {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()}
        ),
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})


# ----------------------------------------------------------------------------------------------
# Transforms.


def decode_rgb(ex: Example) -> tf.Tensor:
    """The example's image (encoded bytes in 'image', or a file path in 'file') as uint8
    HxWx3, like PIL's `convert('RGB')`; JPEGs use the accurate DCT, as libjpeg does in PIL."""
    data = tf.io.read_file(ex["file"]) if "file" in ex else ex["image"]
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )


def random_resized_crop_window(
    height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """timm's RandomResizedCrop parameters (top, left, h, w) for an image of height x width.

    Up to 10 attempts of area fraction U(0.08, 1) and log-uniform aspect ratio in [3/4, 4/3];
    the first that fits is used, else the centre crop with the ratio clamped to the range. An
    empty box (possible only for images of a few pixels) counts as not fitting.
    """
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    target_area = h * w * tf.random.stateless_uniform([CROP_ATTEMPTS], area_seed, *SCALE)
    log_ratio = tf.random.stateless_uniform(
        [CROP_ATTEMPTS], ratio_seed, math.log(RATIO[0]), math.log(RATIO[1])
    )
    aspect = tf.exp(log_ratio)
    # timm: int(round(.)), and Python's round is half-to-even like tf.round.
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (crop_w <= width) & (crop_h <= height) & (crop_w > 0) & (crop_h > 0)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first fitting attempt

    def attempt() -> tuple[tf.Tensor, ...]:
        ch, cw = crop_h[first], crop_w[first]
        top = tf.random.stateless_uniform([], top_seed, 0, height - ch + 1, tf.int32)
        left = tf.random.stateless_uniform([], left_seed, 0, width - cw + 1, tf.int32)
        return top, left, ch, cw

    def fallback() -> tuple[tf.Tensor, ...]:
        in_ratio = w / h
        ch, cw = tf.case(
            [
                (
                    in_ratio < min(RATIO),
                    lambda: (tf.cast(tf.round(w / min(RATIO)), tf.int32), width),
                ),
                (
                    in_ratio > max(RATIO),
                    lambda: (height, tf.cast(tf.round(h * max(RATIO)), tf.int32)),
                ),
            ],
            default=lambda: (height, width),
        )
        return (height - ch) // 2, (width - cw) // 2, ch, cw

    return tf.cond(tf.reduce_any(fits), attempt, fallback)


def _to_uint8_range(image: tf.Tensor) -> tf.Tensor:
    """Round and clip a resized float image to [0, 255], as PIL's uint8 output is."""
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def resized_crop(image: tf.Tensor, window: Sequence[tf.Tensor], method: str) -> tf.Tensor:
    """Crop (top, left, h, w) and resize to 224x224 with antialiasing (PIL's resampling
    filters widen with the downscale factor too), rounded like PIL's uint8 output; float32."""
    top, left, h, w = window
    crop = tf.image.crop_to_bounding_box(image, top, left, h, w)
    return _to_uint8_range(tf.image.resize(crop, [IMAGE_SIZE, IMAGE_SIZE], method, antialias=True))


def train_image(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """uint8 HxWx3 -> augmented float32 224x224x3 in [0, 255] (crop, interpolation, flip)."""
    crop_seed, interp_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(image)
    window = random_resized_crop_window(shape[0], shape[1], crop_seed)
    bicubic = tf.random.stateless_uniform([], interp_seed) < 0.5
    image = tf.cond(
        bicubic,
        lambda: resized_crop(image, window, "bicubic"),
        lambda: resized_crop(image, window, "bilinear"),
    )
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def eval_image(image: tf.Tensor) -> tf.Tensor:
    """uint8 HxWx3 -> shorter side 256 (bicubic, longer side int(256*long/short) as torchvision
    computes it), centre crop 224 (offsets int(round((size-224)/2))); float32 in [0, 255]."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    w_short = w <= h
    short, long = tf.where(w_short, w, h), tf.where(w_short, h, w)
    new_long = tf.cast(
        RESIZE_SIZE * tf.cast(long, tf.float64) / tf.cast(short, tf.float64), tf.int32
    )
    new_h = tf.where(w_short, new_long, RESIZE_SIZE)
    new_w = tf.where(w_short, RESIZE_SIZE, new_long)
    top = tf.cast(tf.round(tf.cast(new_h - IMAGE_SIZE, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - IMAGE_SIZE, tf.float32) / 2), tf.int32)
    resized = _to_uint8_range(
        tf.image.resize(image, tf.stack([new_h, new_w]), "bicubic", antialias=True)
    )
    return tf.image.crop_to_bounding_box(resized, top, left, IMAGE_SIZE, IMAGE_SIZE)


# ----------------------------------------------------------------------------------------------
# Loaders.


def fgvc_train_loader(
    name: str,
    split: str = "trainval",
    *,
    options: LoaderOptions,
    root: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> TrainLoader:
    """Augmented, shuffled training batches; the last incomplete batch is kept (padded and
    masked), as the reference's loader has drop_last=False.

    `root` selects VPT's json layout (needed for nabirds and the train/val splits); otherwise
    the TFDS builder is read from `data_dir`. Encoded TFDS images are cached in memory; the
    json layout reads its files every epoch.
    """
    spec = get_fgvc(name)
    if root is not None:
        paths, labels = json_examples(spec, split, root)
        examples, count, cache = _json_dataset(paths, labels), len(paths), False
    else:
        builder, tfds_split = _tfds_dataset(spec, split, data_dir)
        examples = _read_encoded(builder, tfds_split)
        count, cache = num_examples(examples), True
    return TrainLoader(
        examples,
        count,
        lambda ex, s: (train_image(decode_rgb(ex), s), ex["label"]),
        options,
        drop_remainder=False,
        cache=cache,
    )


def fgvc_eval_loader(
    name: str,
    split: str = "test",
    *,
    options: LoaderOptions,
    root: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> EvalLoader:
    """Evaluation batches over this process's slice of `split`, padded and masked."""
    spec = get_fgvc(name)
    index, processes = jax.process_index(), jax.process_count()
    if root is not None:
        paths, labels = json_examples(spec, split, root)
        mine = _process_slice(len(paths), index, processes)
        examples = _json_dataset(paths[mine], labels[mine])
        size = mine.stop - mine.start
        largest = _process_slice(len(paths), 0, processes).stop
    else:
        builder, tfds_split = _tfds_dataset(spec, split, data_dir)
        sub, size, largest = process_split(builder, tfds_split, index, processes)
        examples = _read_encoded(builder, sub)
    return EvalLoader(
        examples,
        size,
        largest,
        lambda ex: (eval_image(decode_rgb(ex)), ex["label"]),
        options,
        cache=False,
    )
