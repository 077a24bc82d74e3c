"""What a run's working directory holds besides checkpoints, and the rules that keep it sound.

    WORKDIR/lock            who runs here now (host, pid); one run per workdir
    WORKDIR/log.txt         other libraries' log records (see `console.py`)
    WORKDIR/metrics.jsonl   one record per logged step (the source of truth), mirrored in
    WORKDIR/tensorboard/    TensorBoard events, rebuilt from metrics.jsonl after a resume
    WORKDIR/results.json    the training run's results; eval.json: --eval-only's

The lock is an advisory `flock` on WORKDIR/lock. The kernel drops it when its process dies
(kill -9 included), so a lock left by a killed run is taken over without a timeout, and NFS
(v4, or v3 with lockd) carries it across hosts. Only process 0 of a multi-host run locks: the
other processes are the same run.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from adapter_plus_jax.checkpoint import Checkpointer
from adapter_plus_jax.errors import SetupError

LOCK_FILE = "lock"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Config fields that may differ on resume: they change how a run logs, stores, evaluates in
# batches, finds its files or which kernels compute it (remat, attention), not what it computes.
RESUMABLE_KEYS = frozenset(
    {
        "log_every_steps",
        "checkpoint_every_epochs",
        "eval_batch_size",
        "data_dir",
        "fgvc_root",
        "model.weights_dir",
        "model.remat",
        "model.attention",
        "compilation_cache",
        "data_cache",
    }
)

# Config fields added after checkpoints were made, with the value that means what those
# checkpoints did: they resume as they were made.
ADDED_FIELDS: dict[str, Any] = {"tune": None}


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# One run per workdir.


class WorkdirLock:
    """An exclusive lock on WORKDIR/lock, naming its holder in the file."""

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise SetupError naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SetupError(f"Cannot lock {self.path} ({e}).") from None
            holder = _read_holder(self.path)
            raise SetupError(
                f"{self.path.parent} is in use by another run ({holder}). Wait for it to end, "
                "or give this run another --workdir."
            ) from None
        previous = _read_holder(self.path, default="")
        if previous:
            print(f"Taking over {self.path}: its last holder ({previous}) is gone.", flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%c")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file: released, not left by a dead run
            os.close(self._fd)  # drops the flock
            self._fd = None


def _read_holder(path: Path, default: str = "a process that has not written its name yet") -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return default


# ----------------------------------------------------------------------------------------------
# Config changes between a checkpoint and a rerun.


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'name': x}} -> {'model.name': x}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_record(config: Any) -> dict[str, Any]:
    """The config as JSON-able values, as it is stored in checkpoints."""
    return json.loads(json.dumps(config.to_dict(), default=str))


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def config_changes(saved: Mapping[str, Any], config: Any) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every field that matters and differs; a field only
    one side has shows as ABSENT on the other."""
    old, new = flatten(saved), flatten(config_record(config))
    return [
        (key, old.get(key, ABSENT), new.get(key, ABSENT))
        for key in sorted(set(old) | set(new))
        if key not in RESUMABLE_KEYS and old.get(key, ABSENT) != new.get(key, ABSENT)
    ]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)


# ----------------------------------------------------------------------------------------------
# Metrics: each step once, after any number of resumes.


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line cut short by a kill is dropped."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def rewind_metrics(workdir: Path, step: int) -> None:
    """Forget what was logged after `step` (the checkpoint a run resumes from): metrics.jsonl
    keeps the records up to it, and TensorBoard's events are rebuilt from them."""
    records = [r for r in read_metrics(workdir) if r.get("step", 0) <= step]
    tmp = workdir / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, workdir / METRICS_FILE)
    tensorboard = workdir / TENSORBOARD_DIR
    if tensorboard.exists():
        shutil.rmtree(tensorboard)
    writer = _Scalars.open(tensorboard) if records else None
    if writer is not None:
        for record in records:
            for name, value in _scalars(record):
                writer.scalar(name, value, record["step"])
        writer.close()


def _scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    for name, value in record.items():
        if name != "step" and isinstance(value, int | float):
            yield name, value


class _Scalars:
    """TensorBoard scalar events, written with the `tensorboard` package alone (no TensorFlow)."""

    def __init__(self, logdir: Path) -> None:
        # TensorBoard's own switch to its file I/O without TensorFlow, which it would otherwise
        # import (and its GPU libraries with it) wherever TensorFlow is installed.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(str(logdir))

    @classmethod
    def open(cls, logdir: Path) -> _Scalars | None:
        """A writer into `logdir`, or None (said once) where `tensorboard` is not installed:
        metrics.jsonl holds every record either way."""
        try:
            return cls(logdir)
        except ImportError:
            global _SAID_NO_TENSORBOARD
            if not _SAID_NO_TENSORBOARD:
                print("No TensorBoard events: the tensorboard package is not installed "
                      f"(metrics go to {METRICS_FILE}).", flush=True)  # fmt: skip
                _SAID_NO_TENSORBOARD = True
            return None

    def scalar(self, name: str, value: float, step: int) -> None:
        value = self._summary.Value(tag=name, simple_value=float(value))
        event = self._event(summary=self._summary(value=[value]), step=step, wall_time=time.time())
        self._writer.add_event(event)

    def close(self) -> None:
        self._writer.close()


_SAID_NO_TENSORBOARD = False


class Logger:
    """metrics.jsonl and TensorBoard summaries (process 0 only)."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            self._jsonl = open(workdir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
            self._tb = _Scalars.open(workdir / TENSORBOARD_DIR)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            if self._tb is not None:
                self._tb.scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


# ----------------------------------------------------------------------------------------------
# Where a rerun continues.


@dataclasses.dataclass
class Resume:
    """Where a run continues: its newest good checkpoint's step and record."""

    step: int
    epoch: int
    train_time_s: float
    images_seen: int

    @classmethod
    def from_meta(cls, step: int, meta: dict[str, Any]) -> Resume:
        return cls(step, int(meta["epoch"]), float(meta.get("train_time_s", 0.0)),
                   int(meta.get("images_seen", 0)))  # fmt: skip


def check_resume(
    ckpt: Checkpointer, config: ml_collections.ConfigDict, allow_config_change: bool
) -> Resume | None:
    """The checkpoint to continue from (None: start fresh), after checking that it was made
    with this config. Reads only the checkpoint, so it fails before any data or model."""
    found = ckpt.find_good()
    if found is None:
        return None
    step, meta = found
    saved = meta.get("config", {})
    if "model" in saved and "head_width" not in saved["model"]:
        # Made before heads were padded: it continues unpadded, as it was made.
        saved = {**saved, "model": {**saved["model"], "head_width": -1}}
        config.model.head_width = -1
    for key, value in ADDED_FIELDS.items():  # fields that checkpoints made before them lack
        saved = saved if key in saved else {**saved, key: value}
    changes = config_changes(saved, config)
    if changes and not allow_config_change:
        raise SetupError(
            f"The checkpoint in {ckpt.directory} (step {step}) was made with another config: "
            f"{describe_changes(changes)}. To start fresh, use another --workdir (or move this "
            "one away); to continue it with the new values on purpose, add "
            "--allow-config-change."
        )
    if changes:
        print(f"WARNING: continuing with changed config: {describe_changes(changes)}", flush=True)
    return Resume.from_meta(step, meta)
