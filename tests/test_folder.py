"""Your own images (configs/folder.py, adapter_plus_jax/data/folder.py): a folder built here
with mixed formats and modes, odd class names and a corrupt file, trained end to end; the image
modes decoded to RGB; the holdout without a test folder; each bad layout failing before any
compute; rank selection (adapter_plus_jax/ranks.py) on a small folder with a grid of 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapter_plus_jax import config as cfglib
from adapter_plus_jax import experiment, ranks, runner
from adapter_plus_jax.data import folder
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.images import decode

CLASSES = ("0 zero", "Katze ü", "dog-2")  # sorted: digits, upper case, lower case


def _image(kind: str, rng: np.random.Generator) -> Image.Image:
    rgb = rng.integers(0, 256, (20 + int(rng.integers(0, 12)), 24, 3), dtype=np.uint8)
    if kind == "L":
        return Image.fromarray(rgb[..., 0])
    if kind == "P":
        return Image.fromarray(rgb).convert("P")
    if kind == "RGBA":
        return Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=-1))
    if kind == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    return Image.fromarray(rgb)


FORMATS = [("jpg", "RGB"), ("png", "L"), ("png", "P"), ("png", "RGBA"), ("png", "I;16"),
           ("bmp", "RGB"), ("gif", "P"), ("webp", "RGB")]  # fmt: skip


def make_folder(root: Path, splits=("train", "test"), per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                ext, mode = FORMATS[i % len(FORMATS)]
                _image(mode, rng).save(root / split / c / f"{i}.{ext}")
    return root


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(6 * 4, dtype=np.uint16).reshape(6, 4) * 2000
    Image.fromarray(gray).save(tmp_path / "16.png")
    assert decode(tmp_path / "16.png")[2, 1, 0] == round(int(gray[2, 1]) * 255 / 65535)
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # red, fully transparent: alpha is dropped
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert decode(tmp_path / "a.png")[0, 0].tolist() == [200, 0, 0]
    palette = Image.new("P", (2, 2), 1)  # every pixel: entry 1 of the palette
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * (3 * 254))
    palette.save(tmp_path / "p.gif")
    assert decode(tmp_path / "p.gif")[1, 1].tolist() == [10, 20, 30]
    for name in ("16.png", "a.png", "p.gif"):
        image = decode(tmp_path / name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3


def _tiny(config) -> None:
    config.model.pretrained = False
    config.model.timm_kwargs = dict(img_size=32, patch_size=16, embed_dim=32, depth=1,
                                    num_heads=2)  # fmt: skip
    config.model.dtype = "float32"
    config.batch_size, config.eval_batch_size = 4, 8
    config.warmup_epochs = 1


def test_trains_end_to_end_and_records_the_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images")
    corrupt = root / "train" / CLASSES[1] / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = cfglib.load_config(f"configs/folder.py:{root},epochs=2")
    _tiny(config)
    results = runner.run(config, tmp_path / "run")
    assert results["class_names"] == sorted(CLASSES)
    assert results["skipped_images"] == [str(corrupt)]
    assert results["skipped_counts"] == {"undecodable": 1}
    assert results["num_train"] == 3 * 8 and results["num_eval"] == 3 * 8
    assert results["eval_set"] == "test/" and 0.0 <= results["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["class_names"] == list(
        sorted(CLASSES)
    )


def test_without_a_test_folder_a_stratified_holdout(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images", splits=("train", "val"), per_class=10)
    scanned = folder.scan(str(root))
    train, test, note = folder.select(scanned, "train+val", "test")
    held = [y for _, y in test]
    assert [held.count(c) for c in range(3)] == [2, 2, 2] and "20% of each class" in note
    assert len(train) == 3 * 8 + 3 * 10  # the rest of train/, and val/
    assert not {p for p, _ in test} & {p for p, _ in train}
    assert folder.select(scanned, "train+val", "test")[1] == test  # seeded
    # With val/ present, rank selection trains on train/ and scores on val/.
    train, val, note = folder.select(scanned, "train", "val")
    assert (train, val, note) == (scanned.splits["train"], scanned.splits["val"], None)
    with pytest.raises(SetupError, match="cannot be in both"):
        folder.select(scanned, "train+val", "val")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("no_train", "has no train/ folder"),
        ("no_classes", "has no class folders"),
        ("one_class", "has one class folder"),
        ("unknown_test_class", "has classes that train/ does not: \\['cow'\\]"),
        ("no_images", "holds no image file"),
    ],
)
def test_bad_layouts_fail_before_any_compute(tmp_path: Path, layout, message, monkeypatch):
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
    if layout in ("no_classes",):
        (root / "train").mkdir()
    if layout in ("one_class", "unknown_test_class", "no_images"):
        make_folder(root, splits=("train",), per_class=2)
    if layout == "one_class":
        for c in CLASSES[1:]:
            for p in (root / "train" / c).iterdir():
                p.unlink()
            (root / "train" / c).rmdir()
    if layout == "unknown_test_class":
        (root / "test" / "cow").mkdir(parents=True)
        _image("RGB", np.random.default_rng(0)).save(root / "test" / "cow" / "0.png")
    if layout == "no_images":
        (root / "train" / "empty").mkdir()
        (root / "train" / "empty" / "notes.txt").write_text("no image here")
    config = cfglib.load_config(f"configs/folder.py:{root}")
    monkeypatch.setattr(experiment, "build_model", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(SetupError, match=message):
        runner.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rank_choice_prefers_the_smaller_rank_on_ties() -> None:
    assert ranks.choose({1: 0.5, 2: 0.7, 4: 0.7, 8: 0.6}) == 2
    assert ranks.choose({8: 0.6, 1: 0.6}) == 1


def test_rank_selection_trains_on_train_scores_on_val_and_retrains(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "images", splits=("train", "val", "test"), per_class=4)
    config = cfglib.load_config(f"configs/folder.py:{root},epochs=1")
    _tiny(config)
    calls, run = [], runner.run

    def spy(c, where, *args, **kwargs):
        results = run(c, where, *args, **kwargs)
        calls.append((c.adapter.dim, c.train_split, c.eval_split, Path(where).name, results))
        return results

    monkeypatch.setattr(runner, "run", spy)
    record = ranks.select_rank(config, [2, 1], tmp_path / "select")
    val = {d: r["test_accuracy"] for d, _, _, name, r in calls if name != "final"}
    best = ranks.choose(val)
    assert [c[:4] for c in calls] == [
        (1, "train", "val", "rank1"),
        (2, "train", "val", "rank2"),
        (best, "train+val", "test", "final"),
    ]
    # The rank runs saw train/ only and were scored on val/; the final run train/ + val/.
    assert [(r["num_train"], r["num_eval"], r["eval_set"]) for *_, r in calls] == [
        (12, 12, "val/"), (12, 12, "val/"), (24, 12, "test/")
    ]
    assert record["chosen_rank"] == best and record["val_accuracy"] == {"1": val[1], "2": val[2]}
    assert record["test_accuracy"] == calls[-1][-1]["test_accuracy"]
    saved = json.loads((tmp_path / "select" / ranks.SELECTION_FILE).read_text())
    assert saved == record
    logs = {d: (tmp_path / "select" / d / "metrics.jsonl").read_bytes()
            for d in ("rank1", "rank2", "final")}  # fmt: skip
    assert ranks.select_rank(config, [1, 2], tmp_path / "select") == record  # all finished
    for d, log in logs.items():
        assert (tmp_path / "select" / d / "metrics.jsonl").read_bytes() == log  # not retrained


def test_rank_selection_configs_for_every_dataset() -> None:
    for spec, key in [("configs/vtab.py:dtd", "adapter"), ("configs/fgvc.py:cub", "adapter"),
                      ("configs/tfds.py:cifar10", "adapter"),
                      ("configs/vtab.py:dtd,method=lora", "lora")]:  # fmt: skip
        config = cfglib.load_config(spec)
        c = ranks.with_rank(config, 16, ranks.SELECTION_SPLITS[config.dataset])
        assert c[key].dim == 16 and config[key].dim != 16
        assert (c.train_split, c.eval_split) == ranks.SELECTION_SPLITS[config.dataset]
    assert ranks.SELECTION_SPLITS["vtab"] == ("train800", "val200")  # the paper's choice
    with pytest.raises(SetupError, match="needs adapters or LoRA"):
        ranks.with_rank(cfglib.load_config("configs/vtab.py:dtd,method=vpt"), 4, ("a", "b"))
