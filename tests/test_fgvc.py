"""FGVC input pipeline (adapter_plus_jax.data.fgvc), offline: VPT's json layout built here, the TFDS
source mocked, and the transforms against timm's / torchvision's (close, not pixel-identical).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from adapter_plus_jax.data import fgvc
from adapter_plus_jax.data.pipeline import LoaderOptions

FOUR = LoaderOptions(4, 4)  # batches of 4


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A natural-looking test image: coarse random noise upsampled, so that resampling filters
    differ by little (on white noise every filter difference shows)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 16 + 2, width // 16 + 2, 3))
    big = tf.image.resize(coarse.astype(np.float32), [height, width], "bicubic")
    return np.clip(np.round(big.numpy()), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# VPT's json layout.


@pytest.fixture(scope="module")
def vpt_root(tmp_path_factory) -> Path:
    """A 'cub'-like dataset: images/<class dir>/<n>.jpg (and one PNG), class ids 3/7/12 in
    train.json (4 images) and test.json (5), 10/20/30 in val.json (3)."""
    root = tmp_path_factory.mktemp("cub")
    splits = {
        "train": {3: 2, 7: 1, 12: 1},
        "val": {10: 1, 20: 1, 30: 1},
        "test": {3: 2, 7: 2, 12: 1},
    }
    n = 0
    for split, counts in splits.items():
        entries = {}
        for cid, count in counts.items():
            for _ in range(count):
                rel = f"{cid:03d}.class/{n}.{'png' if n == 0 else 'jpg'}"
                path = root / "images" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(smooth_image(120 + 7 * n, 160 - 5 * n, n)).save(path)
                entries[rel] = cid
                n += 1
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def test_json_class_ids_are_remapped_per_file(vpt_root):
    _, train = fgvc.read_json_split(vpt_root / "train.json")
    _, val = fgvc.read_json_split(vpt_root / "val.json")
    assert train == [0, 0, 1, 2] and val == [0, 1, 2]
    paths, labels = fgvc.json_examples(fgvc.FGVC["cub"], "trainval", vpt_root)
    assert labels == [0, 0, 1, 2, 0, 1, 2]
    assert all(Path(p).is_file() and "/images/" in p for p in paths)


def test_json_train_loader(vpt_root):
    kw = dict(options=FOUR, root=vpt_root)
    loader = fgvc.fgvc_train_loader("cub", **kw)
    assert loader.steps_per_epoch == 2  # 7 examples, drop_last=False
    batches = [{k: np.asarray(v) for k, v in b.items()} for b in loader.epoch(0)]
    assert len(batches) == 2
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert images.shape == (8, 224, 224, 3) and images.dtype == np.float32
    assert mask.sum() == 7 and not mask[7:].any()
    assert images.min() >= 0 and images.max() <= 255
    again = [np.asarray(b["image"]) for b in fgvc.fgvc_train_loader("cub", **kw).epoch(0)]
    np.testing.assert_array_equal(images, np.concatenate(again))
    other = [np.asarray(b["image"]) for b in loader.epoch(1)]
    assert not np.array_equal(images, np.concatenate(other))  # new crops and order


def test_json_eval_loader(vpt_root):
    loader = fgvc.fgvc_eval_loader("cub", options=FOUR, root=vpt_root)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])
    assert mask.sum() == 5 and sorted(labels[mask]) == [0, 0, 1, 1, 2]


def test_process_slices():
    for count in [0, 5, 7, 12]:
        for processes in [1, 2, 3, 5]:
            slices = [fgvc._process_slice(count, i, processes) for i in range(processes)]
            assert [i for s in slices for i in range(s.start, s.stop)] == list(range(count))
            assert max(s.stop - s.start for s in slices) == slices[0].stop


def test_sources_need_the_right_layout():
    with pytest.raises(ValueError, match="no TFDS builder"):
        fgvc.fgvc_train_loader("nabirds", options=FOUR)
    with pytest.raises(ValueError, match="root="):
        fgvc.fgvc_eval_loader("cub", "val", options=FOUR)


# ----------------------------------------------------------------------------------------------
# TFDS source (mocked: encoded random images).


def test_tfds_source_mocked():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        train = fgvc.fgvc_train_loader("cub", options=FOUR)
        batches = list(train.epoch(0))
        evaluation = list(fgvc.fgvc_eval_loader("oxfordflower", options=FOUR))
    assert len(batches) == 2 and len(evaluation) == 2
    for b in batches + evaluation:
        assert b["image"].shape == (4, 224, 224, 3)
        assert np.asarray(b["image"]).min() >= 0 and np.asarray(b["image"]).max() <= 255
    for loaded, classes in [(batches, 200), (evaluation, 102)]:
        mask = np.concatenate([np.asarray(b["mask"]) for b in loaded])
        labels = np.concatenate([np.asarray(b["label"]) for b in loaded])
        assert mask.sum() == 6 and labels.max() < classes


# ----------------------------------------------------------------------------------------------
# Transforms.


def window(height: int, width: int, seed: int) -> tuple[int, ...]:
    out = fgvc.random_resized_crop_window(
        tf.constant(height), tf.constant(width), tf.constant([seed, 1])
    )
    return tuple(int(v) for v in out)


def test_random_resized_crop_window():
    windows = [window(375, 500, s) for s in range(150)]
    assert window(375, 500, 5) == windows[5]  # a function of the seed
    areas = []
    for top, left, h, w in windows:
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        areas.append(h * w / (375 * 500))
        if (h, w) != (375, 375):  # not the fallback (rare for this shape)
            assert 0.75 - 0.02 <= w / h <= 4 / 3 + 0.02
    # Area fraction U(0.08, 1), rejected above ~0.75 of the image when the box cannot fit.
    assert 0.075 <= min(areas) and max(areas) <= 1.0
    assert 0.08 < np.median(areas) < 0.6
    assert len(set(windows)) > 140
    # No attempt fits a 10x1000 strip: timm's fallback is the centre crop with ratio 4/3.
    assert window(10, 1000, 0) == (0, (1000 - 13) // 2, 10, 13)
    assert window(1000, 10, 0) == ((1000 - 13) // 2, 0, 13, 10)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resized_crop_close_to_torchvision(method):
    image = smooth_image(375, 500)
    top, left, h, w = 40, 60, 250, 300
    ours = fgvc.resized_crop(tf.constant(image), (top, left, h, w), method).numpy()
    mode = InterpolationMode.BILINEAR if method == "bilinear" else InterpolationMode.BICUBIC
    theirs = np.asarray(TF.resized_crop(Image.fromarray(image), top, left, h, w, [224, 224], mode))
    diff = np.abs(ours - theirs.astype(np.float32))
    assert ours.shape == (224, 224, 3) and (ours == np.round(ours)).all()
    assert diff.mean() < 0.5 and diff.max() <= 2  # measured: 0.2 and 1


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (300, 300), (257, 1000)])
def test_eval_image_close_to_timm(shape):
    image = smooth_image(*shape, seed=3)
    ours = fgvc.eval_image(tf.constant(image)).numpy()
    pipeline = transforms.Compose(
        [transforms.Resize(256, InterpolationMode.BICUBIC), transforms.CenterCrop(224)]
    )
    theirs = np.asarray(pipeline(Image.fromarray(image))).astype(np.float32)
    diff = np.abs(ours - theirs)
    assert ours.shape == (224, 224, 3)
    assert diff.mean() < 0.5 and diff.max() <= 2  # measured: 0.2 and 1


def test_train_image_is_seeded():
    image = tf.constant(smooth_image(200, 300))
    a = fgvc.train_image(image, tf.constant([1, 2], tf.int64)).numpy()
    b = fgvc.train_image(image, tf.constant([1, 2], tf.int64)).numpy()
    c = fgvc.train_image(image, tf.constant([1, 3], tf.int64)).numpy()
    assert a.shape == (224, 224, 3) and 0 <= a.min() and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_augmentation_flips_and_interpolates_at_random():
    """Each augmented image is its seeded crop resized bilinear or bicubic, flipped or not, and
    over 400 seeds each of the four combinations comes up about a quarter of the time (timm's
    RandomResizedCropAndInterpolation with interpolation='random', then a flip with p=0.5).
    Bounds: 100 +- 5 binomial standard deviations (8.7)."""
    height, width = 60, 90
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))
    combos = list(itertools.product(("bilinear", "bicubic"), (False, True)))

    @tf.function
    def augmented_and_candidates(seed):
        crop_seed = tf.random.experimental.stateless_split(seed, 3)[0]
        crop = fgvc.random_resized_crop_window(height, width, crop_seed)
        candidates = []
        for method, flip in combos:
            candidate = fgvc.resized_crop(image, crop, method)
            candidates.append(tf.image.flip_left_right(candidate) if flip else candidate)
        return fgvc.train_image(image, seed), tf.stack(candidates)

    counts = dict.fromkeys(combos, 0)
    for s in range(400):
        out, candidates = augmented_and_candidates(tf.constant([7, s], tf.int64))
        matches = [c for c, cand in zip(combos, candidates.numpy(), strict=True)
                   if np.array_equal(out.numpy(), cand)]  # fmt: skip
        assert len(matches) == 1, (s, matches)
        counts[matches[0]] += 1
    assert all(abs(n - 100) <= 5 * 8.7 for n in counts.values()), counts


def test_decode_rgb_handles_gray_and_png():
    gray = np.random.default_rng(0).integers(0, 256, (20, 30, 1)).astype(np.uint8)
    for encoded in [tf.io.encode_png(gray), tf.io.encode_jpeg(gray, quality=100)]:
        rgb = fgvc.decode_rgb({"image": encoded}).numpy()
        assert rgb.shape == (20, 30, 3) and (rgb[..., 0] == rgb[..., 2]).all()
