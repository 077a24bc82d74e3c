"""Image files decoded once, in parallel, into one uint8 array at the model's input size, kept
on disk as a memory-mapped .npy file that every later run over the same files reuses.

    decoded = decode_files(paths, size=224, cache_dir="~/.cache/adapter_plus_jax/folders")
    decoded.images      # (n, 224, 224, 3) uint8, memory-mapped: pages are read as batches ask
    decoded.kept        # which of `paths` it holds, in order; decoded.skipped: the others

Each file is decoded (EXIF orientation applied, JPEGs at a reduced DCT scale where the resize
allows it: `images.decode`) and resized at once to size x size with the pipelines' TF1
bilinear resize, then rounded to uint8, so no image is ever held at its own size beyond the
decoding threads'. The cache entry is keyed by every file's path, size and modification time
and by the preprocessing (`cache_key`): a resume, another seed or rank selection's runs over
the same folder read it back; a changed file makes a new entry. Entries are written to a
temporary file and renamed when complete, under a lock, so concurrent runs decode once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapter_plus_jax.images import DRAFT_MARGIN, resized_uint8, shown

FORMAT = 1  # bump when the stored pixels change for the same files
DEFAULT_DIR = "~/.cache/adapter_plus_jax/folders"
CACHE_ENV = "ADAPTER_PLUS_JAX_DATA_CACHE"  # overrides DEFAULT_DIR; the config overrides both


@dataclasses.dataclass(frozen=True)
class Decoded:
    """`images[j]` is `paths[kept[j]]`, decoded and resized; `skipped`: (path, reason) of
    the files that could not be read (corrupt, too large for Pillow, unreadable, no plugin)."""

    images: np.ndarray
    kept: np.ndarray
    skipped: tuple[tuple[str, str], ...]


def cache_key(paths: Sequence[Path], size: int) -> str:
    """SHA-256 over the preprocessing, the decoders' versions and every file's path, size and
    modification time."""
    h = hashlib.sha256(f"apj-images:{FORMAT}:{size}:{DRAFT_MARGIN}:{_decoders()}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            h.update(os.fsencode(path) + f":{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError as e:  # unreadable: decoding will say so; the key stays stable
            h.update(os.fsencode(path) + f":{e.errno}\n".encode())
    return h.hexdigest()[:32]


def _decoders() -> str:
    """Pillow's and pillow-heif's versions: another decoder may read other pixels."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("pillow", "pillow-heif"):
        try:
            found.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            found.append(f"{package}=none")
    return ",".join(found)


# Skips that the next run may not repeat (a plugin installed, a permission or Pillow's limit
# changed): an entry that has them is decoded again rather than reused.
RETRIED = ("ImageError", "PermissionError", "DecompressionBombError")


def _decode_into(out: np.ndarray, paths: Sequence[Path], size: int, workers: int) -> dict:
    """Decode `paths` into the rows of `out` (an array, or a memory-mapped .npy written with
    `os.pwrite`, so that its pages never count as the process's memory) on `workers` threads
    (Pillow decodes and numpy resizes without holding the GIL), with a progress bar; returns
    {row: reason} of failures. An interrupt cancels the files not started yet."""
    from tqdm import tqdm

    fd = os.open(out.filename, os.O_WRONLY) if isinstance(out, np.memmap) else None
    row_bytes = int(np.prod(out.shape[1:]))

    def one(i: int) -> str | None:
        try:
            image = resized_uint8(paths[i], size)
        except Exception as e:  # Pillow raises many types for broken files
            return f"{type(e).__name__}: {e}"
        if fd is None:
            out[i] = image
        else:
            os.pwrite(fd, image.tobytes(), out.offset + i * row_bytes)
        return None

    failed = {}
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        with tqdm(total=len(paths), unit="file", desc="decoding images", file=sys.stderr,
                  dynamic_ncols=True) as bar:  # fmt: skip
            futures = {pool.submit(one, i): i for i in range(len(paths))}
            for future in concurrent.futures.as_completed(futures):
                reason = future.result()  # a write error (a full disk) is raised here
                if reason is not None:
                    failed[futures[future]] = reason
                bar.update(1)
    finally:
        pool.shutdown(cancel_futures=True)
        if fd is not None:
            os.close(fd)
    return failed


def _copy_rows(source: Path, rows: np.ndarray, target: Path) -> None:
    """Rows `rows` of the .npy at `source` into a new .npy at `target`, with pread/pwrite (the
    files' pages stay out of the process's memory)."""
    full = np.load(source, mmap_mode="r")
    shape, offset = full.shape, full.offset
    del full
    out = np.lib.format.open_memmap(target, "w+", np.uint8, (len(rows), *shape[1:]))
    out_offset = out.offset
    del out
    row_bytes = int(np.prod(shape[1:]))
    with open(source, "rb") as src, open(target, "r+b") as dst:
        for j, i in enumerate(rows):
            data = os.pread(src.fileno(), row_bytes, offset + int(i) * row_bytes)
            os.pwrite(dst.fileno(), data, out_offset + j * row_bytes)


def decode_files(
    paths: Sequence[Path],
    size: int,
    cache_dir: str | Path | None = DEFAULT_DIR,
    workers: int | None = None,
) -> Decoded:
    """`paths` decoded and resized to size x size (see the module docstring): read back from
    `cache_dir` when an entry for these files exists, else decoded on `workers` threads (this
    process's cores) and stored there. `cache_dir` None: decoded into host memory, not
    stored."""
    paths = list(paths)
    workers = workers or len(os.sched_getaffinity(0))
    shape = (len(paths), size, size, 3)
    if cache_dir is None:
        images = np.empty(shape, np.uint8)
        failed = _decode_into(images, paths, size, workers)
        kept = np.array([i for i in range(len(paths)) if i not in failed], np.int64)
        return Decoded(images[kept] if failed else images, kept, _skipped(paths, failed))
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size)
    npy, meta = root / f"{key}.npy", root / f"{key}.json"
    with open(root / f".{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another run decoding these images into {shown(root)}.",
                  file=sys.stderr, flush=True)  # fmt: skip
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(npy, meta):
            for leftover in root.glob(f".{key}.*.npy"):  # a run killed while writing
                leftover.unlink(missing_ok=True)
            _decode_entry(paths, size, workers, root, key)
    record = json.loads(meta.read_text())
    skipped = tuple((path, reason) for path, reason in record["skipped"])
    return Decoded(np.load(npy, mmap_mode="r"), np.array(record["kept"], np.int64), skipped)


def _complete(npy: Path, meta: Path) -> bool:
    """Whether the entry exists whole and has no skip that might not happen again."""
    if not (npy.is_file() and meta.is_file()):
        return False
    skipped = json.loads(meta.read_text())["skipped"]
    return not any(reason.split(":")[0] in RETRIED for _, reason in skipped)


def _decode_entry(paths: list[Path], size: int, workers: int, root: Path, key: str) -> None:
    """Decode into a temporary file, then rename it and write the record (last: it marks the
    entry complete). Temporary names carry the host and pid (caches shared over NFS)."""
    stem = f".{key}.{socket.gethostname()}.{os.getpid()}"
    tmp = root / f"{stem}.npy"
    images = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(paths), size, size, 3))
    try:
        failed = _decode_into(images, paths, size, workers)
        del images
        kept = np.array([i for i in range(len(paths)) if i not in failed], np.int64)
        if failed:  # keep only the decoded rows
            _copy_rows(tmp, kept, root / f"{stem}.kept.npy")
            os.replace(root / f"{stem}.kept.npy", root / f"{key}.npy")
        else:
            os.replace(tmp, root / f"{key}.npy")
    finally:
        tmp.unlink(missing_ok=True)
        (root / f"{stem}.kept.npy").unlink(missing_ok=True)
    meta_tmp = root / f"{stem}.json"
    meta_tmp.write_text(json.dumps({"kept": kept.tolist(), "skipped": _skipped(paths, failed)}))
    os.replace(meta_tmp, root / f"{key}.json")


def _skipped(paths: Sequence[Path], failed: dict) -> tuple[tuple[str, str], ...]:
    return tuple((shown(paths[i]), failed[i]) for i in sorted(failed))
