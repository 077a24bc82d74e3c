"""`python -m adapter_plus_jax COMMAND ...` is `apj COMMAND ...` (see `adapter_plus_jax.cli`)."""

import sys

from adapter_plus_jax.cli import main

sys.exit(main(prog="python -m adapter_plus_jax"))
