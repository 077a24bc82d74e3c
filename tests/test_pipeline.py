"""The in-memory input pipeline (adapter_plus_jax.data.pipeline): the same batches, padding and
sharding rules as the streamed tf.data one, without TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from adapter_plus_jax.data import pipeline

ROOT = Path(__file__).resolve().parents[1]


def dataset(n: int = 30, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """n images whose pixels all equal their index (so a batch names its examples)."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    return np.ascontiguousarray(images), np.arange(n) % 7


def rows_of(batches) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(np.asarray(b["image"]), np.asarray(b["label"]), np.asarray(b["mask"]))
            for b in batches]  # fmt: skip


def ids(image_batch: np.ndarray) -> np.ndarray:
    return image_batch[:, 0, 0, 0].astype(int)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_epochs_are_seeded_permutations(drop_remainder):
    images, labels = dataset()
    options = pipeline.LoaderOptions(8, seed=7)
    loader = pipeline.ArrayTrainLoader(images, labels, options, drop_remainder=drop_remainder)
    assert loader.steps_per_epoch == (3 if drop_remainder else 4)
    both = rows_of(loader.epochs(1, 2))
    assert len(both) == 2 * loader.steps_per_epoch
    for e, epoch in enumerate((both[: loader.steps_per_epoch], both[loader.steps_per_epoch :])):
        x = np.concatenate([b[0] for b in epoch])
        y = np.concatenate([b[1] for b in epoch])
        mask = np.concatenate([b[2] for b in epoch])
        assert x.dtype == np.float32 and x.shape[1:] == (4, 4, 3)
        # The order is numpy's permutation from the epoch's seed; padding is zeros, label 0.
        shuffle_seed, _ = pipeline.epoch_seeds(7, 1 + e)
        expected = np.random.default_rng(shuffle_seed).permutation(30)[: len(x)]
        np.testing.assert_array_equal(ids(x)[mask], expected[: mask.sum()])
        np.testing.assert_array_equal(y[mask], labels[ids(x)[mask]])
        assert mask.sum() == (24 if drop_remainder else 30)
        assert not x[~mask].any() and not y[~mask].any()
    assert not np.array_equal(both[0][0], both[loader.steps_per_epoch][0])  # reshuffled
    # A fresh loader replays epoch 2 exactly (what a resume asks for).
    again = rows_of(pipeline.ArrayTrainLoader(images, labels, options,
                                              drop_remainder=drop_remainder).epoch(2))  # fmt: skip
    for a, b in zip(again, both[loader.steps_per_epoch :], strict=True):
        assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def as_process(loader, rows: tuple[int, int]):
    """Make `loader` produce the rows [lo, hi) of each global batch, as the process owning
    them would (there is one process here)."""
    loader._batcher.rows = rows
    loader._batcher.local_batch = rows[1] - rows[0]
    return loader


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_batches_do_not_depend_on_the_process_count(drop_remainder):
    images, labels = dataset()

    def loader():
        options = pipeline.LoaderOptions(8, seed=3)
        return pipeline.ArrayTrainLoader(images, labels, options, drop_remainder=drop_remainder)

    whole = list(loader().local_rows(0, 2))
    parts = [list(as_process(loader(), rows).local_rows(0, 2)) for rows in [(0, 4), (4, 8)]]
    assert len(whole) == len(parts[0]) == len(parts[1]) == (6 if drop_remainder else 8)
    for full, a, b in zip(whole, *parts, strict=True):
        np.testing.assert_array_equal(full, np.concatenate([a, b]))
    padding = np.concatenate(whole) < 0
    assert padding.sum() == (0 if drop_remainder else 2 * 2)  # 30 examples in 4 batches of 8


def test_same_examples_as_the_streamed_loader():
    """An epoch of the in-memory loader holds the examples of tf.data's, with the same pixels,
    labels, batch shapes and padding; only the order differs (numpy's permutation where tf.data
    shuffles with TF's own generator, which cannot be reproduced without TensorFlow)."""
    import tensorflow as tf

    from adapter_plus_jax.data import tfdata

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 9, 7, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(30)  # names the example
    labels = np.arange(30) % 7
    options = pipeline.LoaderOptions(8, seed=11)
    examples = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    streamed = tfdata.TrainLoader(
        examples, 30, lambda ex, _: (tfdata.resize_bilinear_v1(ex["image"], 12), ex["label"]),
        options, drop_remainder=False, cache=True,
    )  # fmt: skip
    memory = pipeline.ArrayTrainLoader(*tfdata.read_into_memory(examples, 12), options,
                                       drop_remainder=False)  # fmt: skip
    a, b = rows_of(streamed.epoch(0)), rows_of(memory.epoch(0))
    assert [[x.shape for x in r] for r in a] == [[x.shape for x in r] for r in b]
    by_id = []
    for rows in (a, b):
        x, y, mask = (np.concatenate(k) for k in zip(*rows, strict=True))
        assert x.dtype == np.float32 and mask.sum() == 30 and not x[~mask].any()
        order = np.argsort(ids(x[mask]))
        by_id.append((x[mask][order], y[mask][order]))
    np.testing.assert_array_equal(ids(by_id[0][0]), np.arange(30))
    np.testing.assert_array_equal(by_id[0][0], by_id[1][0])  # TF's resize, bit for bit
    np.testing.assert_array_equal(by_id[0][1], by_id[1][1])


def test_eval_counts_every_example_once():
    images, labels = dataset(n=21)
    options = pipeline.LoaderOptions(eval_batch_size=8)
    loader = pipeline.ArrayEvalLoader(images, labels, options)
    assert len(loader) == 3
    x, y, mask = (np.concatenate(k) for k in zip(*rows_of(loader), strict=True))
    assert x.dtype == np.float32 and mask.sum() == 21 and not mask[21:].any()
    assert not x[~mask].any() and not y[~mask].any()
    np.testing.assert_array_equal(ids(x)[mask], np.arange(21))
    np.testing.assert_array_equal(y[mask], labels)
    # Over 4 processes: each its own slice, all with as many batches (they step together).
    seen = []
    for p in range(4):
        part = pipeline.ArrayEvalLoader(images, labels, options, process=(p, 4))
        rows = list(part.local_rows())
        assert len(rows) == 1  # 21 / 4 -> at most 6 examples, one local batch of 8
        seen += [i for r in rows for i in r if i >= 0]
    assert seen == list(range(21))


@pytest.mark.parametrize("processes", [1, 3, 4])
def test_process_slices_cover_the_split_once(processes):
    seen, largest = [], set()
    for index in range(processes):
        part, most = pipeline.process_slice(22, index, processes)
        seen += list(range(22))[part]
        largest.add(most)
        assert part.stop - part.start <= most
    assert seen == list(range(22)) and len(largest) == 1


def test_prefetch_passes_errors_and_stops():
    def broken():
        yield 1
        raise RuntimeError("bad batch")

    got = pipeline.prefetch(broken())
    assert next(got) == 1
    with pytest.raises(RuntimeError, match="bad batch"):
        next(got)
    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    it = pipeline.prefetch(endless(), size=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # returns once the thread has stopped
    count = len(produced)
    assert not [t for t in threading.enumerate() if t.name == "apj-prefetch"]
    assert count < 10 and len(produced) == count
    # A producer that has finished while its queue is full stops too when closed early.
    short = pipeline.prefetch(iter(range(3)), size=2)
    assert next(short) == 0
    time.sleep(0.3)  # the producer has queued the rest and its end
    short.close()
    assert not [t for t in threading.enumerate() if t.name == "apj-prefetch"]


# ----------------------------------------------------------------------------------------------
# Without TensorFlow.

NO_TF = """
raise ImportError("TensorFlow is not installed here (blocked by the test)")
"""


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory) -> dict[str, str]:
    """An environment in which importing tensorflow or tensorflow_datasets fails, in this
    process and in any process it starts (the huge-page restart included)."""
    blocked = tmp_path_factory.mktemp("no_tf")
    for name in ("tensorflow", "tensorflow_datasets"):
        (blocked / name).mkdir()
        (blocked / name / "__init__.py").write_text(NO_TF)
    return {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}", "JAX_PLATFORMS": "cpu"}


def test_tensorflow_is_blocked(no_tensorflow):
    proc = subprocess.run([sys.executable, "-c", "import tensorflow"], env=no_tensorflow,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


def test_tensorboard_events_without_importing_tensorflow(tmp_path):
    """Runs write TensorBoard events without importing TensorFlow, even where it is installed
    (this environment has it)."""
    script = (
        "import sys; from pathlib import Path; from adapter_plus_jax.workdir import _Scalars\n"
        "w = _Scalars(Path(sys.argv[1])); w.scalar('loss', 0.5, 3); w.close()\n"
        "print('tensorflow' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 0.5)]


def write_folder(root: Path, classes: int = 3, per_class: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


TINY_VIT = ["--config.model.name=vit_tiny_patch16_224", "--config.model.pretrained=False",
            "--config.model.timm_kwargs={'img_size': 32, 'patch_size': 16, 'embed_dim': 32, "
            "'depth': 1, 'num_heads': 2}",
            "--config.model.dtype=float32"]  # fmt: skip


@pytest.mark.parametrize("which", ["demo", "folder"])
def test_trains_without_tensorflow(tmp_path, no_tensorflow, which):
    if which == "demo":
        args = ["--config", "configs/demo.py:epochs=1", "--config.batch_size=100"]
    else:
        write_folder(tmp_path / "images")
        args = ["--config", f"configs/folder.py:{tmp_path / 'images'},epochs=2", *TINY_VIT,
                "--config.batch_size=6", "--config.eval_batch_size=4"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "main.py", *args, "--workdir", str(tmp_path / "run")],
        cwd=ROOT, env=no_tensorflow, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout
    assert (tmp_path / "run" / "results.json").is_file()
