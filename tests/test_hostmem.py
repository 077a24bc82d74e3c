"""hostmem: restart once with glibc's huge-page tunable where it helps, and what it changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_plus_jax import hostmem

ROOT = Path(__file__).resolve().parents[1]
HERE = {"glibc": hostmem.glibc_version(), "thp": hostmem.thp_mode()}
HELPS_HERE = sys.platform.startswith("linux") and hostmem.would_reexec(
    {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)},
    HERE["glibc"],
    HERE["thp"],
)


@pytest.mark.parametrize(
    "environ, glibc, thp, expected",
    [
        ({}, (2, 36), "madvise", True),
        ({}, (2, 35), "madvise", True),
        ({}, (2, 34), "madvise", False),  # the tunable is new in 2.35
        ({}, None, "madvise", False),  # musl or unknown C library
        ({}, (2, 36), "never", False),  # no huge pages to get
        ({}, (2, 36), "always", False),  # malloc's large blocks get them already
        ({}, (2, 36), None, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", True),
        ({hostmem.OPT_OUT: "0"}, (2, 36), "madvise", False),
        ({hostmem.OPT_OUT: "1"}, (2, 36), "madvise", True),
    ],
)
def test_restarts_only_where_it_helps(environ, glibc, thp, expected) -> None:
    assert hostmem.would_reexec(environ, glibc, thp) is expected


def test_never_restarts_a_process_that_has_the_tunable() -> None:
    # The restart's own environment has it (no loop), and a user's own setting is kept.
    for value in ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"):
        assert not hostmem.would_reexec({"GLIBC_TUNABLES": value}, (2, 36), "madvise")


def test_adds_the_tunable_and_keeps_the_others() -> None:
    env = hostmem.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert hostmem.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_reads_the_kernels_mode(tmp_path: Path) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(mode) == "madvise"
    mode.write_text("[always] madvise never\n")
    assert hostmem.thp_mode(mode) == "always"
    assert hostmem.thp_mode(tmp_path / "missing") is None


SCRIPT = """
import os, resource, sys
print("started", flush=True)
from adapter_plus_jax import hostmem
hostmem.reexec_with_huge_pages()
import ctypes
libc = ctypes.CDLL(None)  # glibc's malloc, as XLA:CPU uses it (numpy asks for huge pages itself)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # 256 MiB each, above malloc's mmap threshold: mapped fresh every time
    block = libc.malloc(2**28)
    ctypes.memset(block, 1, 2**28)
    libc.free(block)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "faults", faults, flush=True)
"""


def _run(**env: str) -> tuple[list[str], int]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    environ["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**environ, **env}, capture_output=True, text=True,
        timeout=300, check=True,
    ).stdout.splitlines()  # fmt: skip
    return out, int(out[-1].split()[-1])


def test_restart_gives_malloc_huge_pages_where_it_helps() -> None:
    lines, faults = _run()
    if not HELPS_HERE:  # this machine cannot gain: the process is left as it started
        assert lines[:-1] == ["started"] and lines[-1].startswith("tunables  faults")
        return
    # Started twice (the restart), the tunable set once, and 3 x 256 MiB of fresh buffers fault
    # in 2 MiB pages instead of 4 KiB ones (196,608 faults without).
    assert lines[:-1] == ["started", "started"], lines
    assert lines[-1].startswith(f"tunables {hostmem.TUNABLE} ")
    without_lines, without = _run(**{hostmem.OPT_OUT: "0"})
    assert without_lines[:-1] == ["started"] and without > 150_000
    assert faults * 10 < without, (faults, without)
