"""The benchmarks a suite runs: VTAB-1k (19 tasks), FGVC (5 datasets) and your own image
folders, each with its tasks' groups and class counts, its config file and the paper's numbers.
A new benchmark is added here, in `benchmark`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from adapter_plus_jax.config import CONFIGS_DIR

BENCHMARKS = ("vtab", "fgvc", "folders")


# ----------------------------------------------------------------------------------------------
# The paper's numbers.


@dataclasses.dataclass(frozen=True)
class PaperResult:
    """One method's row in the paper: trainable parameters (M, averaged over tasks; None when
    not given), the group means (None when the paper gives only the average) and the average.
    In the plot, the points of one `series` are joined by a line and labelled with `point`."""

    method: str
    params_m: float | None
    groups: tuple[float, ...] | None
    average: float
    series: str = ""  # default: the method
    point: str = ""


FIXED, PER_TASK = "Adapter+ (fixed r)", "Adapter+ (r per task, opt.)"
# "Adapters Strike Back" (Steitz & Roth, CVPR 2024), ViT-B/16 IN-21k, mean over seeds 18, 45, 25,
# from its tables; the per-task-r rows' parameter counts were read off its Figure 1
# (about +-0.005 M). Groups: Natural, Specialized, Structured.
PAPER_VTAB = (
    PaperResult("Adapter+ r=8", 0.20, (83.3, 86.2, 63.3), 77.6, FIXED, "r=8"),
    PaperResult("Adapter+ opt. r in [1..32]", 0.27, None, 77.9, PER_TASK, "r<=32"),
    PaperResult("Adapter+ opt. r in [1..8]", 0.16, None, 77.7, PER_TASK, "r<=8"),
    PaperResult("Adapter+ opt. r in [1..4]", 0.11, None, 77.4, PER_TASK, "r<=4"),
    PaperResult("Adapter+ r=4", 0.13, None, 77.4, FIXED, "r=4"),
    PaperResult("Adapter+ r=2", 0.09, None, 76.9, FIXED, "r=2"),
    PaperResult("Adapter+ r=1", 0.07, None, 76.3, FIXED, "r=1"),
    PaperResult("VPT-deep", 0.60, (82.5, 84.6, 62.1), 76.4),
    PaperResult("LoRA r=8 (q, k)", 0.29, (82.4, 84.3, 60.1), 75.6),
    PaperResult("Full fine-tuning", 85.8, (78.6, 86.3, 57.8), 74.2),
)
# FGVC: Adapter+ with r per dataset (cub 2, nabirds 2, oxfordflower 1, stanforddogs 1,
# stanfordcars 32); the paper-numbers file gives the mean accuracy only.
PAPER_FGVC = (PaperResult("Adapter+ (r per dataset)", None, None, 90.7),)


# ----------------------------------------------------------------------------------------------
# Benchmarks.


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A suite of tasks: its groups (in the paper's order), config module and paper numbers.

    With several groups the average is the mean of the group means (VTAB-1k's "global"
    average); with one group it is the mean over its tasks.
    """

    name: str
    title: str
    groups: Mapping[str, tuple[str, ...]]
    paper: tuple[PaperResult, ...]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for tasks in self.groups.values() for t in tasks)

    num_classes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    root: Path | None = None  # folders: the folder that holds one image folder per task

    @property
    def config_file(self) -> Path:
        return CONFIGS_DIR / ("folder.py" if self.root else f"{self.name}.py")

    def config_arg(self, task: str) -> str:
        """The task as its config file's argument names it (a folder's path, else the name)."""
        return str(self.root / task) if self.root else task

    @property
    def head_width(self) -> int:
        """One head width for every task (`params.head_width` of the most classes), so that
        the suite's runs share one compiled step; 0 where the class counts are unknown."""
        from adapter_plus_jax.params import head_width

        return head_width(max(self.num_classes.values())) if self.num_classes else 0

    def group_of(self, task: str) -> str:
        return next(g for g, tasks in self.groups.items() if task in tasks)


def benchmark(name: str, root: str | Path | None = None) -> Benchmark:
    """The named benchmark ('vtab', 'fgvc', or 'folders': every image folder under `root`),
    with the task lists and class counts of the data modules."""
    if name in ("vtab", "fgvc"):
        # The data modules import TensorFlow; timm must be loaded first (both bring an LLVM, and
        # the other order aborts the process).
        import timm  # noqa: F401

    if name == "vtab":
        from adapter_plus_jax.data import vtab

        groups = {g: tuple(t for t, s in vtab.TASKS.items() if s.group == g) for g in vtab.GROUPS}
        classes = {t: s.num_classes for t, s in vtab.TASKS.items()}
        return Benchmark("vtab", "VTAB-1k", groups, PAPER_VTAB, classes)
    if name == "fgvc":
        from adapter_plus_jax.data import fgvc

        classes = {t: s.num_classes for t, s in fgvc.FGVC.items()}
        return Benchmark("fgvc", "FGVC", {"FGVC": tuple(fgvc.FGVC)}, PAPER_FGVC, classes)
    if name == "folders":
        return _folders(root)
    raise ValueError(f"Unknown benchmark {name!r}; expected {', '.join(BENCHMARKS)}.")


def _folders(root: str | Path | None) -> Benchmark:
    """Every image folder (a directory with train/) directly under `root`, one task each."""
    from adapter_plus_jax.data import folder

    if not root:
        raise ValueError("--benchmark folders needs --root: the folder of image folders.")
    path = Path(root).expanduser().absolute()
    tasks = (
        sorted(p.name for p in path.iterdir() if (p / "train").is_dir()) if path.is_dir() else []
    )
    if not tasks:
        raise ValueError(f"{path} holds no image folder (<task>/train/<class>/<images>).")
    classes = {t: len(folder.scan(str(path / t)).classes) for t in tasks}
    return Benchmark("folders", f"Image folders in {path}", {"Folders": tuple(tasks)}, (), classes,
                     path)  # fmt: skip
