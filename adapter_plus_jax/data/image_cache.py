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
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapter_plus_jax.images import DRAFT_MARGIN, resized_uint8

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


def shown(path: str | Path) -> str:
    """A path as text that can always be printed (names that are not UTF-8 escaped)."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def cache_key(paths: Sequence[Path], size: int) -> str:
    """SHA-256 over the preprocessing and every file's path, size and modification time."""
    h = hashlib.sha256(f"apj-images:{FORMAT}:{size}:{DRAFT_MARGIN}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            h.update(os.fsencode(path) + f":{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError as e:  # unreadable: decoding will say so; the key stays stable
            h.update(os.fsencode(path) + f":{e.errno}\n".encode())
    return h.hexdigest()[:32]


def _decode_into(out: np.ndarray, paths: Sequence[Path], size: int, workers: int) -> dict:
    """Decode `paths` into the rows of `out` (an array, or a memory-mapped .npy written with
    `os.pwrite`, so that its pages never count as the process's memory) on `workers` threads
    (Pillow decodes and numpy resizes without holding the GIL), with a progress bar; returns
    {row: reason} of failures."""
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
    with (
        concurrent.futures.ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(paths), unit="file", desc="decoding images", file=sys.stderr,
             dynamic_ncols=True) as bar,  # fmt: skip
    ):
        futures = {pool.submit(one, i): i for i in range(len(paths))}
        for future in concurrent.futures.as_completed(futures):
            reason = future.result()
            if reason is not None:
                failed[futures[future]] = reason
            bar.update(1)
    if fd is not None:
        os.close(fd)
    return failed


def _write(tmp: Path, rows: np.ndarray, source: Path) -> None:
    """Rows `rows` of the .npy at `source` into a new .npy at `tmp`, one at a time."""
    full = np.load(source, mmap_mode="r")
    out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(rows), *full.shape[1:]))
    for j, i in enumerate(rows):
        out[j] = full[i]
    out.flush()
    del out, full


def decode_files(
    paths: Sequence[Path],
    size: int,
    cache_dir: str | Path | None = DEFAULT_DIR,
    workers: int | None = None,
) -> Decoded:
    """`paths` decoded and resized to size x size (see the module docstring): read back from
    `cache_dir` when an entry for these files exists, else decoded on `workers` threads (the
    host's cores) and stored there. `cache_dir` None: decoded into host memory, not stored."""
    paths = list(paths)
    workers = workers or os.cpu_count() or 1
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
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run decoding the same files: wait for it
        if not meta.is_file():
            tmp = root / f".{key}.{os.getpid()}.npy"
            images = np.lib.format.open_memmap(tmp, "w+", np.uint8, shape)  # the header
            failed = _decode_into(images, paths, size, workers)
            del images
            kept = np.array([i for i in range(len(paths)) if i not in failed], np.int64)
            if failed:  # keep only the decoded rows
                _write(root / f".{key}.{os.getpid()}.kept.npy", kept, tmp)
                os.replace(root / f".{key}.{os.getpid()}.kept.npy", npy)
                tmp.unlink()
            else:
                os.replace(tmp, npy)
            record = {"kept": kept.tolist(), "skipped": _skipped(paths, failed)}
            meta_tmp = root / f".{key}.{os.getpid()}.json"
            meta_tmp.write_text(json.dumps(record))
            os.replace(meta_tmp, meta)
    record = json.loads(meta.read_text())
    skipped = tuple((path, reason) for path, reason in record["skipped"])
    return Decoded(np.load(npy, mmap_mode="r"), np.array(record["kept"], np.int64), skipped)


def _skipped(paths: Sequence[Path], failed: dict) -> tuple[tuple[str, str], ...]:
    return tuple((shown(paths[i]), failed[i]) for i in sorted(failed))
