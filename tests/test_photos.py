"""Your own photos at scale (data/image_cache.py, data/folder.py, images.decode): images decoded
once into a memory-mapped cache at the model's size, EXIF orientation, CMYK and HEIC/AVIF, and
bad input (decompression bombs, unreadable files and folders, link loops, names that are not
UTF-8) skipped, named and counted. The 12-megapixel scale is benchmarks/folder_decode.py's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapter_plus_jax import images as images_lib
from adapter_plus_jax.data import folder, image_cache, pipeline
from adapter_plus_jax.images import ImageError, decode

ORIENTATION = 0x0112  # the EXIF tag


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth image with a clear top-left corner, so that rotations are visible."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)
    image[:8, :8] = [255, 0, 0]
    return image


def _sideways(upright: np.ndarray, path: Path) -> None:
    """Store `upright` as a phone does: the pixels rotated, EXIF orientation 6 (rotate 90
    degrees clockwise to show)."""
    stored = Image.fromarray(np.rot90(upright, k=1))  # 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored.save(path, exif=exif.tobytes(), **({"quality": 100} if path.suffix == ".jpg" else {}))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = _photo()
    _sideways(upright, tmp_path / "side.png")
    np.testing.assert_array_equal(decode(tmp_path / "side.png"), upright)
    # JPEG (lossy): the same picture, and the same as training and predict read it.
    _sideways(upright, tmp_path / "side.jpg")
    Image.fromarray(upright).save(tmp_path / "up.jpg", quality=100)
    side, up = decode(tmp_path / "side.jpg"), decode(tmp_path / "up.jpg")
    assert side.shape == up.shape == upright.shape
    assert np.abs(side.astype(int) - up.astype(int)).mean() < 2
    spec = {"kind": "resize", "size": [32, 32], "uint8": True}
    a, b = (images_lib.preprocess_file(tmp_path / n, spec) for n in ("side.jpg", "up.jpg"))
    assert a.shape == (32, 32, 3) and np.abs(a - b).mean() < 2


def test_sideways_photo_predicts_as_upright(tmp_path: Path) -> None:
    """A model's prediction for a photo stored sideways (orientation 6) is the one for the
    same photo stored upright, through predict's preprocessing of a folder-trained task."""
    import jax

    from adapter_plus_jax.model import VisionTransformer, ViTConfig

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                       num_classes=5)  # fmt: skip
    module = VisionTransformer(config)
    params = module.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    spec = {"kind": "resize", "size": [32, 32], "uint8": True}
    for seed in range(4):
        upright = _photo(seed=seed)
        _sideways(upright, tmp_path / f"side{seed}.png")
        Image.fromarray(upright).save(tmp_path / f"up{seed}.png")
        x = np.stack([images_lib.preprocess_file(tmp_path / f"{n}{seed}.png", spec)
                      for n in ("side", "up")])  # fmt: skip
        logits = np.asarray(module.apply(params, x / 255.0))
        np.testing.assert_array_equal(logits[0], logits[1])  # so the same prediction


def test_cmyk_heic_and_avif_read_as_rgb(tmp_path: Path, monkeypatch) -> None:
    rgb = _photo()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = decode(tmp_path / "cmyk.jpg")
    assert cmyk.dtype == np.uint8 and cmyk.shape == rgb.shape
    assert np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 8
    import pillow_heif

    pillow_heif.register_heif_opener()  # to write the HEIC file
    Image.fromarray(rgb).save(tmp_path / "x.heic", quality=100)
    Image.fromarray(rgb).save(tmp_path / "x.avif", quality=100)
    for name in ("x.heic", "x.avif"):
        image = decode(tmp_path / name)
        assert image.shape == rgb.shape and np.abs(image.astype(int) - rgb).mean() < 12, name
    # Without the plugin: the file is refused with what to install.
    monkeypatch.setattr(images_lib, "_plugin", lambda module: False)
    with pytest.raises(ImageError, match="pip install pillow-heif"):
        decode(tmp_path / "x.heic")


def test_draft_decoding_stays_close_to_the_full_decode(tmp_path: Path) -> None:
    """A large JPEG resized to a small side is decoded at a reduced DCT scale; the resized
    pixels stay within the tolerance docs/performance.md states for photos (mean absolute
    difference from the full decode's under 4 of 255 levels) on a photo-like image: smooth
    colour, sensor-like noise. The reduced decode averages the noise that the full one samples."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((1024, 768), Image.BICUBIC), float)
    big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    drafted = images_lib.resized_uint8(tmp_path / "big.jpg", 64)
    full = images_lib.resize_bilinear_v1(decode(tmp_path / "big.jpg"), (64, 64))
    assert drafted.shape == (64, 64, 3)
    assert np.abs(drafted - np.clip(np.round(full), 0, 255)).mean() < 4


def _write(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo(40, 56, seed)).save(path)


def test_the_cache_is_reused_and_keyed_by_the_files(tmp_path: Path, monkeypatch) -> None:
    paths = [tmp_path / "img" / f"{i}.png" for i in range(5)]
    for i, p in enumerate(paths):
        _write(p, i)
    cache = tmp_path / "cache"
    first = image_cache.decode_files(paths, 16, cache, workers=2)
    assert isinstance(first.images, np.memmap) and first.images.shape == (5, 16, 16, 3)
    assert first.kept.tolist() == [0, 1, 2, 3, 4] and first.skipped == ()
    np.testing.assert_array_equal(first.images[3], images_lib.resized_uint8(paths[3], 16))

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_cache, "resized_uint8", no_decoding)
    again = image_cache.decode_files(paths, 16, cache)  # a resume, another seed, a rank
    np.testing.assert_array_equal(again.images, first.images)
    monkeypatch.undo()
    _write(paths[2], 99)  # a changed file: a new entry
    os.utime(paths[2], ns=(1, 1))
    changed = image_cache.decode_files(paths, 16, cache)
    assert not np.array_equal(changed.images[2], first.images[2])
    assert len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob(".*.npy"))
    # In memory only: the same pixels, nothing stored.
    memory = image_cache.decode_files(paths, 16, None)
    assert not isinstance(memory.images, np.memmap)
    np.testing.assert_array_equal(memory.images, changed.images)


def test_a_memory_mapped_split_is_read_batch_by_batch(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(12)]
    for i, p in enumerate(paths):
        _write(p, i)
    decoded = image_cache.decode_files(paths, 8, tmp_path / "cache")
    loader = pipeline.ArrayTrainLoader(decoded.images, np.arange(12) % 3,
                                       pipeline.LoaderOptions(4, seed=1))  # fmt: skip
    batches = list(loader.epoch(0))
    assert type(loader.images).__name__ == "_HostImages"
    seen = np.concatenate([np.asarray(b["image"]) for b in batches])
    assert seen.dtype == np.uint8 and seen.shape == (12, 8, 8, 3)
    order = loader.order(0)
    np.testing.assert_array_equal(seen, np.asarray(decoded.images)[order])


def test_bad_files_and_folders_are_skipped_named_and_counted(tmp_path: Path, monkeypatch):
    root = tmp_path / "photos"
    for c in ("cats", "dogs"):
        for i in range(3):
            _write(root / "train" / c / f"{i}.png", i)
            _write(root / "test" / c / f"{i}.png", 10 + i)
    Image.fromarray(_photo(80, 112, 7)).save(root / "train" / "cats" / "big.png")  # over the
    # pixel limit set below
    (root / "train" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    _write(root / "train" / "dogs" / name, 5)
    (root / "train" / "dogs" / "album").mkdir()
    _write(root / "train" / "dogs" / "album" / "nested.png", 6)
    os.symlink(root / "train" / "dogs", root / "train" / "dogs" / "album" / "loop")
    os.symlink(root / "train" / "dogs", root / "train" / "puppies")  # a second class, linked
    _write(root / "test" / "puppies" / "0.png", 20)
    (root / "train" / "cats" / "locked").mkdir()
    _write(root / "train" / "cats" / "locked" / "x.png", 8)
    locked = str(root / "train" / "cats" / "locked")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:  # as for a folder without read permission
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    _write(root / "train" / "dogs" / "private.png", 9)
    real_open = Image.open

    def image_open(path, *args, **kwargs):
        if str(path).endswith("private.png"):  # as for a file without read permission
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", image_open)
    big = Image.open(root / "train" / "cats" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", big.width * big.height - 1)
    scanned = folder.scan.__wrapped__(str(root))
    monkeypatch.setattr(folder, "scan", lambda r: scanned)
    data = folder.load.__wrapped__(str(root), ("train", "test"), 16, str(tmp_path / "cache"))
    skipped = dict(data["skipped"])
    assert folder.skipped_counts(data["skipped"]) == {
        "too_large": 1, "undecodable": 1, "unreadable": 2, "linked_twice": 2,
    }  # fmt: skip
    assert any(p.endswith("big.png") and "DecompressionBombError" in r for p, r in skipped.items())
    assert any(p.endswith("locked") for p in skipped)
    assert any(p.endswith("private.png") and "PermissionError" in r for p, r in skipped.items())
    # The file named in Latin-1 is read, and every path can be printed and stored as JSON.
    assert any(str(p).endswith(name) for p, _ in scanned.splits["train"])
    assert len(data["train"][1]) == 3 + 3 + 1 + 1  # cats; dogs, Latin-1 and nested
    import json

    json.dumps(list(skipped)).encode("ascii")


def test_reduced_decode_with_orientation(tmp_path: Path) -> None:
    """A large sideways JPEG, decoded at a reduced scale for a small input, is rotated too."""
    upright = np.asarray(Image.fromarray(_photo()).resize((640, 480), Image.BICUBIC))
    _sideways(upright, tmp_path / "side.jpg")
    Image.fromarray(upright).save(tmp_path / "up.jpg", quality=100)
    side, up = (images_lib.resized_uint8(tmp_path / n, 64) for n in ("side.jpg", "up.jpg"))
    assert np.abs(side.astype(int) - up.astype(int)).mean() < 3


def test_skips_the_environment_caused_are_retried(tmp_path: Path, monkeypatch) -> None:
    """A HEIC file skipped for want of pillow-heif is read by the next run once the plugin is
    there (the cache entry is not reused); a corrupt file's skip is. A run killed while writing
    leaves a temporary file that the next one removes."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    paths = [tmp_path / "a.png", tmp_path / "b.heic", tmp_path / "c.jpg"]
    _write(paths[0], 0)
    Image.fromarray(_photo()).save(paths[1])
    paths[2].write_bytes(b"\xff\xd8 not a jpeg")
    cache = tmp_path / "cache"
    (cache / f".{image_cache.cache_key(paths, 16)}.otherhost.1.npy").parent.mkdir()
    leftover = cache / f".{image_cache.cache_key(paths, 16)}.otherhost.1.npy"
    leftover.write_bytes(b"cut short")
    monkeypatch.setattr(images_lib, "_plugin", lambda module: False)
    first = image_cache.decode_files(paths, 16, cache)
    assert first.kept.tolist() == [0] and not leftover.exists()
    assert [r.split(":")[0] for _, r in first.skipped] == ["ImageError", "UnidentifiedImageError"]
    monkeypatch.undo()
    second = image_cache.decode_files(paths, 16, cache)
    assert second.kept.tolist() == [0, 1] and len(second.skipped) == 1
    np.testing.assert_array_equal(second.images[0], first.images[0])

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_cache, "resized_uint8", no_decoding)
    assert image_cache.decode_files(paths, 16, cache).kept.tolist() == [0, 1]  # reused now


def test_a_sliced_memory_map_is_refused(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    for i, p in enumerate(paths):
        _write(p, i)
    decoded = image_cache.decode_files(paths, 8, tmp_path / "cache")
    loader = pipeline.ArrayTrainLoader(decoded.images[1:], np.arange(3),
                                       pipeline.LoaderOptions(2))  # fmt: skip
    with pytest.raises(ValueError, match="whole .npy file"):
        next(loader.epoch(0))
