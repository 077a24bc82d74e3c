"""Adapter+ on any TFDS image-classification dataset (features 'image' and 'label').

    apj train --config configs/tfds.py:oxford_flowers102 --workdir runs/flowers
    apj train --config configs/tfds.py:cifar10,train_split=train[:5000],eval_split=test \\
        --workdir runs/cifar10_5k

Arguments (after ':'): the TFDS builder name (a version may follow: 'cifar10:3.0.2'), then
method, dim (adapter / LoRA rank, default 8), tokens (VPT, default 50), seed, epochs,
train_split and eval_split (TFDS split strings, default 'train' and 'test'). The number of
classes is read from the builder's info. The dataset must be prepared (`tfds build NAME`, or
`tfds.builder(NAME).download_and_prepare()`) in --config.data_dir or TFDS's default directory.
Images are resized to the model's input size as in VTAB; the rest of the recipe is the paper's
VTAB-1k recipe (docs/recipe.md).
"""

import ml_collections

from adapter_plus_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = cfglib.parse_arg(
        arg,
        task="",
        method="adapter_plus",
        dim=8,
        tokens=50,
        seed=18,
        epochs=100,
        train_split="train",
        eval_split="test",
    )
    if not a.task:
        raise ValueError("configs/tfds.py needs a TFDS builder name: configs/tfds.py:NAME[,...].")
    c = cfglib.base_config()
    c.dataset, c.task, c.tfds_name, c.seed, c.epochs = "tfds", a.task, a.task, a.seed, a.epochs
    c.warmup_epochs = min(c.warmup_epochs, a.epochs)
    c.train_split, c.eval_split = a.train_split, a.eval_split
    c.num_classes = 0  # 0: read from the builder's info
    cfglib.apply_method(c, a.method, dim=a.dim, num_tokens=a.tokens)
    return c
