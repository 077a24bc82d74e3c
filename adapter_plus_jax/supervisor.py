"""The parent that watches a multi-process command.

When the coordinator of a multi-process run dies, JAX's C++ client aborts every other process at
once with a page of log, which no Python code in that process can catch. So `apj train
--distributed` and `apj suite run --distributed` run as a child of themselves (`supervised`):
the child sends JAX's C++ log (file descriptor 2) to a file and keeps Python's messages on the
console; the parent only waits, forwards signals, and turns a child that died of a signal into
one line naming the cause and that file. The child dies with its parent (a killed job leaves
nothing behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from adapter_plus_jax.distributed import Cluster, init_timeout

SUPERVISED_ENV = "ADAPTER_PLUS_JAX_SUPERVISED"  # in the child: the file for JAX's C++ log
# The child: `apj COMMAND ARGS` under the parent's name (PROG COMMAND ARGS in its argv).
_CHILD = (
    "import sys; from adapter_plus_jax.cli import run_command; "
    "sys.exit(run_command(sys.argv[2], sys.argv[3:], sys.argv[1]))"
)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def supervised(prog: str, cluster: Cluster, command: Sequence[str]) -> int | None:
    """In the child of a --distributed command: send JAX's C++ log (file descriptor 2) to the
    file the parent named, keep Python's stderr on the console, and return None (go on). In the
    parent: run `apj COMMAND...` (`command`: the command and its arguments, from this same
    package) as the child, forward signals to it, and return the exit status; a child that
    died of a signal is explained in one line."""
    path = os.environ.get(SUPERVISED_ENV)
    if path:
        _native_log_to(path)
        return None
    fd, path = tempfile.mkstemp(prefix=f"apj-{os.getpid()}-", suffix=".native.log")
    os.close(fd)
    package_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, SUPERVISED_ENV: path, "PYTHONPATH": pythonpath}
    # Its own session: a terminal's Ctrl-C reaches the parent only, which passes it on once.
    child = subprocess.Popen([sys.executable, "-c", _CHILD, prog, *command], env=env,
                             preexec_fn=_die_with_parent, start_new_session=True)  # fmt: skip
    for sig in _FORWARDED:
        signal.signal(sig, lambda number, _: child.send_signal(number))
    status = child.wait()
    if status >= 0:
        os.unlink(path)
        return status
    print(f"{prog}: error: {_death(-status, path, cluster)}. JAX's log: {path}.",
          file=sys.stderr, flush=True)  # fmt: skip
    return 1


def _native_log_to(path: str) -> None:
    sys.stderr.flush()
    console = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(console, "w"), encoding="utf-8", errors="backslashreplace", write_through=True
    )


def _die_with_parent() -> None:
    """In the child before it starts (Linux): SIGKILL when the parent dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _death(number: int, path: str, cluster: Cluster) -> str:
    """Why the child died of signal `number`, from the last fatal line of JAX's log."""
    name = signal.Signals(number).name if number in signal.Signals.__members__.values() else number
    try:
        text = open(path, errors="replace").read()  # noqa: SIM115
    except OSError:
        text = ""
    fatal = re.findall(r"^F\d{4} [^\]]*\] (.*)$", text, re.MULTILINE)
    if not fatal:
        return f"this process died ({name})"
    status = (fatal[-1].partition("absl::Status: ")[2] or fatal[-1])[:160]
    if "RegisterTask" in text.rpartition(fatal[-1])[2]:  # it never joined
        return (f"--distributed ({cluster.describe() or 'detected by JAX'}): could not join the "
                f"other processes within {init_timeout()} s ({status}). Start every process "
                "with the same coordinator address and number of processes; process 0 must be "
                "running and its port reachable")  # fmt: skip
    if "distributed service" in fatal[-1]:
        return (f"another process of the run stopped, or the coordinator (process 0) is "
                f"unreachable; JAX ended this process ({status}). Rerun every process with the "
                "same command to resume from the last good checkpoint")  # fmt: skip
    return f"JAX ended this process ({fatal[-1][:200]})"
