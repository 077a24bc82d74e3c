"""Adapter+ on your own images: ROOT/train/<class>/* (and optionally ROOT/val, ROOT/test).

    apj train --config configs/folder.py:/path/to/root --workdir runs/mine
    apj train --config configs/folder.py:/path/to/root,method=lora,dim=4 --workdir runs/lora

Arguments (after ':'): the folder, then method, dim (adapter / LoRA rank, default 8), tokens
(VPT, default 50), seed and epochs. The layout, the image formats and the holdout used when
there is no test/ folder are described in adapter_plus_jax/data/folder.py and the README
("Train on your own images"). The backbone is the paper's (`--config.model.name=` takes another
timm name or a ported directory); the rest of the recipe is the paper's VTAB-1k recipe
(docs/recipe.md).
"""

from pathlib import Path

import ml_collections

from adapter_plus_jax import config as cfglib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = cfglib.parse_arg(arg, task="", method="adapter_plus", dim=8, tokens=50, seed=18,
                         epochs=100)  # fmt: skip
    if not a.task:
        raise ValueError("configs/folder.py needs the image folder: configs/folder.py:/path/to/dir")
    c = cfglib.base_config()
    root = Path(a.task).expanduser()
    c.dataset, c.task, c.data_dir = "folder", root.name or "images", str(root)
    c.seed, c.epochs = a.seed, a.epochs
    c.warmup_epochs = min(c.warmup_epochs, a.epochs)
    c.train_split, c.eval_split = "train+val", "test"
    cfglib.apply_method(c, a.method, dim=a.dim, num_tokens=a.tokens)
    return c
