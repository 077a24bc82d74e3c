"""python -m adapter_plus_jax.data prepare ...: see `adapter_plus_jax.data.prepare`."""

from adapter_plus_jax.data.prepare import main

main()
