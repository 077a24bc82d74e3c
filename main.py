"""`apj train` from a clone of the repository: train and evaluate one run.

    python main.py --config configs/demo.py --workdir runs/demo

`python main.py --help` lists the options; the command is `adapter_plus_jax.cli.train`.
"""

import sys

from adapter_plus_jax.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:], prog="main.py"))
