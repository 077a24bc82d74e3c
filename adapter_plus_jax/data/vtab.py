"""The 19 VTAB-1k tasks: TFDS builders, 1k split strings, label and image transforms.

This follows docs/recipe.md sections 1-3, i.e. the VTAB readers of
google-research/task_adaptation as copied by VPT and used by Adapter+ (which pins `kitti:3.3.0`).

Every task reads a TFDS builder with `shuffle_files=False` and maps each example to
`{'image': uint8 HxWx3, 'label': int64 scalar}` with its `image_fn` / `label_fn` *before* any
resizing. The split strings are

- train800: the first 800 examples of the TFDS `train` split;
- val200: 200 examples from a held-out range: `train[T:T+200]` with `T = (p*N)//100` (N the size
  of the builder's `train` split) for tasks that carve it from `train`, else the first 200 of
  `validation` (or of `test` for smallnorb);
- train800val200: the two concatenated;
- test: the evaluation split.

`TaskSpec.splits` holds the strings for the standard split sizes of TFDS 4.9.6;
`TaskSpec.split_strings(n)` recomputes them from the `train` size of the prepared builder, as the
reference readers do.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import tensorflow as tf

SPLIT_NAMES = ("train800", "val200", "train800val200", "test")
GROUPS = ("Natural", "Specialized", "Structured")

Example = Mapping[str, tf.Tensor]


# ----------------------------------------------------------------------------------------------
# Image and label transforms (applied to decoded TFDS examples, before resizing).


def default_image(ex: Example) -> tf.Tensor:
    """The `image` feature as stored (uint8 HxWx3)."""
    return ex["image"]


def default_label(ex: Example) -> tf.Tensor:
    """The `label` feature as stored, as int64."""
    return tf.cast(ex["label"], tf.int64)


def gray_to_rgb(ex: Example) -> tf.Tensor:
    """smallNORB: the single-channel `image` tiled to 3 channels (`image2` is unused)."""
    return tf.tile(ex["image"], [1, 1, 3])


def dsprites_image(ex: Example) -> tf.Tensor:
    """dSprites: the {0,1} single-channel image tiled to 3 channels and scaled to {0,255}."""
    return tf.tile(ex["image"], [1, 1, 3]) * 255


def attribute_label(ex: Example, attr: str) -> tf.Tensor:
    """A stored attribute (e.g. smallNORB `label_azimuth`) used as the label."""
    return tf.cast(ex[attr], tf.int64)


def binned_attribute_label(ex: Example, attr: str, divisor: float) -> tf.Tensor:
    """dSprites: floor(float(attr) / divisor), with divisor = num_original_classes / 16."""
    return tf.cast(tf.math.floordiv(tf.cast(ex[attr], tf.float32), divisor), tf.int64)


def _largest_threshold_below(thresholds: list[float], d: tf.Tensor) -> tf.Tensor:
    """The largest i with thresholds[i] < d, computed as the reference does."""
    thrs = tf.constant(thresholds, tf.float32)
    return tf.reduce_max(tf.where((thrs - d) < 0))


def clevr_count_label(ex: Example) -> tf.Tensor:
    """CLEVR count: number of objects minus 3 (scenes hold 3-10 objects, labels 0..7)."""
    return tf.cast(tf.size(ex["objects"]["size"]) - 3, tf.int64)


CLEVR_DISTANCE_THRESHOLDS = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]


def clevr_distance_label(ex: Example) -> tf.Tensor:
    """CLEVR distance: depth of the closest object, binned into (0,8], (8,8.5], (8.5,9],
    (9,9.5], (9.5,10], (10,100]."""
    d = tf.reduce_min(ex["objects"]["pixel_coords"][:, 2])
    return _largest_threshold_below(CLEVR_DISTANCE_THRESHOLDS, d)


KITTI_DISTANCE_THRESHOLDS = [-100.0, 8.0, 20.0, 999.0]
KITTI_NO_VEHICLE_DISTANCE = 1000.0


def kitti_distance_label(ex: Example) -> tf.Tensor:
    """KITTI closest-vehicle distance: 0 for d<=8, 1 for 8<d<=20, 2 for 20<d<=999, 3 when there
    is no vehicle. Vehicles are objects of type < 3 (Car, Van, Truck); d is their smallest
    `location` z, with 1000 appended so that an empty scene lands in the last bin."""
    objects = ex["objects"]
    vehicles = tf.where(objects["type"] < 3)
    z = tf.gather(params=objects["location"][:, 2], indices=vehicles)
    z = tf.concat([z, tf.constant([[KITTI_NO_VEHICLE_DISTANCE]])], axis=0)
    return _largest_threshold_below(KITTI_DISTANCE_THRESHOLDS, tf.reduce_min(z))


# ----------------------------------------------------------------------------------------------
# Task specs.


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One VTAB-1k task.

    Attributes:
      name: the task name (also the key in `TASKS`).
      tfds_name: the TFDS builder string with config and version pattern (e.g.
        'sun397/tfds:4.*.*').
      version: the version that `tfds_name` must resolve to (TFDS 4.9.6); the loader refuses
        other versions.
      group: 'Natural', 'Specialized' or 'Structured'.
      num_classes: fixed class count (the reference's constants table, not the TFDS info).
      num_train: the standard size N of the builder's `train` split; only used by tasks whose
        held-out range is carved from `train` (`train_percent` set).
      train_percent: p such that val200 = train[T:T+200] with T = (p*N)//100; None when val200
        is `val_split[:200]`.
      val_percent: for single-split tasks (no test split of their own) the share V of N after
        T that the reference's `val` split takes; test is then `train[T+V:]`.
      val_split: the split val200 comes from when `train_percent` is None.
      test_split: the TFDS split string of the test set; None for single-split tasks.
      image_fn: decoded example -> uint8 HxWx3 image.
      label_fn: decoded example -> int64 label.
      manual: what to download by hand ('' when TFDS fetches everything); MANUAL_DIR stands
        for the TFDS manual_dir.
      manual_files: paths relative to manual_dir that must exist before TFDS can prepare it.
      extras: Python modules TFDS needs to *prepare* the builder (import names).
    """

    name: str
    tfds_name: str
    version: str
    group: str
    num_classes: int
    num_train: int | None = None
    train_percent: int | None = None
    val_percent: int | None = None
    val_split: str = "validation"
    test_split: str | None = "test"
    image_fn: Callable[[Example], tf.Tensor] = default_image
    label_fn: Callable[[Example], tf.Tensor] = default_label
    manual: str = ""
    manual_files: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"{self.name}: group {self.group!r} is not one of {GROUPS}")
        if self.train_percent is not None and self.num_train is None:
            raise ValueError(f"{self.name}: train_percent needs num_train")
        if self.test_split is None and (self.train_percent is None or self.val_percent is None):
            raise ValueError(
                f"{self.name}: a single-split task needs train_percent and val_percent"
            )

    @property
    def builder_name(self) -> str:
        """The builder name with its config, without the version ('clevr', 'eurosat/rgb')."""
        return self.tfds_name.split(":")[0]

    def split_strings(self, num_train: int | None = None) -> dict[str, str]:
        """The TFDS split strings of train800 / val200 / train800val200 / test.

        `num_train` is the size N of the builder's `train` split (default: the standard size).
        """
        n = self.num_train if num_train is None else num_train
        if self.train_percent is None:
            val = f"{self.val_split}[:200]"
        else:
            start = self.train_percent * n // 100
            val = f"train[{start}:{start + 200}]"
        if self.test_split is None:
            # Reference: test = train[train_count + val_count:], each count taken separately.
            test = f"train[{self.train_percent * n // 100 + self.val_percent * n // 100}:]"
        else:
            test = self.test_split
        return {
            "train800": "train[:800]",
            "val200": val,
            "train800val200": f"train[:800]+{val}",
            "test": test,
        }

    @property
    def splits(self) -> dict[str, str]:
        """The split strings for the standard split sizes (docs/recipe.md, section 2)."""
        return self.split_strings()


_RESISC45_MANUAL = (
    "Download NWPU-RESISC45.rar (OneDrive: https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs) and "
    "extract it so that MANUAL_DIR/NWPU-RESISC45/<45 class folders>/*.jpg exists."
)
_RETINOPATHY_MANUAL = (
    "From Kaggle 'diabetic-retinopathy-detection' "
    "(https://www.kaggle.com/c/diabetic-retinopathy-detection/data) put into MANUAL_DIR: train/ "
    "(35,126 jpeg: concatenate train.zip.001-005, then unzip; .005 is sometimes missing), test/ "
    "(53,576 jpeg from test.zip.*), sample/ (sample.zip) and trainLabels.csv. TFDS downloads "
    "retinopathy_solution.csv (the test labels) itself."
)
_SUN397_MANUAL = (
    "The Princeton URL is dead (404): place SUN397.tar.gz (39 GB, keep it compressed) and "
    "Partitions.zip in MANUAL_DIR."
)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        # Natural.
        TaskSpec(
            "cifar100", "cifar100:3.*.*", "3.0.2", "Natural", 100, num_train=50000, train_percent=90
        ),
        TaskSpec(
            "caltech101",
            "caltech101:3.*.*",
            "3.0.2",
            "Natural",
            102,
            num_train=3060,
            train_percent=90,
        ),
        TaskSpec("dtd", "dtd:3.*.*", "3.0.1", "Natural", 47),
        TaskSpec(
            "flowers102", "oxford_flowers102:2.*.*", "2.1.1", "Natural", 102, extras=("scipy",)
        ),
        TaskSpec(
            "pet", "oxford_iiit_pet:3.*.*", "3.2.0", "Natural", 37, num_train=3680, train_percent=80
        ),
        TaskSpec(
            "svhn",
            "svhn_cropped:3.*.*",
            "3.0.0",
            "Natural",
            10,
            num_train=73257,
            train_percent=90,
            extras=("scipy",),
        ),
        TaskSpec(
            "sun397",
            "sun397/tfds:4.*.*",
            "4.0.0",
            "Natural",
            397,
            manual=_SUN397_MANUAL,
            manual_files=("SUN397.tar.gz", "Partitions.zip"),
            extras=("cv2",),
        ),
        # Specialized.
        TaskSpec("camelyon", "patch_camelyon:2.*.*", "2.0.0", "Specialized", 2, extras=("h5py",)),
        TaskSpec(
            "eurosat",
            "eurosat/rgb:2.*.*",
            "2.0.0",
            "Specialized",
            10,
            num_train=27000,
            train_percent=60,
            val_percent=20,
            test_split=None,
        ),
        TaskSpec(
            "resisc45",
            "resisc45:3.*.*",
            "3.0.0",
            "Specialized",
            45,
            num_train=31500,
            train_percent=60,
            val_percent=20,
            test_split=None,
            manual=_RESISC45_MANUAL,
            manual_files=("NWPU-RESISC45",),
        ),
        TaskSpec(
            "retinopathy",
            "diabetic_retinopathy_detection/btgraham-300:3.*.*",
            "3.0.0",
            "Specialized",
            5,
            manual=_RETINOPATHY_MANUAL,
            manual_files=("train", "test", "sample", "trainLabels.csv"),
            extras=("cv2",),
        ),
        # Structured.
        TaskSpec(
            "clevr_count",
            "clevr:3.*.*",
            "3.1.0",
            "Structured",
            8,
            num_train=70000,
            train_percent=90,
            test_split="validation",
            label_fn=clevr_count_label,
        ),
        TaskSpec(
            "clevr_distance",
            "clevr:3.*.*",
            "3.1.0",
            "Structured",
            6,
            num_train=70000,
            train_percent=90,
            test_split="validation",
            label_fn=clevr_distance_label,
        ),
        TaskSpec("dmlab", "dmlab:2.0.1", "2.0.1", "Structured", 6),
        TaskSpec(
            "kitti",
            "kitti:3.3.0",
            "3.3.0",
            "Structured",
            4,
            label_fn=kitti_distance_label,
            extras=("cv2",),
        ),
        TaskSpec(
            "dsprites_position",
            "dsprites:2.*.*",
            "2.0.0",
            "Structured",
            16,
            num_train=737280,
            train_percent=80,
            val_percent=10,
            test_split=None,
            image_fn=dsprites_image,
            label_fn=functools.partial(
                binned_attribute_label, attr="label_x_position", divisor=32 / 16
            ),
            extras=("h5py",),
        ),
        TaskSpec(
            "dsprites_orientation",
            "dsprites:2.*.*",
            "2.0.0",
            "Structured",
            16,
            num_train=737280,
            train_percent=80,
            val_percent=10,
            test_split=None,
            image_fn=dsprites_image,
            label_fn=functools.partial(
                binned_attribute_label, attr="label_orientation", divisor=40 / 16
            ),
            extras=("h5py",),
        ),
        TaskSpec(
            "smallnorb_azimuth",
            "smallnorb:2.*.*",
            "2.0.0",
            "Structured",
            18,
            val_split="test",
            test_split="test[50%:]",
            image_fn=gray_to_rgb,
            label_fn=functools.partial(attribute_label, attr="label_azimuth"),
        ),
        TaskSpec(
            "smallnorb_elevation",
            "smallnorb:2.*.*",
            "2.0.0",
            "Structured",
            9,
            val_split="test",
            test_split="test[50%:]",
            image_fn=gray_to_rgb,
            label_fn=functools.partial(attribute_label, attr="label_elevation"),
        ),
    ]
}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """`TASKS[task]` with a clear error for an unknown name; a TaskSpec is returned as is."""
    if isinstance(task, TaskSpec):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise KeyError(f"unknown VTAB task {task!r}; known: {', '.join(TASKS)}") from None
