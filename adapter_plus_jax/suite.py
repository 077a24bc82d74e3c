"""Run a whole benchmark (VTAB-1k: 19 tasks; FGVC: 5 datasets) over seeds, and report it the way
the paper does.

    apj suite run --benchmark vtab --workdir runs/vtab
    apj suite run --benchmark vtab --workdir runs/vtab_lora \\
        --method lora --seeds 18,45,25 --tasks dtd,svhn --shard 0/4 \\
        --config.batch_size=32 --config.model.remat=True
    apj suite report --workdir runs/vtab
    apj suite select-rank --config configs/vtab.py:dtd \\
        --ranks 1,2,4,8,16,32 --workdir runs/dtd_ranks

`run` trains every (task, seed) of the benchmark through `runner.run(config,
WORKDIR/<task>/seed<seed>)`, with the config of `configs/<benchmark>.py` (`get_config('<task>,
seed=<seed>[,method=...][,<config-args>]')`) and the overrides applied. A run whose results.json
exists is skipped; an unfinished one resumes from its checkpoints, so rerunning the command
after a crash or a pre-emption continues where it stopped. A run that fails does not stop the
others: its error goes to <task>/seed<seed>/failed.json (listed by `report`), and a rerun
retries it. `--shard i/n` (0 <= i < n) takes
every n-th (task, seed) pair starting at i, for array jobs: n jobs may share one workdir.
With --distributed (and --coordinator_address, --num_processes, --process_id, as `apj train`),
the processes of one job train each run together.

`report` writes WORKDIR/results.md (per-task mean and population std over seeds, group means,
the global average as the paper computes it, trainable parameters, the paper's numbers) and
WORKDIR/params_vs_accuracy.png (trainable parameters against accuracy, as the paper's Figure 1).

A benchmark plugs in through its config module: `configs/fgvc.py` with
`get_config('cub,seed=18')` is all FGVC needs here.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from adapter_plus_jax import distributed, supervisor
from adapter_plus_jax.benchmark import BENCHMARKS, Benchmark, benchmark
from adapter_plus_jax.config import (
    OVERRIDES_HELP,
    apply_overrides,
    dashed,
    load_config,
    split_overrides,
)
from adapter_plus_jax.report import FAILED_JSON, PLOT_PNG, SUITE_JSON, report
from adapter_plus_jax.workdir import write_json_atomic

DEFAULT_SEEDS = (18, 45, 25)  # the paper's seeds


# ----------------------------------------------------------------------------------------------
# Running.


def parse_shard(shard: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    index, sep, count = shard.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or not 0 <= i < n:
        raise ValueError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4.")
    return i, n


def shard_runs(
    tasks: Sequence[str], seeds: Sequence[int], index: int, count: int
) -> list[tuple[str, int]]:
    """Shard `index` of `count` of the (task, seed) pairs: every count-th pair of the task-major
    list, starting at `index`. Round robin, so that each shard gets a mix of tasks (their costs
    differ by their test-set sizes)."""
    pairs = [(task, seed) for task in tasks for seed in seeds]
    return pairs[index::count]


def run_dir(workdir: Path, task: str, seed: int) -> Path:
    return workdir / task / f"seed{seed}"


def make_config(
    bench: Benchmark,
    task: str,
    seed: int,
    method: str | None = None,
    config_args: str = "",
    overrides: Sequence[str] = (),
    config_file: Path | None = None,
) -> ml_collections.ConfigDict:
    """The config of one run: get_config('<task>,seed=<seed>[,method=..][,args]') + overrides,
    with the benchmark's common head width unless the overrides set one."""
    arg = f"{bench.config_arg(task)},seed={seed}" + (f",method={method}" if method else "")
    arg += f",{config_args}" if config_args else ""
    config = load_config(f"{config_file or bench.config_file}:{arg}")
    if config.model.head_width == 0:  # automatic: one width, one compiled step, for all tasks
        config.model.head_width = bench.head_width
    apply_overrides(config, overrides)
    return config


def write_suite_json(workdir: Path, settings: dict[str, Any]) -> None:
    """Record what the workdir is for; refuse to mix benchmarks or methods in one workdir.
    Shards that start at once on a shared workdir take turns (a lock on WORKDIR/.suite.lock);
    the processes of one multi-process job leave it to process 0 and raise its refusal."""
    refusal = ""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / ".suite.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            try:
                _update_suite_json(workdir, settings)
            except ValueError as e:
                refusal = str(e)
    refusal = distributed.from_process_zero("the suite's settings", refusal)
    if refusal:
        raise ValueError(refusal)


def _update_suite_json(workdir: Path, settings: dict[str, Any]) -> None:
    path = workdir / SUITE_JSON
    if path.is_file():
        old = json.loads(path.read_text())
        keys = ("benchmark", "root", "method", "config_args")
        before, now = ({k: d.get(k) for k in keys} for d in (old, settings))
        if before != now:
            raise ValueError(
                f"{workdir} holds a suite with {before}; this run asks for {now}. "
                "Use another --workdir."
            )
        # Shards may run different seeds; keep every seed in first-seen order.
        seeds = list(dict.fromkeys([*old.get("seeds", []), *settings["seeds"]]))
        settings = {**settings, "seeds": seeds}
    write_json_atomic(path, settings)


def run_suite(
    bench: Benchmark,
    workdir: Path,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    tasks: Sequence[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    method: str | None = None,
    config_args: str = "",
    overrides: Sequence[str] = (),
    config_file: Path | None = None,
    cluster: distributed.Cluster | None = None,
) -> list[tuple[str, int]]:
    """Train and evaluate this shard's (task, seed) runs that have no results.json yet; with
    `cluster`, each run over every process of a multi-process job (`runner.run`).

    A failing run is reported and the next one started; returns the failed (task, seed) pairs.
    In a multi-process job a failing run ends the job, in every process
    (`distributed.failing_together`); a rerun skips the finished runs.
    """
    from adapter_plus_jax import runner

    tasks = list(tasks or bench.tasks)
    unknown = sorted(set(tasks) - set(bench.tasks))
    if unknown:
        raise ValueError(f"Unknown {bench.title} task(s) {unknown}; known: {list(bench.tasks)}.")
    settings = dict(
        benchmark=bench.name,
        root=str(bench.root) if bench.root else None,
        method=method,
        config_args=config_args,
        overrides=list(overrides),
        seeds=list(seeds),
    )
    # Build every config before the first run, so that a bad override fails at once.
    runs = shard_runs(tasks, seeds, *shard)
    configs = {
        (t, s): make_config(bench, t, s, method, config_args, overrides, config_file)
        for t, s in runs
    }
    if cluster is not None:
        distributed.initialize(cluster)
    write_suite_json(workdir, settings)
    failed = []
    for i, (task, seed) in enumerate(runs, 1):
        where = run_dir(workdir, task, seed)
        head = f"[{i}/{len(runs)}] {task} seed {seed}"
        done = (where / "results.json").is_file()
        if jax.process_count() > 1:  # process 0 decides for all: their views may lag
            done = distributed.from_process_zero("skip", "yes" if done else "") == "yes"
        if done:
            print(f"{head}: done already, skipped", flush=True)
            continue
        print(f"{head}: running in {where}", flush=True)
        try:
            runner.run(configs[task, seed], where, cluster=cluster)
        except Exception as e:  # keep going: one broken task should not stop an array job's others
            if jax.process_count() > 1:  # the processes cannot know they failed alike
                raise
            error = (
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
            print(f"{head}: FAILED ({error}); details in {where / FAILED_JSON}", flush=True)
            record = {
                "error": error,
                "traceback": traceback.format_exc(),
                "at": time.strftime("%c"),
            }
            if jax.process_index() == 0:
                where.mkdir(parents=True, exist_ok=True)
                write_json_atomic(where / FAILED_JSON, record)
            failed.append((task, seed))
        else:
            if jax.process_index() == 0:
                (where / FAILED_JSON).unlink(missing_ok=True)
    return failed


# ----------------------------------------------------------------------------------------------
# Command line.


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Sequence[str] | None, prog: str = "apj suite") -> argparse.Namespace:
    """The command's flags; `--config.KEY=VALUE` items land in `overrides`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate every (task, seed) of a benchmark",
                         epilog=OVERRIDES_HELP)  # fmt: skip
    run.add_argument("--benchmark", choices=BENCHMARKS, required=True)
    run.add_argument("--root", default=None, help="folders: the folder of image folders (tasks)")
    run.add_argument("--workdir", type=Path, required=True)
    run.add_argument("--seeds", type=_int_list, default=list(DEFAULT_SEEDS))
    run.add_argument("--tasks", type=_str_list, default=None, help="default: all")
    run.add_argument("--shard", type=_shard, default=(0, 1), help="i/n, 0 <= i < n")
    run.add_argument("--method", default=None, help="method=... for get_config (its default)")
    run.add_argument(
        "--config-args", default="", help="more get_config arguments, e.g. dims=dim1-8,dim=0"
    )
    run.add_argument("--config", type=Path, default=None, help="default: configs/<benchmark>.py")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show other libraries' logs (else each run's log.txt)",
    )
    distributed.add_arguments(run)
    sel = sub.add_parser("select-rank", help="choose the adapter rank on validation, as the paper",
                         epilog=OVERRIDES_HELP)  # fmt: skip
    sel.add_argument("--config", required=True, help="config[:args], e.g. configs/vtab.py:dtd")
    sel.add_argument("--ranks", type=_int_list, default=[1, 2, 4, 8, 16, 32])
    sel.add_argument("--workdir", type=Path, required=True)
    sel.add_argument(
        "--selection-splits",
        type=_str_list,
        default=None,
        help="TRAIN,VAL split strings of the selection runs (default: the dataset's)",
    )
    sel.add_argument("--verbose", action="store_true", help="show other libraries' logs")
    rep = sub.add_parser("report", help="write results.md and the plot of a workdir")
    rep.add_argument("--workdir", type=Path, required=True)
    rep.add_argument("--results-md", type=Path, default=None, help="default: WORKDIR/results.md")
    rep.add_argument("--plot", type=Path, default=None, help=f"default: WORKDIR/{PLOT_PNG}")
    rep.add_argument("--note", default="", help="a line to put under the title")
    rep.add_argument(
        "--benchmark",
        choices=BENCHMARKS,
        default=None,
        help="default: the one recorded by `run`",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config-override" in argv:
        parser.error("--config-override KEY=VALUE is now --config.KEY=VALUE, once per field")
    try:
        overrides, rest = split_overrides(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(dashed(rest))
    if overrides and args.command == "report":
        parser.error("report takes no --config.KEY=VALUE")
    args.overrides = overrides
    return args


def _select_rank(args: argparse.Namespace) -> int:
    from adapter_plus_jax.ranks import select_rank

    config = load_config(args.config)
    apply_overrides(config, args.overrides)
    splits = args.selection_splits
    if splits is not None and len(splits) != 2:
        raise ValueError(f"--selection-splits takes TRAIN,VAL; got {splits}.")
    select_rank(config, args.ranks, args.workdir, tuple(splits) if splits else None)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "apj suite") -> int:
    """Run the command; returns the exit status (2 for bad input, 1 if some runs failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    try:
        if args.command == "report":
            report(args.workdir, args.benchmark, args.results_md, args.plot, args.note)
            return 0
        cluster = distributed.cluster_from_args(args) if args.command == "run" else None
        # A multi-process job: this process watches a child that runs the command.
        if (
            cluster is not None
            and (status := supervisor.supervised(prog, cluster, ["suite", *argv])) is not None
        ):
            return status
        from adapter_plus_jax import console

        console.show_libraries() if args.verbose else console.quiet_libraries()
        if args.command == "select-rank":
            return _select_rank(args)
        with distributed.failing_together(prog):
            failed = run_suite(
                benchmark(args.benchmark, args.root),
                args.workdir,
                seeds=args.seeds,
                tasks=args.tasks,
                shard=args.shard,
                method=args.method,
                config_args=args.config_args,
                overrides=args.overrides,
                config_file=args.config,
                cluster=cluster,
            )
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input, found before training
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if failed:
        print("failed runs: " + ", ".join(f"{t}/seed{s}" for t, s in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # the same as `apj suite`
    sys.exit(main(prog="python -m adapter_plus_jax.suite"))
