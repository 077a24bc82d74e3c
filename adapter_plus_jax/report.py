"""The paper's numbers, the benchmarks, and the report of a suite's runs as the paper computes
it: per-task mean and population std over seeds, group means, the global average (the mean of the
group means for VTAB-1k), trainable parameters, a markdown table and the parameters-vs-accuracy
plot of the paper's Figure 1. `apj suite report` writes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapter_plus_jax.benchmark import Benchmark, PaperResult, benchmark

RESULTS_MD, PLOT_PNG, SUITE_JSON = "results.md", "params_vs_accuracy.png", "suite.json"
FAILED_JSON = "failed.json"  # <task>/seed<seed>/failed.json: the last attempt's error


# ----------------------------------------------------------------------------------------------
# Aggregation.


@dataclasses.dataclass(frozen=True)
class TaskSummary:
    task: str
    group: str
    accuracies: dict[int, float]  # seed -> top-1 accuracy (%)
    trainable_params: float

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.accuracies.values())))

    @property
    def std(self) -> float:
        """Population standard deviation over seeds (ddof=0)."""
        return float(np.std(list(self.accuracies.values())))


@dataclasses.dataclass(frozen=True)
class Summary:
    """A benchmark's aggregate. Group means are over the finished tasks of the group (None when
    it has none); `average` is the mean of the group means there are (None when there are none).
    Until `complete`, both are partial (reports mark them)."""

    bench: Benchmark
    tasks: dict[str, TaskSummary]
    group_means: dict[str, float | None]
    average: float | None
    params_m: float | None  # trainable parameters in millions, averaged over tasks
    complete: bool  # every task of the benchmark has every expected seed
    missing: list[tuple[str, int]]


def summarize(
    bench: Benchmark, runs: Mapping[str, Mapping[int, Mapping[str, Any]]], seeds: Sequence[int]
) -> Summary:
    """Aggregate `runs` ({task: {seed: results.json contents}}) as the paper does: per task the
    mean over seeds, per group the mean over its tasks, the average over the group means."""
    tasks = {
        task: TaskSummary(
            task,
            bench.group_of(task),
            {seed: 100.0 * r["test_accuracy"] for seed, r in sorted(by_seed.items())},
            float(np.mean([r["trainable_params"] for r in by_seed.values()])),
        )
        for task in bench.tasks
        if (by_seed := runs.get(task))
    }
    group_means = {
        group: float(np.mean(means)) if means else None
        for group, members in bench.groups.items()
        for means in [[tasks[t].mean for t in members if t in tasks]]
    }
    known = [m for m in group_means.values() if m is not None]
    average = float(np.mean(known)) if known else None
    params = [t.trainable_params for t in tasks.values()]
    missing = [(t, s) for t in bench.tasks for s in seeds if s not in runs.get(t, {})]
    return Summary(
        bench,
        tasks,
        group_means,
        average,
        float(np.mean(params)) / 1e6 if params else None,
        complete=not missing,
        missing=missing,
    )


def collect_failures(workdir: Path) -> dict[tuple[str, int], str]:
    """{(task, seed): error line} of the runs whose last attempt failed (`suite run`)."""
    failures = {}
    for path in sorted(workdir.glob(f"*/seed*/{FAILED_JSON}")):
        seed = int(path.parent.name.removeprefix("seed"))
        try:
            error = json.loads(path.read_text())["error"]
        except (ValueError, KeyError):
            error = "(unreadable failed.json)"
        failures[path.parent.parent.name, seed] = error
    return failures


def collect_runs(workdir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """{task: {seed: results.json}} of the finished runs under workdir/<task>/seed<seed>."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(workdir.glob("*/seed*/results.json")):
        seed = int(path.parent.name.removeprefix("seed"))
        runs.setdefault(path.parent.parent.name, {})[seed] = json.loads(path.read_text())
    return runs


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt(value: float | None, partial: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" + ("*" if partial else "")


def _params(value: float | None) -> str:
    """Millions: two decimals as the paper, three significant digits for tiny test models."""
    if value is None:
        return "–"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def markdown(
    summary: Summary,
    method: str,
    seeds: Sequence[int],
    plot_link: str,
    note: str = "",
    failures: Mapping[tuple[str, int], str] | None = None,
) -> str:
    """The report: runs finished (and failed), per-task table, summary table beside the paper,
    the plot."""
    lines = [f"# {summary.bench.title}: {method}", "", *([note, ""] if note else [])]
    lines += _runs_section(summary, seeds, failures or {})
    lines += _per_task_section(summary)
    lines += _summary_section(summary, method, seeds)
    lines += [
        "",
        'Paper: "Adapters Strike Back" (Steitz & Roth, CVPR 2024), ViT-B/16 pretrained on '
        "ImageNet-21k, mean over seeds 18, 45, 25.",
        "",
        f"![Trainable parameters vs accuracy]({plot_link})",
    ]
    return "\n".join(lines) + "\n"


def _runs_section(
    summary: Summary, seeds: Sequence[int], failures: Mapping[tuple[str, int], str]
) -> list[str]:
    """How many runs finished, which are missing, which failed and why."""
    bench = summary.bench
    n_runs = len(bench.tasks) * len(seeds)
    done = n_runs - len(summary.missing)
    line = (f"{done} of {n_runs} runs finished ({len(bench.tasks)} tasks x seeds "
            f"{', '.join(map(str, seeds))}).")  # fmt: skip
    if summary.missing:
        by_task: dict[str, list[int]] = {}
        for task, seed in summary.missing:
            by_task.setdefault(task, []).append(seed)
        missing = [f"{t} ({', '.join(map(str, s))})" for t, s in by_task.items()]
        line += " Missing (seeds): " + ", ".join(missing) + "."
    lines = [line]
    if failures:
        lines += ["", f"## Failed runs ({len(failures)}; `apj suite run` again retries them)", ""]
        lines += [f"- {task} seed {seed}: {error}" for (task, seed), error in failures.items()]
    return lines


def _per_task_section(summary: Summary) -> list[str]:
    """What the tables show, and the per-task table."""
    bench = summary.bench
    several = len(bench.groups) > 1
    lines = [
        "",
        "Top-1 test accuracy (%), mean ± population std over seeds. "
        + (
            "Group means average their tasks; the global average is the mean of the group "
            f"means (as in the paper), not of the {len(bench.tasks)} tasks. "
            if several
            else "The mean averages the tasks. "
        )
        + "Values marked * do not cover every run yet. #Params: trainable parameters including "
        "the head, averaged over tasks (millions).",
        "",
        "## Per task",
        "",
        "| Task | " + ("Group | " if several else "") + "Accuracy (%) | Seeds | Trainable params |",
        "|---|" + ("---|" if several else "") + "---|---|---|",
    ]
    for task in bench.tasks:
        t = summary.tasks.get(task)
        group = f" {bench.group_of(task)} |" if several else ""
        if t is None:
            lines.append(f"| {task} |{group} – | 0 | – |")
            continue
        lines.append(
            f"| {task} |{group} {t.mean:.2f} ± {t.std:.2f} | {len(t.accuracies)} | "
            f"{t.trainable_params:,.0f} |"
        )
    return lines


def _summary_section(summary: Summary, method: str, seeds: Sequence[int]) -> list[str]:
    """Our group means and average beside the paper's."""
    bench = summary.bench
    several = len(bench.groups) > 1
    partial_groups = {
        g: any((t, s) in summary.missing for t in tasks for s in seeds)
        for g, tasks in bench.groups.items()
    }
    group_names = list(bench.groups) if several else []
    columns = [*group_names, "Global" if several else "Mean"]
    lines = [
        "",
        "## Summary",
        "",
        "| Method | #Params (M) | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    ours = [_fmt(summary.group_means[g], partial_groups[g]) for g in group_names]
    ours.append(_fmt(summary.average, not summary.complete))
    lines.append(f"| **ours: {method}** | {_params(summary.params_m)} | " + " | ".join(ours) + " |")
    for p in bench.paper:
        groups = [_fmt(v) for v in p.groups] if p.groups else ["–"] * len(group_names)
        lines.append(
            f"| paper: {p.method} | {_params(p.params_m)} | "
            + " | ".join([*groups, _fmt(p.average)])
            + " |"
        )
    return lines


def plot(summary: Summary, method: str, path: Path) -> None:
    """Trainable parameters (log scale) against the average accuracy, as the paper's Figure 1:
    the paper's methods as reference points, our run as a star."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series: dict[str, list[PaperResult]] = {}
    for p in summary.bench.paper:
        series.setdefault(p.series or p.method, []).append(p)
    markers = iter("osD^vP")
    # Labelled series sit close together: label them above and below their points in turn.
    offsets = iter([(0, 5), (0, -10)] * 3)
    for name, points in series.items():
        if points[0].params_m is None:  # only an average: a reference line
            ax.axhline(points[0].average, color="tab:blue", ls="--", lw=1, label=f"paper: {name}")
            continue
        points = sorted(points, key=lambda p: p.params_m)
        x, y = [p.params_m for p in points], [p.average for p in points]
        ax.plot(x, y, marker=next(markers), ms=5, lw=1, label=f"paper: {name}")
        offset = next(offsets) if any(p.point for p in points) else None
        for p in points:
            if p.point:
                ax.annotate(
                    p.point,
                    (p.params_m, p.average),
                    fontsize=6,
                    xytext=offset,
                    textcoords="offset points",
                    ha="center",
                )
    if summary.average is not None and summary.params_m is not None:
        label = f"ours: {method}" + ("" if summary.complete else " (partial)")
        ax.scatter(
            summary.params_m,
            summary.average,
            marker="*",
            s=200,
            color="black",
            zorder=3,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (M, log scale)")
    average = "global average" if len(summary.bench.groups) > 1 else "mean"
    ax.set_ylabel(f"{summary.bench.title} {average} accuracy (%)")
    ax.set_title(f"{summary.bench.title}: parameters vs accuracy")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(
    workdir: Path,
    benchmark_name: str | None = None,
    results_md: Path | None = None,
    plot_png: Path | None = None,
    note: str = "",
) -> Summary:
    """Write results.md and the plot (default: into the workdir) from the finished runs;
    returns the summary. `note` is a line put under the title."""
    settings_path = workdir / SUITE_JSON
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    name = benchmark_name or settings.get("benchmark")
    if name is None:
        raise ValueError(f"No {SUITE_JSON} in {workdir}: pass --benchmark vtab|fgvc.")
    bench = benchmark(name, settings.get("root"))
    runs = collect_runs(workdir)
    if not runs:
        raise ValueError(f"No finished runs (<task>/seed<seed>/results.json) under {workdir}.")
    seeds = settings.get("seeds") or sorted({s for by_seed in runs.values() for s in by_seed})
    methods = sorted({r["method"] for by_seed in runs.values() for r in by_seed.values()})
    method = " + ".join(methods)
    summary = summarize(bench, runs, seeds)
    results_md = results_md or workdir / RESULTS_MD
    plot_png = plot_png or workdir / PLOT_PNG
    results_md.parent.mkdir(parents=True, exist_ok=True)
    plot_png.parent.mkdir(parents=True, exist_ok=True)
    # The image link is relative to the markdown file, so that both can move together.
    link = os.path.relpath(plot_png.resolve(), results_md.parent.resolve())
    failures = collect_failures(workdir)
    results_md.write_text(markdown(summary, method, seeds, link, note, failures))
    plot(summary, method, plot_png)
    print(f"wrote {results_md} and {plot_png}")
    return summary
