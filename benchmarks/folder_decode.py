"""Decoding your own images: speed, fidelity of the reduced JPEG decode, and peak memory.

    python benchmarks/folder_decode.py decode [--count 60] [--out FILE.md]
    python benchmarks/folder_decode.py memory --photos 100,1000 [--out FILE.md]

`decode` writes 12-megapixel JPEGs (4032x3024, photo-like: smooth colour and sensor-like
noise), 1-megapixel PNGs and 32x32 PNGs, and times, per kind, in images/s and images/s per
core:

- a plain loop, `Image.open(f).convert("RGB").resize((224, 224))`, one core;
- ours, `data.image_cache.decode_files` (EXIF orientation, the reduced JPEG decode, the
  pipelines' TF1 bilinear resize, uint8), on one thread and on every core of the host;

and, for the JPEGs, how far the reduced decode's pixels are from the full decode's after the
resize (mean, 99th percentile and largest absolute difference, in levels of 255).

`memory` trains ViT-Ti/16 (random weights, 224x224, batch 32 or `--batch`, 1 epoch) with `apj train
--config configs/folder.py:ROOT` on folders of N 12-megapixel photos each (80% train/, 20%
test/, 2 classes; a few distinct photos copied under many names, so that writing them is
quick; each copy is still decoded) and reports the run's peak resident memory
(ru_maxrss of the child process), with a fresh decoded-image cache per run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from adapter_plus_jax import images as images_lib  # noqa: E402
from adapter_plus_jax.data import image_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224
KINDS = {"12 MP JPEG": ((3024, 4032), ".jpg"), "1 MP PNG": ((866, 1155), ".png"),
         "32x32 PNG": ((32, 32), ".png")}  # fmt: skip


def photo(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Photo-like pixels: smooth colour (a bicubic upsampling of a coarse grid) and noise."""
    rng = np.random.default_rng(seed)
    h, w = shape
    coarse = rng.integers(0, 256, (max(h // 250, 2), max(w // 250, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)


def write(folder: Path, kind: str, count: int, distinct: int = 8) -> list[Path]:
    """`count` files of `kind`: `distinct` images written, the rest copies under new names."""
    shape, suffix = KINDS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}{suffix}"
        if i < distinct:
            Image.fromarray(photo(shape, i)).save(path, quality=90)
        else:
            shutil.copyfile(paths[i % distinct], path)
        paths.append(path)
    return paths


def plain(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB").resize((SIZE, SIZE))


def rate(run, count: int, repeats: int = 2) -> float:
    """Best images/s of `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


def decode_table(count: int) -> list[str]:
    cores = len(os.sched_getaffinity(0))
    lines = [f"# Decoding images to {SIZE}x{SIZE}: {cores} cores, {count} files per kind", "",
             "| kind | plain loop, 1 core | ours, 1 thread | ours, "
             f"{cores} threads | ours per core | ours per core / plain |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            paths = write(Path(tmp) / kind.replace(" ", "_"), kind, count)
            base = rate(lambda p=paths: plain(p), count)
            one = rate(lambda p=paths: image_cache.decode_files(p, SIZE, None, workers=1), count)
            every = rate(lambda p=paths: image_cache.decode_files(p, SIZE, None), count)
            lines.append(f"| {kind} | {base:,.1f} | {one:,.1f} | {every:,.1f} | "
                         f"{every / cores:,.1f} | {every / cores / base:.2f}x |")  # fmt: skip
            print(lines[-1], flush=True)
            if kind == "12 MP JPEG":
                fidelity = draft_fidelity(paths[:8])
        lines += ["", fidelity]
    return lines


def draft_fidelity(paths: list[Path]) -> str:
    diffs = []
    for path in paths:
        full = images_lib.resize_bilinear_v1(images_lib.decode(path), (SIZE, SIZE))
        full = np.clip(np.round(full), 0, 255)
        diffs.append(np.abs(images_lib.resized_uint8(path, SIZE).astype(np.float64) - full))
    d = np.stack(diffs)
    return (f"Reduced JPEG decode (DCT scale keeping >= {images_lib.DRAFT_MARGIN} x {SIZE} "
            f"pixels) against the full decode, after the resize, {len(paths)} 12 MP photos: "
            f"mean {d.mean():.2f}, 99th percentile {np.percentile(d, 99):.0f}, largest "
            f"{d.max():.0f} (levels of 255).")  # fmt: skip


def memory_table(counts: list[int], batch: int) -> list[str]:
    lines = [
        f"# Peak memory of a folder run: ViT-Ti/16, 224x224, batch {batch}, 1 epoch",
        "",
        "| 12 MP photos | peak RSS | decoding + training wall time |",
        "|---|---|---|",
    ]
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "photos"
            for split, n in (("train", count * 4 // 5), ("test", count - count * 4 // 5)):
                for c in ("a", "b"):
                    write(root / split / c, "12 MP JPEG", n // 2)
            cmd = [
                sys.executable,
                "main.py",
                "--config",
                f"configs/folder.py:{root},epochs=1",
                "--workdir",
                str(Path(tmp) / "run"),
                "--config.model.pretrained=False",
                "--config.model.name=vit_tiny_patch16_224",
                f"--config.batch_size={batch}",
                f"--config.eval_batch_size={batch}",
                f"--config.data_cache={Path(tmp) / 'cache'}",
            ]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
            if status:
                raise SystemExit(f"the run with {count} photos failed (status {status})")
            lines.append(f"| {count:,} | {usage.ru_maxrss / 1024:,.0f} MiB | {seconds:.0f} s |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("decode", "memory"))
    parser.add_argument("--count", type=int, default=60, help="decode: files per kind")
    parser.add_argument("--photos", default="100,1000", help="memory: photo counts")
    parser.add_argument("--batch", type=int, default=32, help="memory: the training batch")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    if args.what == "decode":
        lines = decode_table(args.count)
    else:
        lines = memory_table([int(n) for n in args.photos.split(",")], args.batch)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
