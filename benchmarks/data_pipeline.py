"""Throughput of the VTAB-1k input pipeline on this machine.

Builds a local TFDS dataset of realistic JPEGs (500x375, like many VTAB natural images), then
measures with the real loaders (`adapter_plus_jax.data`):

- train: train800val200 (1000 images) after the first epoch, i.e. from the uint8 cache: shuffle,
  TF1 bilinear resize to 224, normalise, batch, global jax arrays;
- the same without the jax arrays (tf.data alone);
- test: a streamed split (TFDS read, JPEG decode, resize, normalise, pad, jax arrays);
- peak host RAM of the process (ru_maxrss).

Usage: python benchmarks/data_pipeline.py [--workdir DIR] [--epochs 3] [--test-size 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from adapter_plus_jax.data import registry, vtab  # noqa: E402

HEIGHT, WIDTH = 375, 500
TRAIN_SIZE = 1250  # T = 80% = 1000: val200 = train[1000:1200], disjoint from train[:800]
MEAN = STD = (0.5, 0.5, 0.5)


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


def write_jpegs(folder: Path, count: int, seed: int) -> None:
    """Smooth random images (upsampled noise plus grain), so that JPEG sizes are realistic
    (~30-60 KB) rather than those of white noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.uniform(0, 255, (HEIGHT // 25, WIDTH // 25, 3)).astype(np.float32)
        image = tf.image.resize(coarse, [HEIGHT, WIDTH], "bicubic") + rng.normal(
            0, 6, (HEIGHT, WIDTH, 3)
        )
        image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
        (folder / f"{i:05d}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())


def prepare(workdir: Path, test_size: int) -> Path:
    data_dir = workdir / "tfds"
    if not (data_dir / "bench_jpegs" / "1.0.0").exists():
        write_jpegs(workdir / "manual" / "train", TRAIN_SIZE, 0)
        write_jpegs(workdir / "manual" / "test", test_size, 1)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        data_dir = prepare(workdir, args.test_size)
        spec = vtab.TaskSpec(
            "bench", "bench_jpegs:1.0.0", "1.0.0", "Natural", 10, TRAIN_SIZE, train_percent=80
        )
        kw = dict(mean=MEAN, std=STD, global_batch=args.batch, data_dir=data_dir)
        loader = registry.vtab_train_loader(spec, "train800val200", seed=0, **kw)

        first, _ = rate(loader.epoch(0))
        train, steps = rate(loader.epochs(1, args.epochs))
        tf_only, _ = rate(loader.dataset(1, args.epochs).as_numpy_iterator())
        test, _ = rate(registry.vtab_eval_loader(spec, "test", **kw))
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{cores} CPU cores, load average {load}; batch {args.batch}, {HEIGHT}x{WIDTH} JPEGs\n")
    print("| pipeline | images/s |")
    print("|---|---|")
    print(f"| train, epoch 0 (decode + fill the uint8 cache) | {first:,.0f} |")
    print(
        f"| train, epochs 1-{args.epochs} from cache ({steps} steps), jax arrays | {train:,.0f} |"
    )
    print(f"| train, epochs 1-{args.epochs} from cache, tf.data only | {tf_only:,.0f} |")
    print(f"| test, streamed ({args.test_size} images, decode each time) | {test:,.0f} |")
    print(f"\npeak host RAM (ru_maxrss): {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
