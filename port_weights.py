"""Port a timm Vision Transformer's weights to the Flax model (adapter_plus_jax).

    python port_weights.py --model vit_base_patch16_224.orig_in21k --out ported/vit_b16_in21k
    python port_weights.py --model vit_base_patch16_224 --checkpoint model.safetensors --out DIR

`python port_weights.py --help` lists the options; the logic is `adapter_plus_jax.port`.
"""

import sys

from adapter_plus_jax.port import main

if __name__ == "__main__":
    sys.exit(main())
