"""Adapter+ (and the paper's baselines) on one FGVC dataset, with the paper's recipe.

    apj train --config configs/fgvc.py:cub --workdir runs/cub
    apj train --config configs/fgvc.py:nabirds --config.fgvc_root=/data/nabirds \\
        --workdir runs/nabirds
    apj train --config configs/fgvc.py:stanforddogs,method=vpt,seed=45 --workdir runs/dogs

Arguments after ':' (comma-separated; the first is the dataset: cub, nabirds, oxfordflower,
stanforddogs, stanfordcars):
  method   adapter_plus (default) | lora | vpt | linear | finetune, or another adapter
           position: post | pre | intermediate | parallel | houlsby | pfeiffer
  dim      Adapter+ rank; 0 (default) takes the paper's per-dataset r (dim1-32)
  tokens   VPT prompt tokens; 0 (default) takes the paper's per-dataset count
  seed     18 (default) | 45 | 25

Datasets with a TFDS builder (cub, oxfordflower, stanforddogs, stanfordcars) are read through
TFDS, whose train (+validation) split is VPT's trainval; nabirds needs `fgvc_root`, a folder in
VPT's layout (train.json, val.json, test.json and the images). Training uses random resized
crops and flips; evaluation a 256 resize and 224 centre crop.
Expected (paper): Adapter+ mean accuracy 90.7 over the five datasets.
"""

import ml_collections

from adapter_plus_jax import config as cfglib

# docs/recipe.md section 9: dataset -> (Adapter+ dim1-32 r, VPT tokens).
DATASET_SETTINGS = {
    "cub": (2, 10),
    "nabirds": (2, 50),
    "oxfordflower": (1, 5),
    "stanfordcars": (32, 200),
    "stanforddogs": (1, 100),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = cfglib.parse_arg(arg, task="cub", method="adapter_plus", dim=0, tokens=0, seed=18)
    if a.task not in DATASET_SETTINGS:
        names = sorted(DATASET_SETTINGS)
        raise ValueError(f"Unknown FGVC dataset {a.task!r}; expected one of {names}.")
    dim_default, tokens_default = DATASET_SETTINGS[a.task]
    dim = a.dim or (dim_default if a.method == "adapter_plus" else 8)
    c = cfglib.base_config()
    c.dataset, c.task, c.seed = "fgvc", a.task, a.seed
    c.train_split, c.eval_split = "trainval", "test"
    cfglib.apply_method(c, a.method, dim=dim, num_tokens=a.tokens or tokens_default)
    return c
