"""VTAB-1k input pipeline (adapter_plus_jax.data: vtab, pipeline, tfds_io, registry), offline.

- All 19 tasks through the real loaders with `tfds.testing.mock_data`, whose reader is replaced
  by one that honours split strings against the builders' standard split sizes (the stock mock
  returns `num_examples` examples whatever the split).
- Label transforms on hand-made examples, the TF1 resize, the split table of the spec.
- A real TFDS dataset built here from PNG files: exact pixels end to end, epochs, evaluation
  counts on 1 and (in a subprocess) 8 CPU devices, per-process slices.
- Version guard, and `prepare`'s errors for files TFDS cannot fetch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core.features import TensorInfo
from tensorflow_datasets.testing.mocking import RandomFakeGenerator

from adapter_plus_jax.data import pipeline, tfdata, tfds_io, vtab, vtab_loaders
from adapter_plus_jax.data import prepare as prep
from adapter_plus_jax.images import normalize

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# The recipe's tables (docs/recipe.md).

# Section 1: builder pattern, resolved version, group, classes.
SPEC_TASKS = {
    "cifar100": ("cifar100:3.*.*", "3.0.2", "Natural", 100),
    "caltech101": ("caltech101:3.*.*", "3.0.2", "Natural", 102),
    "dtd": ("dtd:3.*.*", "3.0.1", "Natural", 47),
    "flowers102": ("oxford_flowers102:2.*.*", "2.1.1", "Natural", 102),
    "pet": ("oxford_iiit_pet:3.*.*", "3.2.0", "Natural", 37),
    "svhn": ("svhn_cropped:3.*.*", "3.0.0", "Natural", 10),
    "sun397": ("sun397/tfds:4.*.*", "4.0.0", "Natural", 397),
    "camelyon": ("patch_camelyon:2.*.*", "2.0.0", "Specialized", 2),
    "eurosat": ("eurosat/rgb:2.*.*", "2.0.0", "Specialized", 10),
    "resisc45": ("resisc45:3.*.*", "3.0.0", "Specialized", 45),
    "retinopathy": (
        "diabetic_retinopathy_detection/btgraham-300:3.*.*",
        "3.0.0",
        "Specialized",
        5,
    ),
    "clevr_count": ("clevr:3.*.*", "3.1.0", "Structured", 8),
    "clevr_distance": ("clevr:3.*.*", "3.1.0", "Structured", 6),
    "dmlab": ("dmlab:2.0.1", "2.0.1", "Structured", 6),
    "kitti": ("kitti:3.3.0", "3.3.0", "Structured", 4),
    "dsprites_position": ("dsprites:2.*.*", "2.0.0", "Structured", 16),
    "dsprites_orientation": ("dsprites:2.*.*", "2.0.0", "Structured", 16),
    "smallnorb_azimuth": ("smallnorb:2.*.*", "2.0.0", "Structured", 18),
    "smallnorb_elevation": ("smallnorb:2.*.*", "2.0.0", "Structured", 9),
}

# Section 2: (val200, test, test size); train800 is always train[:800].
SPEC_SPLITS = {
    "cifar100": ("train[45000:45200]", "test", 10000),
    "caltech101": ("train[2754:2954]", "test", 6084),
    "dtd": ("validation[:200]", "test", 1880),
    "flowers102": ("validation[:200]", "test", 6149),
    "pet": ("train[2944:3144]", "test", 3669),
    "svhn": ("train[65931:66131]", "test", 26032),
    "sun397": ("validation[:200]", "test", 21750),
    "camelyon": ("validation[:200]", "test", 32768),
    "eurosat": ("train[16200:16400]", "train[21600:]", 5400),
    "resisc45": ("train[18900:19100]", "train[25200:]", 6300),
    "retinopathy": ("validation[:200]", "test", 42670),
    "clevr_count": ("train[63000:63200]", "validation", 15000),
    "clevr_distance": ("train[63000:63200]", "validation", 15000),
    "dmlab": ("validation[:200]", "test", 22735),
    "kitti": ("validation[:200]", "test", 711),
    "dsprites_position": ("train[589824:590024]", "train[663552:]", 73728),
    "dsprites_orientation": ("train[589824:590024]", "train[663552:]", 73728),
    "smallnorb_azimuth": ("test[:200]", "test[50%:]", 12150),
    "smallnorb_elevation": ("test[:200]", "test[50%:]", 12150),
}

# Split sizes of the builders in TFDS 4.9.6 (the recipe's N and test sizes; the TFDS catalogue for
# the validation splits the spec does not list). The mock reader slices these.
TFDS_SIZES = {
    "cifar100": {"train": 50000, "test": 10000},
    "caltech101": {"train": 3060, "test": 6084},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "svhn_cropped": {"train": 73257, "test": 26032, "extra": 531131},
    "sun397": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy_detection": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites": {"train": 737280},
    "smallnorb": {"train": 24300, "test": 24300},
}


def test_registry_matches_spec():
    assert list(vtab.TASKS) == list(SPEC_TASKS)
    for name, (tfds_name, version, group, num_classes) in SPEC_TASKS.items():
        spec = vtab.TASKS[name]
        assert (spec.tfds_name, spec.version, spec.group, spec.num_classes) == (
            tfds_name,
            version,
            group,
            num_classes,
        ), name
    groups = [s.group for s in vtab.TASKS.values()]
    assert [groups.count(g) for g in vtab.GROUPS] == [7, 4, 8]


@pytest.mark.parametrize("name", list(SPEC_SPLITS))
def test_split_strings_match_spec(name):
    val, test, _ = SPEC_SPLITS[name]
    assert vtab.TASKS[name].splits == {
        "train800": "train[:800]",
        "val200": val,
        "train800val200": f"train[:800]+{val}",
        "test": test,
    }


def test_split_strings_follow_the_builders_train_size():
    # T = (p*N)//100 with the prepared builder's N, as the reference computes it.
    assert vtab.TASKS["cifar100"].split_strings(50001)["val200"] == "train[45000:45200]"
    assert vtab.TASKS["cifar100"].split_strings(50012)["val200"] == "train[45010:45210]"
    # test = train[T + V:] with T and V floored separately: 16202 + 5400, not 80% = 21603.
    assert vtab.TASKS["eurosat"].split_strings(27004)["test"] == "train[21602:]"
    assert vtab.TASKS["dtd"].split_strings(5)["val200"] == "validation[:200]"


# ----------------------------------------------------------------------------------------------
# All 19 tasks, mocked.


class FakeExamples(RandomFakeGenerator):
    """32 distinct random examples of a builder's features, reused cyclically (Python-made
    examples would cost a millisecond each to feed through tf.data). Images are 8-48 px; all
    sequences of one example (e.g. CLEVR's objects) have one length in 3..10; floats are in
    [0, 25) so that all distance bins of CLEVR and KITTI occur."""

    POOL = 32

    def __init__(self, features):
        super().__init__(features, num_examples=0)
        flat_features = features._flatten(features)
        flat_info = features._flatten(features.get_tensor_info())
        self.pool = [self._make(i, flat_features, flat_info) for i in range(self.POOL)]

    def _make(self, seed, flat_features, flat_info):
        rng = np.random.default_rng(seed)
        height, width = rng.integers(8, 49, size=2)
        length = rng.integers(3, 11)
        objs = []
        for feature, info in zip(flat_features, flat_info, strict=True):
            sizes = iter([height, width] if len(info.shape) == 3 else [])
            shape = tuple(next(sizes, length) if s is None else s for s in info.shape)
            obj = self._generate_random_obj(feature, TensorInfo(shape, info.np_dtype), rng)
            if np.issubdtype(np.asarray(obj).dtype, np.floating):
                obj = obj * 25
            objs.append(obj)
        return self._features._nest(objs)


_POOLS: dict[str, list[tf.data.Dataset]] = {}


def fake_pool(builder) -> list[tf.data.Dataset]:
    """One endless dataset per pooled example of a builder (made once per builder name)."""
    if builder.name not in _POOLS:
        pool = FakeExamples(builder.info.features).pool
        _POOLS[builder.name] = [tf.data.Dataset.from_tensors(ex).repeat() for ex in pool]
    return _POOLS[builder.name]


def _mock_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Replaces `FileReaderBuilder._as_dataset`: resolves `split` (strings, '+', slices,
    `tfds.even_splits`) against `TFDS_SIZES` like the real reader, and yields that many fake
    examples (example i of split s is pool item (crc32(s) + i) % 32), with the cardinality TFDS
    records."""
    infos = splits_lib.SplitDict(
        [
            splits_lib.SplitInfo(name=k, shard_lengths=[v], num_bytes=0)
            for k, v in TFDS_SIZES[self.name].items()
        ]
    )
    if isinstance(split, str):
        split = splits_lib.AbstractSplit.from_spec(split)
    choices = np.concatenate(
        [
            (zlib.crc32(a.splitname.encode()) + np.arange(a.from_ or 0, end)) % FakeExamples.POOL
            for a in split.to_absolute(infos)
            for end in [infos[a.splitname].num_examples if a.to is None else a.to]
        ]
    )
    ds = tf.data.Dataset.choose_from_datasets(
        fake_pool(self), tf.data.Dataset.from_tensor_slices(choices)
    )
    return ds.apply(tf.data.experimental.assert_cardinality(len(choices)))


@pytest.fixture
def mocked_tfds():
    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_mock_as_dataset
    ):
        yield


def first_batches(batches, n: int = 3) -> list[dict[str, np.ndarray]]:
    return [
        {k: np.asarray(v) for k, v in b.items()} for b, _ in zip(batches, range(n), strict=False)
    ]


def same_batches(a, b) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_task_pipeline_mocked(mocked_tfds, name):
    spec = vtab.TASKS[name]
    builder = tfds_io.tfds_builder(spec)
    splits = vtab_loaders.vtab_splits(spec, builder)

    # Split sizes as TFDS resolves them; train800val200 read through the task's transforms.
    for split, size in [("train800", 800), ("val200", 200), ("test", SPEC_SPLITS[name][2])]:
        assert tfds_io.num_examples(builder.as_dataset(split=splits[split])) == size, split
    ds = tfds_io.read_split(builder, splits["train800val200"], spec.image_fn, spec.label_fn)
    # Batched: a Python round trip per example would dominate the test's time.
    labels = np.concatenate(list(ds.map(lambda ex: ex["label"]).batch(512).as_numpy_iterator()))
    assert len(labels) == tfds_io.num_examples(ds) == 1000
    assert 0 <= labels.min() and labels.max() < spec.num_classes

    # Batches: shape, dtype, range, labels; the order is a function of the seed.
    loader = vtab_loaders.vtab_train_loader(name, options=pipeline.LoaderOptions(8, seed=3))
    assert loader.steps_per_epoch == 125
    batches = first_batches(loader.epoch(0))
    for b in batches:
        assert b["image"].shape == (8, 224, 224, 3) and b["image"].dtype == np.float32
        assert b["image"].min() >= 0.0 and b["image"].max() <= 255.0
        assert b["label"].dtype == np.int32 and b["mask"].all()
        assert ((0 <= b["label"]) & (b["label"] < spec.num_classes)).all()
    # Same seed, same batches (a fresh loader replays too: test_train_epochs).
    assert same_batches(batches, first_batches(loader.epoch(0)))
    options = pipeline.LoaderOptions(8, seed=4)
    other = first_batches(vtab_loaders.vtab_train_loader(name, options=options).epoch(0))
    assert not same_batches(batches, other)


# ----------------------------------------------------------------------------------------------
# Label and image transforms on hand-made examples.


def clevr_example(depths):
    n = len(depths)
    coords = np.array([[10.0, 20.0, d] for d in depths], np.float32).reshape(n, 3)
    return {"objects": {"size": tf.zeros([n], tf.int64), "pixel_coords": tf.constant(coords)}}


@pytest.mark.parametrize("count, label", [(3, 0), (4, 1), (7, 4), (10, 7)])
def test_clevr_count(count, label):
    assert int(vtab.TASKS["clevr_count"].label_fn(clevr_example([9.0] * count))) == label


@pytest.mark.parametrize(
    "depths, label",
    [
        ([0.5], 0),
        ([8.0, 12.0], 0),  # (0, 8] includes 8
        ([8.25], 1),
        ([8.5, 9.9], 1),  # (8, 8.5] includes 8.5
        ([8.51], 2),
        ([9.0], 2),
        ([9.2], 3),
        ([9.5], 3),
        ([9.7, 30.0], 4),
        ([10.0], 4),
        ([10.01], 5),
        ([60.0, 99.0, 12.0], 5),
    ],
)
def test_clevr_distance(depths, label):
    assert int(vtab.TASKS["clevr_distance"].label_fn(clevr_example(depths))) == label


def kitti_example(objects):
    """objects: (type, z) pairs; type 0 Car, 1 Van, 2 Truck, 3 Pedestrian, 5 Cyclist, 6 Tram."""
    types = np.array([t for t, _ in objects], np.int64)
    location = np.array([[1.0, 2.0, z] for _, z in objects], np.float32).reshape(-1, 3)
    return {"objects": {"type": tf.constant(types), "location": tf.constant(location)}}


@pytest.mark.parametrize(
    "objects, label",
    [
        ([(0, 5.0)], 0),
        ([(0, 8.0)], 0),  # d <= 8
        ([(1, 8.01)], 1),
        ([(2, 20.0)], 1),  # 8 < d <= 20
        ([(0, 20.5)], 2),
        ([(0, 999.0)], 2),  # 20 < d <= 999
        ([(0, 1000.0)], 3),
        ([(3, 2.0), (0, 15.0)], 1),  # the pedestrian is not a vehicle
        ([(6, 1.0), (5, 3.0), (2, 25.0)], 2),  # nor trams and cyclists
        ([(1, 30.0), (2, 4.0), (0, 12.0)], 0),  # the closest vehicle counts
        ([(3, 5.0), (5, 6.0)], 3),  # no vehicle
        ([], 3),  # no object at all
    ],
)
def test_kitti_distance(objects, label):
    assert int(vtab.TASKS["kitti"].label_fn(kitti_example(objects))) == label


@pytest.mark.parametrize(
    "task, attr, value, label",
    [
        ("dsprites_position", "label_x_position", 0, 0),
        ("dsprites_position", "label_x_position", 1, 0),
        ("dsprites_position", "label_x_position", 2, 1),
        ("dsprites_position", "label_x_position", 17, 8),
        ("dsprites_position", "label_x_position", 31, 15),
        ("dsprites_orientation", "label_orientation", 2, 0),  # 0.8
        ("dsprites_orientation", "label_orientation", 3, 1),  # 1.2
        ("dsprites_orientation", "label_orientation", 5, 2),  # 2.0
        ("dsprites_orientation", "label_orientation", 7, 2),  # 2.8
        ("dsprites_orientation", "label_orientation", 37, 14),  # 14.8
        ("dsprites_orientation", "label_orientation", 38, 15),  # 15.2
        ("dsprites_orientation", "label_orientation", 39, 15),  # 15.6
    ],
)
def test_dsprites_labels(task, attr, value, label):
    out = vtab.TASKS[task].label_fn({attr: tf.constant(value, tf.int64)})
    assert out.dtype == tf.int64 and int(out) == label


def test_dsprites_image_is_tiled_and_scaled():
    mask = np.random.default_rng(0).integers(0, 2, (64, 64, 1)).astype(np.uint8)
    image = vtab.TASKS["dsprites_position"].image_fn({"image": tf.constant(mask)}).numpy()
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image, np.repeat(mask, 3, axis=2) * 255)


@pytest.mark.parametrize(
    "task, azimuth, elevation, label",
    [("smallnorb_azimuth", 17, 3, 17), ("smallnorb_elevation", 17, 8, 8)],
)
def test_smallnorb(task, azimuth, elevation, label):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (96, 96, 1)).astype(np.uint8)
    ex = {
        "image": tf.constant(gray),
        "image2": tf.constant(255 - gray),
        "label_azimuth": tf.constant(azimuth, tf.int64),
        "label_elevation": tf.constant(elevation, tf.int64),
    }
    spec = vtab.TASKS[task]
    assert int(spec.label_fn(ex)) == label
    np.testing.assert_array_equal(spec.image_fn(ex).numpy(), np.repeat(gray, 3, axis=2))


# ----------------------------------------------------------------------------------------------
# The TF1 resize.


def legacy_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """TF1's bilinear grid written out in float32 like its kernel: source = dst * (in / out),
    neighbours floor and min(floor + 1, in - 1)."""

    def axis(n_in):
        src = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo.astype(np.float32)

    y0, y1, dy = axis(image.shape[0])
    x0, x1, dx = axis(image.shape[1])
    img = image.astype(np.float32)
    dx = dx[None, :, None]
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * dx
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * dx
    return top + (bottom - top) * dy[:, None, None]


@pytest.mark.parametrize("shape", [(32, 32, 3), (375, 500, 3), (17, 300, 3), (224, 224, 3)])
def test_resize_is_tf1_bilinear(shape):
    image = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    ours = tfdata.resize_bilinear_v1(tf.constant(image)).numpy()
    assert ours.dtype == np.float32 and ours.shape == (224, 224, 3)
    tf1 = tf.compat.v1.image.resize(image, [224, 224], tf.compat.v1.image.ResizeMethod.BILINEAR)
    np.testing.assert_array_equal(ours, tf.cast(tf1, tf.float32).numpy())
    np.testing.assert_allclose(ours, legacy_bilinear(image, 224), atol=1e-3)
    if shape[:2] != (224, 224):  # the other resizes use half-pixel centres
        tf2 = tf.image.resize(image, [224, 224], "bilinear").numpy()
        jx = np.asarray(jax.image.resize(image.astype(np.float32), (224, 224, 3), "bilinear"))
        assert np.abs(ours - tf2).max() > 1.0
        assert np.abs(ours - jx).max() > 1.0


# ----------------------------------------------------------------------------------------------
# A real TFDS dataset, built here from PNG files.

TRAIN_SIZE, TEST_SIZE, TEST_OFFSET, TINY_CLASSES = 1010, 37, 1010, 1100


class TinyVtab(tfds.core.GeneratorBasedBuilder):
    """PNG files from `manual_dir/{train,test}/<label>.png`: 1010 train and 37 test images of
    8-40 px with unique labels (train 0..1009, test 1010..1046), so that every example is
    identifiable."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "PNG files written by the test."

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=TINY_CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(dl_manager.manual_dir / s) for s in ("train", "test")}

    def _generate_examples(self, folder):
        for path in sorted(folder.glob("*.png")):
            yield path.name, {"image": path, "label": int(path.stem)}


# The 1k splits on the tiny builder: train800 = train[:800], val200 = train[808:1008]
# (T = 80*1010//100 = 808), train800val200, test (37).
TINY = vtab.TaskSpec(
    "tiny",
    "tiny_vtab:1.0.0",
    "1.0.0",
    "Natural",
    TINY_CLASSES,
    num_train=TRAIN_SIZE,
    train_percent=80,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[int, np.ndarray]]:
    """(data_dir with tiny_vtab prepared, label -> the image array written)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    images = {}
    for split, count, offset in [("train", TRAIN_SIZE, 0), ("test", TEST_SIZE, TEST_OFFSET)]:
        (root / "manual" / split).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (*rng.integers(8, 41, size=2), 3)).astype(np.uint8)
            images[offset + i] = image
            png = tf.io.encode_png(image).numpy()
            (root / "manual" / split / f"{offset + i:03d}.png").write_bytes(png)
    TinyVtab(data_dir=root / "tfds").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root / "manual")
    )
    return root / "tfds", images


def resized(image: np.ndarray, size: int = 224) -> np.ndarray:
    """What the pipeline must output for one image: TF1's bilinear resize, in [0, 255]."""
    return tf.compat.v1.image.resize(image, [size, size]).numpy().astype(np.float32)


def collect(batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, masks) of all batches, concatenated."""
    out = [(np.asarray(b["image"]), np.asarray(b["label"]), np.asarray(b["mask"])) for b in batches]
    return tuple(np.concatenate(x) for x in zip(*out, strict=True))


def labels_of(builder, split) -> list[int]:
    """The labels (= example ids) of a split of the tiny builder, in stored order."""
    return [int(ex["label"]) for ex in builder.as_dataset(split=split, shuffle_files=False)]


def test_tiny_splits(tiny):
    data_dir, _ = tiny
    builder = tfds_io.tfds_builder(TINY, data_dir)
    assert builder.info.splits["train"].num_examples == TRAIN_SIZE
    splits = vtab_loaders.vtab_splits(TINY, builder)
    assert splits["val200"] == "train[808:1008]"
    sizes = {k: tfds_io.num_examples(builder.as_dataset(split=v)) for k, v in splits.items()}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 37}


def test_eval_exact_pixels_each_example_once(tiny):
    data_dir, images = tiny
    loader = vtab_loaders.vtab_eval_loader(
        TINY, "test", options=pipeline.LoaderOptions(eval_batch_size=8), data_dir=data_dir
    )
    assert len(loader) == 5  # ceil(37 / 8)
    batches = list(loader)
    assert len(batches) == 5
    assert all(b["image"].shape == (8, 224, 224, 3) for b in batches)
    x, y, mask = collect(batches)
    assert mask.sum() == TEST_SIZE and not mask[TEST_SIZE:].any()
    assert sorted(y[mask]) == list(range(TEST_OFFSET, TEST_OFFSET + TEST_SIZE))
    for image, label in zip(x[mask], y[mask], strict=True):
        np.testing.assert_array_equal(image, resized(images[label]))
    assert not y[~mask].any()


def test_the_steps_normalisation_is_the_references(tiny):
    """The loaders yield images in [0, 255]; `normalize` in the step gives the reference's
    (x / 255 - mean) / std bit for bit, ImageNet statistics included (divisions by 0.5 would hide
    a multiplication by a reciprocal)."""
    data_dir, images = tiny
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    options = pipeline.LoaderOptions(eval_batch_size=8)
    loader = vtab_loaders.vtab_eval_loader(TINY, "test", options=options, data_dir=data_dir)
    raw, y, _ = collect([next(iter(loader))])
    in_step = np.asarray(jax.jit(lambda x: normalize(x, mean, std))(raw))
    for image, label in zip(in_step, y, strict=True):
        expected = (resized(images[label]) / np.float32(255) - np.float32(mean)) / np.float32(std)
        np.testing.assert_array_equal(image, expected)


def test_other_image_size(tiny):
    """A model built for another input size gets its size from both loaders."""
    data_dir, images = tiny
    kw = dict(options=pipeline.LoaderOptions(8, 8, image_size=96), data_dir=data_dir)
    train_batch = next(iter(vtab_loaders.vtab_train_loader(TINY, "val200", **kw).epoch(0)))
    x, y, mask = collect([next(iter(vtab_loaders.vtab_eval_loader(TINY, "test", **kw)))])
    assert train_batch["image"].shape == x.shape == (8, 96, 96, 3) and mask.all()
    for image, label in zip(x, y, strict=True):
        np.testing.assert_array_equal(image, resized(images[label], 96))


def test_train_epochs(tiny):
    data_dir, images = tiny
    kw = dict(options=pipeline.LoaderOptions(16), data_dir=data_dir)
    loader = vtab_loaders.vtab_train_loader(TINY, "val200", **kw)
    assert loader.steps_per_epoch == 12  # drop_last: 200 // 16
    both = collect(loader.epochs(0, 2))  # one pipeline over two epochs
    epochs = [tuple(a[192 * e : 192 * (e + 1)] for a in both) for e in range(2)]
    val200 = set(labels_of(tfds_io.tfds_builder(TINY, data_dir), "train[808:1008]"))
    for x, y, mask in epochs:
        # 192 distinct examples of val200, all real.
        assert len(y) == 192 and mask.all() and len(set(y)) == 192 and set(y) <= val200
        for image, label in zip(x[:3], y[:3], strict=True):
            np.testing.assert_array_equal(image, resized(images[label]))
    assert len({tuple(y) for _, y, _ in epochs}) == 2  # reshuffled every epoch
    # Resuming at epoch 1 with a fresh loader replays it exactly.
    resumed = collect(vtab_loaders.vtab_train_loader(TINY, "val200", **kw).epoch(1))
    assert all(np.array_equal(a, b) for a, b in zip(resumed, epochs[1], strict=True))


def as_process(loader: tfdata.TrainLoader, rows: tuple[int, int]) -> tfdata.TrainLoader:
    """Make `loader` produce the rows [lo, hi) of each global batch, as the process owning
    them would (there is one process here)."""
    loader._batcher.rows = rows
    loader._batcher.local_batch = rows[1] - rows[0]
    return loader


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_train_batches_do_not_depend_on_process_count(tiny, drop_remainder):
    data_dir, _ = tiny
    builder = tfds_io.tfds_builder(TINY, data_dir)
    examples = tfds_io.read_split(builder, "train[:30]", TINY.image_fn, TINY.label_fn)

    def loader():
        return tfdata.TrainLoader(
            examples,
            30,
            lambda ex, _: (tf.zeros([2, 2, 3]), ex["label"]),
            pipeline.LoaderOptions(8, seed=7),
            drop_remainder=drop_remainder,
            cache=True,
        )

    whole = [np.asarray(b["label"]) for b in loader().dataset(1, 2).as_numpy_iterator()]
    masks = [np.asarray(b["mask"]) for b in loader().dataset(1, 2).as_numpy_iterator()]
    parts = [
        list(as_process(loader(), rows).dataset(1, 2).as_numpy_iterator())
        for rows in [(0, 4), (4, 8)]
    ]
    assert len(whole) == (6 if drop_remainder else 8) == len(parts[0]) == len(parts[1])
    for full, mask, a, b in zip(whole, masks, *parts, strict=True):
        np.testing.assert_array_equal(full, np.concatenate([a["label"], b["label"]]))
        np.testing.assert_array_equal(mask, np.concatenate([a["mask"], b["mask"]]))
    assert np.concatenate(masks).sum() == 2 * (24 if drop_remainder else 30)


@pytest.mark.parametrize("processes", [1, 3, 5])
def test_process_slices_cover_split_once(tiny, processes):
    data_dir, _ = tiny
    builder = tfds_io.tfds_builder(TINY, data_dir)
    split = "train[:20]+train[808:816]"  # 28 examples in two parts
    seen, sizes, largest = [], [], set()
    for index in range(processes):
        sub, size, most = tfds_io.process_split(builder, split, index, processes)
        labels = labels_of(builder, sub)
        assert len(labels) == size
        seen += labels
        sizes.append(size)
        largest.add(most)
    assert sorted(seen) == sorted(labels_of(builder, split))
    assert largest == {max(sizes)}


EIGHT_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from adapter_plus_jax.data import pipeline, vtab, vtab_loaders

    spec = vtab.TaskSpec(
        "tiny", "tiny_vtab:1.0.0", "1.0.0", "Natural", 1100, num_train=1010, train_percent=80
    )
    options = pipeline.LoaderOptions(eval_batch_size=16)
    loader = vtab_loaders.vtab_eval_loader(spec, "test", options=options, data_dir=sys.argv[1])
    labels, shards = [], set()
    for b in loader:
        shards.add(len(b["image"].addressable_shards))
        labels += np.asarray(b["label"])[np.asarray(b["mask"])].tolist()
    try:
        options = pipeline.LoaderOptions(eval_batch_size=12)
        vtab_loaders.vtab_eval_loader(spec, "test", options=options, data_dir=sys.argv[1])
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({"devices": jax.device_count(), "batches": len(loader),
                      "labels": labels, "shards": sorted(shards), "error": error}))
    """
)


def test_eval_on_eight_devices(tiny):
    data_dir, _ = tiny
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",  # before jax is imported
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["batches"] == 3 and out["shards"] == [8]
    assert sorted(out["labels"]) == list(range(TEST_OFFSET, TEST_OFFSET + TEST_SIZE))
    assert "multiple of the number of devices (8)" in out["error"]


# ----------------------------------------------------------------------------------------------
# Version guard and preparation.


def test_version_guard(tiny):
    data_dir, _ = tiny
    with pytest.raises(tfds_io.TFDSVersionError, match="1.0.0"):
        tfds_io.tfds_builder(dataclasses.replace(TINY, version="1.0.1"), data_dir)


def test_unknown_version_pattern():
    spec = vtab.TaskSpec("pet", "oxford_iiit_pet:4.*.*", "4.0.0", "Natural", 37)
    with pytest.raises(tfds_io.TFDSVersionError, match="tensorflow-datasets==4.9.6"):
        tfds_io.tfds_builder(spec)


@pytest.mark.parametrize(
    "name, files",
    [
        ("resisc45", ["NWPU-RESISC45"]),
        ("retinopathy", ["train", "test", "sample", "trainLabels.csv"]),
        ("sun397", ["SUN397.tar.gz", "Partitions.zip"]),
        ("stanfordcars", ["cars_train.tgz", "cars_test.tgz", "car_devkit.tgz"]),
    ],
)
def test_prepare_names_missing_manual_files(tmp_path, name, files):
    with pytest.raises(tfds_io.ManualDownloadError) as info:
        prep.prepare([name], data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "downloads" / "manual") in message
    assert all(f in message for f in files)


def test_prepare_cli_reports_every_missing_dataset(tmp_path, capsys):
    manual = tmp_path / "manual"
    status = prep.main(
        ["prepare", "--tasks", "resisc45,sun397"]
        + ["--data-dir", str(tmp_path), "--manual-dir", str(manual)]
    )
    message = capsys.readouterr().err
    assert status == 1 and "apj data: error: " in message
    assert "resisc45" in message and "sun397" in message and str(manual) in message


def test_prepare_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prep.prepare(["imagenet"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="no TFDS builder"):
        prep.prepare(["nabirds"], data_dir=tmp_path)


def test_normalize_is_exact():
    # The reference's float32 ops: x / 255, then - mean, then / std (true divisions).
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    jitted = jax.jit(normalize, static_argnums=(1, 2))
    out = np.asarray(jitted(x, tuple(mean), tuple(std)))
    np.testing.assert_array_equal(out, (x / np.float32(255) - mean) / std)
    # One pass over the images: no image-sized temporaries (divisors, intermediate results).
    compiled = jitted.lower(x, tuple(mean), tuple(std)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < x.nbytes / 4
