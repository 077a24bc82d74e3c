"""Experiment configuration: the base ConfigDict, big_vision-style `file.py:arg` parsing, and the
training methods (adapter_plus, lora, vpt, linear, finetune) as PEFT settings."""

from __future__ import annotations

from typing import Any

import ml_collections

from adapter_plus_jax import peft

METHODS = ("adapter_plus", "lora", "vpt", "linear", "finetune")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse 'TASK,key=value,...' (the part after ':' in `--config file.py:ARG`).

    A bare first word sets `task`. Values take the type of their default; keys that have no
    default are rejected, so a typo fails at once.
    """
    out = ml_collections.ConfigDict(defaults)
    for i, item in enumerate(filter(None, (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            if i:
                raise ValueError(f"Config argument {item!r} must be key=value.")
            key, value = "task", item
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif default is None or isinstance(default, str):
            out[key] = value
        else:
            out[key] = type(default)(value)
    return out


def method_settings(method: str, dim: int = 8, num_tokens: int = 10) -> dict[str, Any]:
    """Adapter/LoRA/prompt configs and the trainable-parameter mode of a training method, with
    the reference's learning rates (finetune uses 1e-4, spec 8.7)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
    out: dict[str, Any] = dict(adapter=None, lora=None, prompt=None, train_mode="peft", lr=1e-3)
    if method == "adapter_plus":
        out["adapter"] = peft.adapter_config(dim=dim)
    elif method == "lora":
        out["lora"] = peft.lora_config(dim=dim)
    elif method == "vpt":
        out["prompt"] = peft.prompt_config(num_tokens=num_tokens)
    elif method == "linear":
        out["train_mode"] = "linear"
    else:
        out.update(train_mode="finetune", lr=1e-4)
    return out


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment: the paper's recipe (spec section 8.1)."""
    c = ml_collections.ConfigDict()
    # vtab | fgvc | tfds (any TFDS dataset with image and label) | demo (configs/demo.py)
    c.dataset = "vtab"
    c.task = ""
    c.tfds_name = ""  # dataset=tfds/demo: the TFDS builder name
    c.num_classes = 0  # dataset=tfds/demo: the class count
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.fgvc_root = ml_collections.config_dict.placeholder(str)  # VPT's json layout (FGVC)
    c.train_split = "train800val200"
    c.eval_split = "test"

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit_base_patch16_224.orig_in21k"
    c.model.pretrained = True  # False: the timm architecture with random weights (no network)
    c.model.timm_kwargs = ml_collections.ConfigDict()  # timm.create_model kwargs (random init)
    # Ported weights live in WEIGHTS_DIR/<name>; ported on first use when online.
    c.model.weights_dir = "~/.cache/adapter_plus_jax"
    c.model.drop_path_rate = 0.1
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32 (bf16-mixed, as Lightning)
    c.model.remat = False

    c.method = "adapter_plus"
    c.train_mode = "peft"  # peft | linear | train_ln | finetune
    c.adapter = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
    c.lora = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
    c.prompt = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)

    c.batch_size = 64
    c.eval_batch_size = 64
    c.epochs = 100
    c.warmup_epochs = 10
    c.lr = 1e-3
    c.lr_start_factor = 100.0
    c.lr_min_factor = 1000.0
    c.weight_decay = 1e-4
    c.label_smoothing = 0.0
    c.grad_clip = ml_collections.config_dict.placeholder(float)
    c.seed = 18
    c.checkpoint_every_epochs = 10
    c.log_every_steps = 5
    return c


def apply_method(c: ml_collections.ConfigDict, method: str, dim: int, num_tokens: int) -> None:
    """Fill `c` with a method's settings (in place)."""
    settings = method_settings(method, dim, num_tokens)
    c.method = method
    c.train_mode = settings["train_mode"]
    c.lr = settings["lr"]
    for key in ("adapter", "lora", "prompt"):
        if settings[key] is not None:
            c[key] = settings[key]
