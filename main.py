"""Train and evaluate Adapter+ (or LoRA, VPT, linear probing, fine-tuning) like the paper.

    python main.py --config configs/vtab.py:dtd --workdir runs/dtd
    python main.py --config configs/vtab.py:dtd,method=lora,seed=45 --workdir runs/dtd_lora
    python main.py --config configs/vtab.py:dtd --config.epochs=10 --workdir runs/dtd_short
    python main.py --config configs/vtab.py:dtd --workdir runs/dtd --eval_only
    python main.py --config configs/demo.py --workdir runs/demo      # offline demo, ~3 min CPU

Rerunning a command with the same --workdir resumes from its last checkpoint. On several hosts,
start the same command on each with --distributed.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/vtab.py:dtd.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.DEFINE_bool("eval_only", False, "Evaluate the last checkpoint in --workdir; no training.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    if flags.FLAGS.distributed:
        jax.distributed.initialize()
    from adapter_plus_jax import runner

    try:
        runner.run(flags.FLAGS.config, flags.FLAGS.workdir, eval_only=flags.FLAGS.eval_only)
    except (runner.SetupError, FloatingPointError) as e:
        sys.exit(f"main.py: error: {e}")


if __name__ == "__main__":
    app.run(main)
