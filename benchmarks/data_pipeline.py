"""Throughput of the VTAB-1k input pipeline on this machine.

Builds a local TFDS dataset of realistic JPEGs (500x375, like many VTAB natural images), then
measures with the real loaders (`adapter_plus_jax.data`):

- train: train800val200 (1000 images), as medians over `--rounds` interleaved rounds:
  - streamed after the first epoch, i.e. from tf.data's uint8 cache (shuffle, TF1 bilinear
    resize to 224, batch): tf.data alone (the numpy batches, no jax arrays) and as jax arrays;
  - in memory, as runs read the 1k splits now: decoded and resized once (timed), then each
    batch gathered on the devices by the indices numpy shuffles and shards;
  each timed alike: the steady rate from the first batch to the last (what every step of a run
  pays), and the one-time costs of an iterator (building it up to its first batch; closing
  it, which tf.data's AUTOTUNE thread sometimes holds up), which a run pays once;
- test: a streamed split (TFDS read, JPEG decode, resize), tf.data alone then jax arrays;
- peak host RAM of the process (ru_maxrss).

Usage: python benchmarks/data_pipeline.py [--workdir DIR] [--epochs 6] [--test-size 2000]
       [--batch 64] [--rounds 5] [--height 375 --width 500] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from adapter_plus_jax.data import tfds_io, vtab, vtab_loaders  # noqa: E402
from adapter_plus_jax.data.pipeline import LoaderOptions  # noqa: E402

HEIGHT, WIDTH = 375, 500  # the default JPEG size
TRAIN_SIZE = 1250  # T = 80% = 1000: val200 = train[1000:1200], disjoint from train[:800]


class BenchJpegs(tfds.core.GeneratorBasedBuilder):
    """JPEGs from `manual_dir/{train,test}/*.jpg`, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "JPEGs written by the benchmark."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(dl_manager.manual_dir / s) for s in ("train", "test")}

    def _generate_examples(self, folder):
        for i, path in enumerate(sorted(folder.glob("*.jpg"))):
            yield path.name, {"image": path, "label": i % 10}


def write_jpegs(folder: Path, count: int, seed: int, height: int, width: int) -> None:
    """Smooth random images (upsampled noise plus grain), so that JPEG sizes are realistic
    (~30-60 KB at 500x375) rather than those of white noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.uniform(0, 255, (max(height // 25, 2), max(width // 25, 2), 3))
        image = tf.image.resize(coarse.astype(np.float32), [height, width], "bicubic")
        image = image + rng.normal(0, 6, (height, width, 3))
        image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
        (folder / f"{i:05d}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())


def prepare(workdir: Path, test_size: int, height: int, width: int) -> Path:
    data_dir = workdir / "tfds"
    if not (data_dir / "bench_jpegs" / "1.0.0").exists():
        write_jpegs(workdir / "manual" / "train", TRAIN_SIZE, 0, height, width)
        write_jpegs(workdir / "manual" / "test", test_size, 1, height, width)
        BenchJpegs(data_dir=data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=workdir / "manual")
        )
    return data_dir


def rate(batches) -> tuple[float, int]:
    """(real images per second, batches) of consuming `batches` (padding not counted)."""
    start, images, n = time.perf_counter(), 0, 0
    for batch in batches:
        images += int(np.asarray(batch["mask"]).sum())  # also waits for the jax arrays
        n += 1
    return images / (time.perf_counter() - start), n


@dataclasses.dataclass(frozen=True)
class Timing:
    """One pass over an iterator: its steady rate and its one-time costs."""

    steady: float  # real images/s from the first batch to the last (the first not counted)
    setup_s: float  # building the iterator and getting its first batch
    close_s: float  # from the last batch to the iterator gone (its end and its deletion)
    batches: int


def timed(make: Callable[[], Iterator[Mapping[str, Any]]]) -> Timing:
    """Times consuming `make()` the same way for every form: a generator that closes its
    tf.data iterator inside its last `next` and a bare iterator deleted here both count their
    closing in `close_s`."""
    start = time.perf_counter()
    iterator, images, n = iter(make()), 0, 0
    for batch in iterator:
        real = int(np.asarray(batch["mask"]).sum())  # also waits for the jax arrays
        last = time.perf_counter()  # the arrival of the last batch, once the loop is over
        if n == 0:
            first = last
        else:
            images += real
        n += 1
    del iterator, batch
    end = time.perf_counter()
    return Timing(images / (last - first), first - start, end - last, n)


def interleaved(
    label: str, forms: Mapping[str, Callable[[], Iterator[Mapping[str, Any]]]], rounds: int
) -> dict[str, list[Timing]]:
    """`rounds` timed passes of every form, interleaved, the order reversed every round."""
    timings: dict[str, list[Timing]] = {k: [] for k in forms}
    for r in range(rounds):
        for name in list(forms)[:: 1 if r % 2 == 0 else -1]:
            t = timed(forms[name])
            timings[name].append(t)
            print(
                f"{label} round {r + 1}/{rounds}: {name} {t.steady:,.0f} img/s steady, "
                f"setup {t.setup_s * 1e3:.0f} ms, close {t.close_s * 1e3:.0f} ms",
                flush=True,
            )
    return timings


def steady(timings: list[Timing]) -> float:
    return statistics.median(t.steady for t in timings)


def one_time(timings: Mapping[str, list[Timing]]) -> str:
    """The one-time costs of the iterators of each form: median setup, largest close."""
    return "; ".join(
        f"{name}: setup {statistics.median(t.setup_s for t in ts) * 1e3:.0f} ms, close at most "
        f"{max(t.close_s for t in ts) * 1e3:.0f} ms"
        for name, ts in timings.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs after the first")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per form")
    parser.add_argument("--height", type=int, default=HEIGHT, help="of the JPEGs written")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    train_steps = TRAIN_SIZE * 4 // 5 // max(args.batch, 1) * args.epochs
    if args.batch < 1 or train_steps < 2 or args.test_size < 2 * args.batch:
        parser.error(  # a steady rate is timed from a pass's first batch to its last
            f"need at least 2 batches per pass: batch {args.batch} gives {train_steps} train "
            f"steps and {args.test_size} test images; lower --batch or raise --epochs/--test-size"
        )

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        data_dir = prepare(workdir, args.test_size, args.height, args.width)
        spec = vtab.TaskSpec(
            "bench", "bench_jpegs:1.0.0", "1.0.0", "Natural", 10, TRAIN_SIZE, train_percent=80
        )
        kw = dict(options=LoaderOptions(args.batch, args.batch), data_dir=data_dir)
        # The same split streamed through tf.data (its decoded uint8 images cached, resized
        # every epoch) and read once into memory (resized once, batched with numpy).
        builder = tfds_io.tfds_builder(spec, data_dir)
        split = vtab_loaders.vtab_splits(spec, builder)["train800val200"]
        loader_args = (builder, split, spec.image_fn, spec.label_fn, kw["options"])
        raw = tfds_io.tfds_train_loader(*loader_args, cache=True)
        first, _ = rate(raw.epoch(0))
        start = time.perf_counter()
        memory = tfds_io.tfds_train_loader(*loader_args, cache=False, in_memory=True)
        read_s = time.perf_counter() - start
        train = interleaved(
            "train",
            {
                "tf.data": lambda: raw.dataset(1, args.epochs).as_numpy_iterator(),
                "jax": lambda: raw.epochs(1, args.epochs),
                "memory": lambda: memory.epochs(1, args.epochs),
            },
            args.rounds,
        )
        test_loader = vtab_loaders.vtab_eval_loader(spec, "test", **kw)
        test = interleaved(
            "test",
            {
                "tf.data": lambda: test_loader.dataset().as_numpy_iterator(),
                "jax": lambda: test_loader,
            },
            args.rounds,
        )
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    size = f"{args.height}x{args.width}"
    lines = [
        f"# Input pipeline: {cores} CPU cores, load average {load}; batch {args.batch}, "
        f"{size} JPEGs; medians of {args.rounds} interleaved rounds",
        "",
        "| pipeline | images/s | vs tf.data alone |",
        "|---|---|---|",
        f"| train, epoch 0 (decode + fill the uint8 cache) | {first:,.0f} | |",
        f"| train, read into memory once (decode + resize: {read_s:.1f} s) | "
        f"{len(memory.labels) / read_s:,.0f} | |",
        f"| train, epochs 1-{args.epochs} from cache ({train['jax'][0].batches} steps), "
        f"tf.data alone | {steady(train['tf.data']):,.0f} | 1.00x |",
        f"| the same as jax arrays, as runner.py got them before (tf.data) | "
        f"{steady(train['jax']):,.0f} | {steady(train['jax']) / steady(train['tf.data']):.2f}x |",
        f"| in memory (no TensorFlow; batches gathered on the devices): what runs get now | "
        f"{steady(train['memory']):,.0f} | "
        f"{steady(train['memory']) / steady(train['tf.data']):.2f}x |",
        f"| test, streamed ({args.test_size} images, decode each time), tf.data alone | "
        f"{steady(test['tf.data']):,.0f} | 1.00x |",
        f"| the same as jax arrays, as evaluation gets them | {steady(test['jax']):,.0f} | "
        f"{steady(test['jax']) / steady(test['tf.data']):.2f}x |",
        "",
        "Steady rates, from each pass's first batch to its last. Once per iterator (a run makes "
        "one for all its epochs, and one per evaluation), building it up to its first batch and "
        "closing it (tf.data's AUTOTUNE thread sometimes holds the close for up to a second): "
        f"train {one_time(train)}; test {one_time(test)}.",
        "",
        f"peak host RAM (ru_maxrss): {peak_mib:,.0f} MiB",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
