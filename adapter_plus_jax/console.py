"""Keep the console for the run's own lines; other libraries' logs go to WORKDIR/log.txt.

TensorFlow, TFDS, Orbax, absl and JAX log through Python's `logging` (and TensorFlow's C++ core
through stderr): hundreds of INFO lines and AutoGraph warnings per run that would bury the
progress bar and the results. The command-line tools call `quiet_libraries()` first (unless
--verbose); every record from then on is kept and written to the log file of the workdir that
`log_to()` names, and the run says at its end how many warnings went there. Code that imports
the package as a library keeps its own logging set-up: without `quiet_libraries()`, `log_to()`
does nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TextIO

LOG_FILE = "log.txt"
_PENDING_LIMIT = 10_000  # records kept before the first workdir opens


class _LibraryLog(logging.Handler):
    """Records to a file; those that arrive before there is a file wait for it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.pending: list[str] = []
        self.file: TextIO | None = None
        self.path: Path | None = None
        self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if record.levelno >= logging.WARNING:
            self.warnings += 1
        if self.file is None:
            if len(self.pending) < _PENDING_LIMIT:
                self.pending.append(line)
            return
        self.file.write(line + "\n")
        self.file.flush()

    def open(self, path: Path) -> None:
        self.close_file()
        self.file, self.path, self.warnings = open(path, "a"), path, 0  # noqa: SIM115
        for line in self.pending:
            self.file.write(line + "\n")
        self.pending.clear()
        self.file.flush()

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_handler: _LibraryLog | None = None


def quiet_libraries() -> None:
    """Route every logging record (and Python warnings) to the log file; TensorFlow's C++ core
    to errors only. Call before TensorFlow is imported."""
    global _handler
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _handler is None:
        _handler = _LibraryLog()
    logging.captureWarnings(True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_handler)
    root.setLevel(logging.INFO)
    # Libraries that attach their own console handlers (TensorFlow, absl) after import.
    for name in ("tensorflow", "absl", "jax", "orbax"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.propagate = True
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO)
        absl_logging.get_absl_handler().setLevel(logging.CRITICAL + 1)
    except ImportError:
        pass


def show_libraries() -> None:
    """--verbose: every library's INFO records on the console (stderr)."""
    logging.basicConfig(level=logging.INFO)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO)
    except ImportError:
        pass


def log_file(process: int = 0) -> str:
    """The log's name: log.txt, and log.process<I>.txt for the other processes of a
    multi-process run, which share the workdir."""
    return LOG_FILE if process == 0 else f"log.process{process}.txt"


def log_to(workdir: Path, process: int = 0) -> None:
    """Write the library log of the run in `workdir` to WORKDIR/log.txt (when quieted); process
    `process` of a multi-process run to its own file (`log_file`)."""
    if _handler is not None:
        quiet_libraries()  # TensorFlow adds its handler when first imported, which may be later
        _handler.open(workdir / log_file(process))


def close() -> None:
    """Stop writing to the current workdir's log (records wait for the next `log_to`)."""
    if _handler is not None:
        _handler.close_file()


def summary() -> str | None:
    """'N library warnings in WORKDIR/log.txt' when there were any since `log_to`."""
    if _handler is None or not _handler.warnings or _handler.path is None:
        return None
    if not _handler.path.exists():  # a failed start removed the workdir it created
        return None
    return f"{_handler.warnings} library warning(s) in {_handler.path} (--verbose shows them)"
