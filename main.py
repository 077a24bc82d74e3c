"""Train and evaluate Adapter+ (or LoRA, VPT, linear probing, fine-tuning) like the paper.

    python main.py --config configs/vtab.py:dtd --workdir runs/dtd
    python main.py --config configs/vtab.py:dtd,method=lora,seed=45 --workdir runs/dtd_lora
    python main.py --config configs/vtab.py:dtd --config.epochs=10 --workdir runs/dtd_short
    python main.py --config configs/vtab.py:dtd --workdir runs/dtd --eval_only
    python main.py --config configs/demo.py --workdir runs/demo      # offline demo, ~1 min CPU

`--config.KEY=VALUE` sets any field of the config (nested keys with dots; unknown keys are
rejected). Rerunning a command with the same --workdir resumes from its last good checkpoint
(a finished run prints its results); a checkpoint made with another config is refused unless
--allow_config_change. Other libraries' logs go to WORKDIR/log.txt (--verbose: the console).
On several hosts, start the same command on each with --distributed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(the flags, the 'KEY=VALUE' config overrides given as --config.KEY=VALUE)."""
    parser = argparse.ArgumentParser(
        prog="main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="config file[:argument], e.g. "
                        "configs/vtab.py:dtd")  # fmt: skip
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, results.json")
    parser.add_argument(
        "--eval_only", action="store_true", help="evaluate the last checkpoint in --workdir"
    )
    parser.add_argument(
        "--distributed", action="store_true", help="jax.distributed.initialize() (multi-host)"
    )
    parser.add_argument(
        "--allow_config_change",
        action="store_true",
        help="resume a checkpoint made with another config, with the new values",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show other libraries' logs (else WORKDIR/log.txt)"
    )
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r}")
        key, sep, value = item.removeprefix("--config.").partition("=")
        if not sep:  # --config.KEY VALUE
            if i + 1 == len(rest):
                parser.error(f"{item} needs a value")
            value, i = rest[i + 1], i + 1
        overrides.append(f"{key}={value}")
        i += 1
    return args, overrides


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    from adapter_plus_jax import console

    console.show_libraries() if args.verbose else console.quiet_libraries()
    from adapter_plus_jax import config as cfglib

    try:
        config = cfglib.load_config(args.config)
        cfglib.apply_overrides(config, overrides)
        # The GPU check of model.attention starts JAX's backend: runner.run makes it after
        # jax.distributed.initialize.
        cfglib.validate(config, backend=not args.distributed)
    except ValueError as e:  # SetupError included
        sys.exit(f"main.py: error: {e}")
    import jax

    if args.distributed:
        jax.distributed.initialize()
    from adapter_plus_jax import runner

    try:
        runner.run(config, args.workdir, args.eval_only, args.allow_config_change)
    except (runner.SetupError, FloatingPointError) as e:
        sys.exit(f"main.py: error: {e}")


if __name__ == "__main__":
    from adapter_plus_jax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # once, before any work: XLA:CPU's steps ran 1.33x faster
    main()
