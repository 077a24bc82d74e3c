"""`apj`, the command line of adapter_plus_jax (installed by `pip install .`; in a clone of the
repository `python main.py` is `apj train` and `python port_weights.py` is `apj port`).

    apj train --config configs/demo.py --workdir runs/demo
    apj suite run --benchmark vtab --workdir runs/vtab
    apj port --model vit_base_patch16_224.orig_in21k --out ported/vit_b16_in21k
    apj export --workdir runs/demo --out tasks/demo
    apj predict --task tasks/demo digits/
    apj data prepare --tasks all

Every command takes --help. Flags are spelled with dashes; every command that takes a config
sets its fields with --config.KEY=VALUE (or --config.KEY VALUE).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence

from adapter_plus_jax import backend, distributed, supervisor
from adapter_plus_jax import config as cfglib


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of `apj`: its line in `apj --help`, where it lives, whether it trains."""

    help: str
    target: str  # 'module:function', the function taking (argv, prog) -> exit status
    trains: tuple[str, ...] = ()  # its first arguments that train ('*': all of them)


COMMANDS = {
    "train": Command("train and evaluate one run (resumes in its workdir)",
                     "adapter_plus_jax.cli:train", ("*",)),  # fmt: skip
    "suite": Command("whole benchmarks over seeds: run, report, select-rank",
                     "adapter_plus_jax.suite:main", ("run", "select-rank")),  # fmt: skip
    "port": Command("port a timm ViT's weights to a Flax directory", "adapter_plus_jax.port:main"),
    "export": Command("a finished run as a small task directory", "adapter_plus_jax.export:main"),
    "predict": Command("classify image files with exported tasks",
                       "adapter_plus_jax.predict:main"),  # fmt: skip
    "data": Command("prepare TFDS datasets; write the demo's test images",
                    "adapter_plus_jax.data.prepare:main"),  # fmt: skip
}


def usage(prog: str) -> str:
    """`apj --help`: the commands and how to get their options."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:{width}}  {c.help}" for name, c in COMMANDS.items()]
    return (
        f"usage: {prog} <command> [options]\n\n"
        "Adapter+ (Adapters Strike Back, CVPR 2024) for timm Vision Transformers in JAX/Flax.\n\n"
        "commands:\n" + "\n".join(lines) + f"\n\n`{prog} <command> --help` shows a command's "
        "options; flags are spelled with dashes, and config fields are set with "
        "--config.KEY=VALUE."
    )


def run_command(name: str, argv: Sequence[str], prog: str) -> int:
    """Run command `name` with `argv`; returns its exit status. Commands that train restart the
    process once with huge pages first where that helps (`backend.reexec_with_huge_pages`): the
    entry points call this, and a library caller of a command's function keeps its process."""
    command = COMMANDS[name]
    trains = "*" in command.trains or (argv and argv[0] in command.trains)
    if trains and not {"-h", "--help"} & set(argv):
        backend.reexec_with_huge_pages()
    module, function = command.target.split(":")
    return getattr(importlib.import_module(module), function)(list(argv), prog) or 0


def main(argv: Sequence[str] | None = None, prog: str = "apj") -> int:
    """`apj COMMAND ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"adapter_plus_jax {version('adapter_plus_jax')}")
        except PackageNotFoundError:
            print("adapter_plus_jax (not installed: run from a clone)")
        return 0
    if argv[0] not in COMMANDS:
        print(f"{prog}: error: unknown command {argv[0]!r}; expected one of "
              f"{', '.join(COMMANDS)} (`{prog} --help`).", file=sys.stderr)  # fmt: skip
        return 2
    return run_command(argv[0], argv[1:], f"{prog} {argv[0]}")


TRAIN_DOC = """Train and evaluate Adapter+ (or LoRA, VPT, linear probing, fine-tuning) as the paper.

    apj train --config configs/vtab.py:dtd --workdir runs/dtd
    apj train --config configs/vtab.py:dtd,method=lora,seed=45 --workdir runs/dtd_lora
    apj train --config configs/vtab.py:dtd --config.epochs=10 --workdir runs/dtd_short
    apj train --config configs/vtab.py:dtd --workdir runs/dtd --eval-only
    apj train --config configs/demo.py --workdir runs/demo      # the offline demo

Rerunning a command with the same --workdir resumes from its last good checkpoint (a finished
run prints its results); a checkpoint made with another config is refused unless
--allow-config-change. Other libraries' logs go to WORKDIR/log.txt (--verbose: the console).
Several processes (hosts) train one run when each starts the same command with --distributed
and its --process-id (README, "Several hosts").
"""


def train(argv: Sequence[str], prog: str = "apj train") -> int:
    """`apj train` (main.py): one run through `runner.run`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog, description=TRAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=cfglib.OVERRIDES_HELP,
    )  # fmt: skip
    parser.add_argument("--config", required=True, help="config file[:argument], e.g. "
                        "configs/vtab.py:dtd")  # fmt: skip
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, results.json")
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate the last checkpoint in --workdir"
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a checkpoint made with another config, with the new values",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show other libraries' logs (else WORKDIR/log.txt)"
    )
    distributed.add_arguments(parser)
    try:
        overrides, rest = cfglib.split_overrides(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(cfglib.dashed(rest))
    try:
        cluster = distributed.cluster_from_args(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    # A multi-process run: this process watches a child that runs the command (before the
    # console is set up: the child sets up its own).
    if (
        cluster is not None
        and (status := supervisor.supervised(prog, cluster, ["train", *argv])) is not None
    ):
        return status
    from adapter_plus_jax import console

    console.show_libraries() if args.verbose else console.quiet_libraries()
    try:
        config = cfglib.load_config(args.config)
        cfglib.apply_overrides(config, overrides)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    from adapter_plus_jax import runner

    try:
        with distributed.failing_together(prog):
            runner.run(config, args.workdir, args.eval_only, args.allow_config_change, cluster)
    except (runner.SetupError, FloatingPointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
