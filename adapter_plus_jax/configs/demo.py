"""Offline demo: Adapter+ on scikit-learn's handwritten digits with a small random-init ViT.

    apj train --config configs/demo.py --workdir runs/demo

Needs no network and no TensorFlow: the digits ship inside scikit-learn and are held in memory
(1,000 training / 797 test images, 10 classes). The backbone is timm's ViT
architecture (32x32 input, 8x8 patches, width 128, depth 4, average pooling) with random
weights, frozen; only the adapters and the head train, as in the paper, for 40 epochs. The
README ("Run") gives its time and test accuracy, measured (chance: 0.1); a random backbone is a
weak feature extractor, which is the point of pretrained ones.
"""

import ml_collections

from adapter_plus_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = cfglib.parse_arg(arg, method="adapter_plus", dim=8, seed=18, epochs=40)
    c = cfglib.base_config()
    c.dataset, c.task, c.num_classes = "demo", "digits", 10
    c.train_split, c.eval_split = "train", "test"
    c.model.name = "vit_tiny_patch16_224"
    c.model.pretrained = False
    # 16 patches of 8x8 pixels, 128 wide, 4 deep; average pooling (no class token).
    c.model.timm_kwargs = ml_collections.ConfigDict(
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=128,
            depth=4,
            num_heads=2,
            class_token=False,
            global_pool="avg",
        )
    )
    c.model.dtype = "float32"  # width 128: too small for bfloat16 to pay off on a CPU
    c.seed, c.epochs, c.warmup_epochs = a.seed, a.epochs, 3
    c.batch_size, c.eval_batch_size = 50, 100
    c.checkpoint_every_epochs = 5
    cfglib.apply_method(c, a.method, dim=a.dim, num_tokens=10)
    c.lr = 1e-2  # a random backbone needs larger adapter updates than a pretrained one
    return c
