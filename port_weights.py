"""`apj port` from a clone of the repository: port a timm ViT's weights to the Flax model.

    python port_weights.py --model vit_base_patch16_224.orig_in21k --out ported/vit_b16_in21k
    python port_weights.py --model vit_base_patch16_224 --checkpoint model.safetensors --out DIR

`python port_weights.py --help` lists the options; the command is `adapter_plus_jax.port`.
"""

import sys

from adapter_plus_jax.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("port", sys.argv[1:], prog="port_weights.py"))
