"""Several processes, one run: how `apj train --distributed` and `apj suite run --distributed`
join their processes, and how they stop together.

    # on each of N hosts (or N processes on one host), I = 0 .. N-1:
    apj train --config configs/vtab.py:dtd --workdir /shared/runs/dtd --distributed \\
        --coordinator_address HOST0:12355 --num_processes N --process_id I

Where the three values come from, first found wins: the flags; the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; JAX's own detection of Cloud
TPU, Slurm and Open MPI (`jax.distributed.initialize` with what is still unset). Values that
cannot work (a process id outside 0..N-1, an address without a port) are refused before JAX
starts; a coordinator that does not answer within `INIT_TIMEOUT_S` seconds (or
$ADAPTER_PLUS_JAX_INIT_TIMEOUT, for clusters whose processes start far apart) is reported in
one line.

Stopping together. When one process dies (a killed job, a lost host), the others must not hang
until a collective times out, nor end in a page of C++ log: a watchdog thread in each process
writes a heartbeat into JAX's key-value store every `BEAT_S` seconds and reads the others'. A
process whose heartbeat stops for `STALE_S` seconds, or a coordinator that no longer answers,
ends this process with one line (`failing_together`). A collective that fails because its peer
is gone (gloo on CPUs reports it at once) is reported the same way. Process 0, which hosts the
key-value store, stays up to `LINGER_S` seconds after it fails, until the others have read why
and ended (a refusal it shares, such as a busy workdir, reaches every process). JAX's own
heartbeat (`HEARTBEAT_TIMEOUT_S`) is the backstop behind ours. A rerun of every process resumes
from the last good checkpoint.

One failure cannot be caught inside the process: when the coordinator dies, JAX's C++ client
aborts the process at once with a page of log. So a --distributed command runs as a child of
itself (supervisor.py).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping

import jax

from adapter_plus_jax.errors import SetupError

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
INIT_TIMEOUT_ENV = "ADAPTER_PLUS_JAX_INIT_TIMEOUT"  # seconds; longer for staggered starts
INIT_TIMEOUT_S = 30  # waiting for every process to connect: a dead address fails within a minute
BEAT_S = 1.0  # the watchdog's heartbeat
STALE_S = 15.0  # no heartbeat for this long: that process is gone
HEARTBEAT_TIMEOUT_S = 45  # JAX's own, shorter than its default, behind ours
LINGER_S = 5.0  # process 0, failing, keeps the key-value store up for the others this long
ENDED = ("done", "ended")  # a process's last heartbeat value: it ended normally / with the run


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where a process of a multi-process run finds the others; None: left to JAX's detection."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def resolve(
        cls,
        coordinator_address: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Cluster:
        """The flags' values, else the environment's; ValueError (one line) for values that
        cannot work."""
        given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                 "process_id": process_id}  # fmt: skip
        values = {}
        for name, value in given.items():
            if value is None and environ.get(ENV[name], "") != "":
                value = environ[ENV[name]]
                if name != "coordinator_address":
                    try:
                        value = int(value)
                    except ValueError:
                        raise ValueError(f"{ENV[name]}={value!r}: expected an integer.") from None
            values[name] = value
        cluster = cls(**values)
        cluster.check()
        return cluster

    def check(self) -> None:
        address, n, i = self.coordinator_address, self.num_processes, self.process_id
        if address is not None:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--coordinator_address {address!r}: expected HOST:PORT, e.g. "
                                 "10.0.0.1:12355 (process 0's host and a free port).")  # fmt: skip
        if n is not None and n < 1:
            raise ValueError(f"--num_processes {n}: expected 1 or more.")
        if i is not None and (i < 0 or (n is not None and i >= n)):
            top = f"0..{n - 1}" if n is not None else "0 or more"
            raise ValueError(f"--process_id {i}: expected {top} (one id per process).")

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None)


def add_arguments(parser) -> None:
    """--distributed and the three values of `Cluster` (underscores or dashes)."""
    group = parser.add_argument_group(
        "multi-process runs",
        "Start the same command in every process. Unset values come from JAX_COORDINATOR_"
        "ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, else from JAX's detection of Cloud TPU, "
        "Slurm and Open MPI.",
    )
    group.add_argument("--distributed", action="store_true",
                       help="one process of a multi-process (multi-host) run")  # fmt: skip
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address and a free port")  # fmt: skip
    group.add_argument("--num-processes", type=int, metavar="N")
    group.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1")


def cluster_from_args(args) -> Cluster | None:
    """The `Cluster` of parsed arguments (`add_arguments`); None without --distributed.
    ValueError when the values cannot work, or are given without --distributed."""
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed:
        if any(v is not None for v in flags):
            raise ValueError("--coordinator_address, --num_processes and --process_id need "
                             "--distributed.")  # fmt: skip
        return None
    init_timeout()  # a bad $ADAPTER_PLUS_JAX_INIT_TIMEOUT fails here, in one line
    return Cluster.resolve(*flags)


_watchdog: _Watchdog | None = None


def init_timeout(environ: Mapping[str, str] = os.environ) -> int:
    """Seconds to wait for every process to connect: $ADAPTER_PLUS_JAX_INIT_TIMEOUT, else
    INIT_TIMEOUT_S."""
    value = environ.get(INIT_TIMEOUT_ENV, "")
    if not value.isdigit() or int(value) < 1:
        if value:
            raise ValueError(f"{INIT_TIMEOUT_ENV}={value!r}: expected a number of seconds.")
        return INIT_TIMEOUT_S
    return int(value)


def initialize(cluster: Cluster) -> None:
    """Join the run's other processes (`jax.distributed.initialize`) and start the watchdog.
    SetupError (one line) when they cannot be joined. Once per process; later calls return."""
    global _watchdog
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(
            cluster.coordinator_address,
            cluster.num_processes,
            cluster.process_id,
            initialization_timeout=init_timeout(),
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )
    except Exception as e:  # JAX's ValueError for unset values, the client's for timeouts
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = cluster.describe() or "nothing given"
        if "must be defined" in text or "should be defined" in text:
            raise SetupError(
                f"--distributed ({where}): {text} Give --coordinator_address, --num_processes "
                "and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_"
                "ID), or run where JAX detects the cluster (Cloud TPU, Slurm, Open MPI)."
            ) from None
        raise SetupError(
            f"--distributed ({where}): could not join the other processes within "
            f"{init_timeout()} s ({text[:200]}). Start every process with the same "
            "coordinator address and number of processes; process 0 must be running and its "
            "port reachable."
        ) from None
    _watchdog = _Watchdog(jax.process_index(), jax.process_count())
    _watchdog.start()
    atexit.register(_watchdog.stop)  # runs before JAX's shutdown, registered earlier


def _client():
    from jax._src import distributed as jax_distributed  # the key-value store: no public API

    return jax_distributed.global_state.client


_shared = 0  # calls of from_process_zero, the same sequence in every process


def from_process_zero(what: str, value: str) -> str:
    """Process 0's `value` of `what` in every process (each passes its own; only process 0's is
    used). Every process must make the same calls in the same order."""
    global _shared
    if jax.process_count() == 1:
        return value
    _shared += 1  # the key is the call's number: `key` names it in error messages only
    client, key = _client(), f"apj/shared/{_shared}"
    if jax.process_index() == 0:
        client.key_value_set(key, value, allow_overwrite=True)
        return value
    try:
        return client.blocking_key_value_get(key, int(1000 * (STALE_S + init_timeout())))
    except Exception as e:  # process 0 never got there: it failed, and the watchdog says why
        raise SetupError(f"process 0 did not share {what} ({_first(e)}).") from None


class _Watchdog(threading.Thread):
    """Heartbeats through JAX's key-value store; notices a process that stopped or failed. A
    process says at its end whether it ended normally ("done"), failed ("failed: ...") or
    stopped because the run did ("ended")."""

    def __init__(self, me: int, count: int) -> None:
        super().__init__(name="apj-watchdog", daemon=True)
        self.me, self.count = me, count
        self.lost: str | None = None
        self.decided = threading.Event()
        self._stopping = threading.Event()
        self._failed: str | None = None
        self._gone: set[int] = set()  # processes whose heartbeat stopped

    def run(self) -> None:
        client, beat, started = _client(), 0, time.monotonic()
        seen = {p: ("", started) for p in range(self.count) if p != self.me}
        while not self._stopping.is_set():
            beat += 1
            # Once this process fails, its status stays the reason (the others read it).
            status = str(beat) if self._failed is None else f"failed: {self._failed}"
            try:
                client.key_value_set(f"apj/alive/{self.me}", status, allow_overwrite=True)
                values = dict(client.key_value_dir_get("apj/alive/"))
            except Exception as e:  # the coordinator (process 0) no longer answers
                if self._stopping.is_set():
                    return
                self._stop_with(f"lost the coordinator, process 0 of {self.count} ({_first(e)})")
                return
            now = time.monotonic()
            for p, (last, since) in seen.items():
                value = values.get(f"apj/alive/{p}", "")
                if value.startswith("failed: "):
                    self._stop_with(f"process {p} of {self.count} failed: {value[8:]}")
                elif value != last or value in ENDED:
                    seen[p] = (value, now)
                # a process not seen yet may still be starting its backend
                elif now - since > STALE_S + (0 if last else init_timeout()):
                    self._gone.add(p)
                    self._stop_with(f"process {p} of {self.count} stopped (no heartbeat for "
                                    f"{now - since:.0f} s)")  # fmt: skip
            self._stopping.wait(BEAT_S)

    def fail(self, reason: str) -> None:
        """This process is failing: the others are told why, and stop too."""
        self._failed = reason[:300]
        with contextlib.suppress(Exception):
            _client().key_value_set(f"apj/alive/{self.me}", f"failed: {self._failed}",
                                    allow_overwrite=True)  # fmt: skip

    def stop(self) -> None:
        """This process ends: no more watching; the others are told how it ended."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        status = "done" if self._failed is None else f"failed: {self._failed}"
        with contextlib.suppress(Exception):
            _client().key_value_set(f"apj/alive/{self.me}", status, allow_overwrite=True)

    def let_others_end(self, timeout: float = LINGER_S) -> None:
        """In process 0, which hosts the key-value store, before it exits on a failure: wait
        (at most `timeout` seconds) until every other process has ended or failed, so that each
        still reads the store and says why in its own line."""
        others = [f"apj/alive/{p}" for p in range(self.count) if p not in {self.me, *self._gone}]
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline:
                values = dict(_client().key_value_dir_get("apj/alive/"))
                if all(_final(values.get(key, "")) for key in others):
                    return
                time.sleep(0.1)

    def _stop_with(self, reason: str) -> None:
        self.lost = reason
        self.decided.set()
        # Tell the others this process ended with the run (unless it failed itself: they read
        # why; or the store is gone).
        if self._failed is None and not reason.startswith("lost the coordinator"):
            with contextlib.suppress(Exception):
                _client().key_value_set(f"apj/alive/{self.me}", "ended", allow_overwrite=True)
        _exit(f"error: {reason}. Stopping this process too; rerun every process with the same "
              "command to resume from the last good checkpoint.")  # fmt: skip


def _final(status: str) -> bool:
    return status in ENDED or status.startswith("failed: ")


def _first(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


_exiting = threading.Lock()
_prog: str | None = None  # the command's name for `_exit`'s line (`failing_together` sets it)


def _exit(line: str, status: int = 1, prog: str | None = None) -> None:
    """Print one line and end the process at once: JAX's exit handlers would wait for the
    others at a shutdown barrier, then abort with a page of C++ log. One line per process,
    whichever thread comes first."""
    if not _exiting.acquire(blocking=False):
        time.sleep(60)  # the other thread is ending the process
    sys.stdout.flush()
    prog = prog or _prog or "apj"
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    if _watchdog is not None and _watchdog.me == 0:
        _watchdog.let_others_end()
    os._exit(status)


BAD_INPUT = (ValueError, KeyError, FileNotFoundError, FloatingPointError)  # SetupError too


@contextlib.contextmanager
def failing_together(prog: str) -> Iterator[None]:
    """Around a multi-process run's work (outside one, it changes nothing): bad input, a
    diverged loss or an interrupt end this process with one line, and tell the others, which
    stop too; an exception caused by a lost process (a collective whose peer is gone) ends it
    with the watchdog's line; any other is printed with its traceback. Either way the process
    ends at once, without waiting for the others at JAX's exit."""
    global _prog
    _prog = prog
    try:
        yield
    except BaseException as e:
        if _watchdog is None:
            raise
        if isinstance(e, KeyboardInterrupt):
            _watchdog.fail("interrupted")
            _exit("interrupted.", 130, prog)
        if isinstance(e, BAD_INPUT) and not _collective_failed(e):
            _watchdog.fail(_first(e))
            _exit(f"error: {str(e).strip() or type(e).__name__}", 1, prog)
        if not _watchdog.decided.wait(STALE_S + 2 * BEAT_S):
            traceback.print_exc()
            _watchdog.fail(f"{type(e).__name__}: {_first(e)}")
            _exit("error: this process failed (traceback above); the others stop with it.", 1,
                  prog)  # fmt: skip
        time.sleep(60)  # the watchdog ends the process


def _collective_failed(error: BaseException) -> bool:
    """Whether `error` or one it was raised from is a failed collective or runtime call (a
    lost peer, typically, even inside a checkpoint's save): the watchdog says which."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, jax.errors.JaxRuntimeError) or any(
            word in str(seen) for word in ("Gloo", "NCCL", "UNAVAILABLE")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
