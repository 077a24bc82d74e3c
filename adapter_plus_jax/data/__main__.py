"""`python -m adapter_plus_jax.data ...` is `apj data ...` (`adapter_plus_jax.data.prepare`)."""

import sys

from adapter_plus_jax.data.prepare import main

sys.exit(main(prog="python -m adapter_plus_jax.data"))
