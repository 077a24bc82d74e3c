"""Transparent huge pages for XLA:CPU's host buffers (Linux, glibc >= 2.35).

On CPUs every execution of a jitted step takes its temporary buffer from glibc's malloc (1.5
GB for ViT-B/16's train step at batch 8), which maps it fresh, and the kernel then faults it in
4 KiB page by page: 380,000 page faults and 1.4-1.6 s of system time per step on a 2-core AMD
EPYC, while torch's step, made of many smaller blocks that malloc recycles, faulted 5,000-12,000
times. With glibc's tunable `glibc.malloc.hugetlb=1` malloc asks for transparent huge pages
(`madvise`), so the same buffer comes in 2 MiB pieces: about 1,000 faults and 0.2 s per step,
and the step ran 1.33x faster (docs/performance.md, "Host memory"). The reference's step did not
change (1.63 against 1.65 images/s).

glibc reads tunables only when a process starts, so a script cannot turn this on for itself
once it runs; `reexec_with_huge_pages()` restarts the process (`os.execve`: same PID, arguments
and open files) once with the tunable added. The command-line tools call it first thing; code
with its own training loop calls it at the top of its script, or starts Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment. Nothing happens where it cannot
help: not Linux, glibc older than 2.35, transparent huge pages `never` (none to get) or
`always` (malloc's large blocks get them already), the tunable already set, or
`ADAPTER_PLUS_JAX_HUGE_PAGES=0` in the environment (to measure without).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "ADAPTER_PLUS_JAX_HUGE_PAGES"  # "0": leave the process as it started
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library if it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def would_reexec(
    environ: Mapping[str, str], glibc: tuple[int, int] | None, thp: str | None
) -> bool:
    """Whether restarting with the tunable would give malloc huge pages it does not get now."""
    if environ.get(OPT_OUT) == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    return glibc is not None and glibc >= (2, 35) and thp == "madvise"


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the tunable added to GLIBC_TUNABLES (':'-separated, others kept)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}


def huge_pages_on() -> bool:
    """Whether this process's malloc uses transparent huge pages for its large blocks."""
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        return glibc_version() is not None and thp_mode() in ("madvise", "always")
    return thp_mode() == "always"


def reexec_with_huge_pages() -> None:
    """Restart this process once with `glibc.malloc.hugetlb=1` where that helps (see the module
    docstring); otherwise return at once. Call it before any work: the process starts over."""
    if not sys.platform.startswith("linux"):
        return
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own flags included (-m, -X ...)
    if not argv or not sys.executable:
        return
    if not would_reexec(os.environ, glibc_version(), thp_mode()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, with_tunable(os.environ))
