"""Adapter+ (and the paper's baselines) on one VTAB-1k task, with the paper's recipe.

    apj train --config configs/vtab.py:dtd --workdir runs/dtd
    apj train --config configs/vtab.py:dtd,method=lora,seed=45 --workdir runs/dtd_lora_s45
    apj train --config configs/vtab.py:svhn,dim=8 --config.epochs=50 --workdir runs/svhn_r8

Arguments after ':' (comma-separated; the first is the task):
  method   adapter_plus (default) | lora | vpt | linear | finetune, or another adapter
           position: post | pre | intermediate | parallel | houlsby | pfeiffer
  dim      Adapter+ rank r; 0 (default) takes the per-task r of `dims`. LoRA uses 8.
  dims     dim1-32 (default) | dim1-8 | dim1-4: the paper's per-task r chosen from [1..r_max]
  tokens   VPT prompt tokens; 0 (default) takes the paper's per-task count
  seed     18 (default) | 45 | 25: the paper's three seeds

Expected (paper, ViT-B/16 IN-21k, mean of the 3 group means over 3 seeds): Adapter+ with
per-task r in [1..32] 77.9 (0.27 M params); fixed r=8 77.6; VPT-deep 76.4; LoRA r=8 75.6;
full fine-tuning 74.2. Trains on train800val200 (1000 images), evaluates once on test.
"""

import ml_collections

from adapter_plus_jax import config as cfglib

# docs/recipe.md section 9: task -> (dim1-4, dim1-8, dim1-32, VPT tokens).
TASK_SETTINGS = {
    "cifar100": (1, 1, 1, 10),
    "caltech101": (4, 4, 4, 10),
    "dtd": (2, 2, 2, 10),
    "flowers102": (1, 1, 1, 1),
    "pet": (4, 8, 8, 1),
    "svhn": (4, 8, 16, 50),
    "sun397": (1, 1, 1, 5),
    "camelyon": (4, 8, 16, 100),
    "eurosat": (2, 2, 2, 100),
    "resisc45": (4, 8, 32, 10),
    "retinopathy": (2, 8, 32, 1),
    "clevr_count": (4, 4, 4, 100),
    "clevr_distance": (2, 8, 8, 200),
    "dmlab": (4, 8, 8, 100),
    "kitti": (4, 8, 8, 100),
    "dsprites_position": (4, 8, 32, 100),
    "dsprites_orientation": (4, 4, 4, 100),
    "smallnorb_azimuth": (4, 8, 32, 200),
    "smallnorb_elevation": (4, 8, 8, 200),
}
DIMS_COLUMN = {"dim1-4": 0, "dim1-8": 1, "dim1-32": 2}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = cfglib.parse_arg(
        arg, task="dtd", method="adapter_plus", dim=0, dims="dim1-32", tokens=0, seed=18
    )
    if a.task not in TASK_SETTINGS:
        tasks = sorted(TASK_SETTINGS)
        raise ValueError(f"Unknown VTAB-1k task {a.task!r}; expected one of {tasks}.")
    if a.dims not in DIMS_COLUMN:
        raise ValueError(f"Unknown dims {a.dims!r}; expected one of {sorted(DIMS_COLUMN)}.")
    settings = TASK_SETTINGS[a.task]
    dim = a.dim or (settings[DIMS_COLUMN[a.dims]] if a.method == "adapter_plus" else 8)
    c = cfglib.base_config()
    c.dataset, c.task, c.seed = "vtab", a.task, a.seed
    cfglib.apply_method(c, a.method, dim=dim, num_tokens=a.tokens or settings[3])
    return c
