"""timm ViTs wrapped by HF peft (LoRA, DoRA, (IA)³, VeRA) <-> `tuning.TuneSpec` and our
parameters.

    peft_model = peft.get_peft_model(timm_model, peft.LoraConfig(r=8, target_modules=["qkv"]))
    module, variables = convert.from_timm(peft_model)          # a peft model converts too
    peft_model.load_state_dict(to_peft(params, peft_model), strict=False)   # and back

The layers peft may change are each block's `attn.qkv`, `attn.proj`, `mlp.fc1` and `mlp.fc2`,
the same in every block, with one rank and alpha (no rank or alpha patterns, no rsLoRA, no
peft-trained biases). peft's names map to ours per layer (W: the layer's base weight):

    lora_A.default.weight (r, in)           -> lora_a (in, r)
    lora_B.default.weight (out, r)          -> lora_b (r, out)
    lora_magnitude_vector.default.weight    -> dora_m
    ia3_l.default (out, 1) or (1, in)       -> ia3
    vera_lambda_b.default, vera_lambda_d    -> vera_lambda_b, vera_lambda_d
    vera_A.default (r, in_max)              -> vera_a (in, r): its first `in` columns
    vera_B.default (out_max, r)             -> vera_b (r, out): its first `out` rows
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.tuning import LINEARS, TuneSpec

_LAYERS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
# peft's name within a layer -> (ours, its value in our layout given peft's and W's shape)
_NAMES: dict[str, tuple[str, Callable[[np.ndarray, tuple[int, int]], np.ndarray]]] = {
    "lora_A.default.weight": ("lora_a", lambda v, w: v.T),
    "lora_B.default.weight": ("lora_b", lambda v, w: v.T),
    "lora_magnitude_vector.default.weight": ("dora_m", lambda v, w: v),
    "ia3_l.default": ("ia3", lambda v, w: v.reshape(-1)),
    "vera_lambda_b.default": ("vera_lambda_b", lambda v, w: v),
    "vera_lambda_d.default": ("vera_lambda_d", lambda v, w: v),
    "vera_A.default": ("vera_a", lambda v, w: v[:, : w[1]].T),
    "vera_B.default": ("vera_b", lambda v, w: v[: w[0]].T),
}
_KEY = re.compile(r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(.+)")


class PeftConversionError(SetupError):
    """A peft model this conversion does not support; the message says what to change."""


def is_peft_model(model: Any) -> bool:
    """Whether `model` is an HF peft `PeftModel` (or its tuner) around a timm model."""
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def unwrap(model: Any) -> tuple[Any, TuneSpec, dict[str, np.ndarray]]:
    """(the timm model inside, the TuneSpec of its peft config, a timm-named state dict in which
    peft's parameters carry our names and layouts, for `convert.params_from_state_dict`)."""
    name = getattr(model, "active_adapter", "default")
    name = name[0] if isinstance(name, list) else name
    if name != "default":
        raise PeftConversionError(f"peft adapter {name!r}: only the one named 'default' converts.")
    config = model.peft_config[name]
    base = model.base_model.model
    spec = _spec(config, _targets(base), base)
    state = {k: v.detach().cpu().numpy() for k, v in base.state_dict().items()}
    if hasattr(base.head, "modules_to_save"):  # modules_to_save=["head"]: its trained copy
        view = copy.copy(base)  # the model, seen with that copy as its head (not changed)
        view._modules = {**base._modules, "head": base.head.modules_to_save["default"]}
        base = view
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.startswith("head.original_module."):  # modules_to_save=["head"]: the copy trains
            continue
        if key.startswith("head.modules_to_save.default."):
            out[f"head.{key.rsplit('.', 1)[1]}"] = value
            continue
        m = _KEY.fullmatch(key)
        if m is None or m[3] in ("weight", "bias"):
            out[key] = value
        elif m[3].startswith("base_layer."):
            out[f"blocks.{m[1]}.{m[2]}.{m[3].removeprefix('base_layer.')}"] = value
        elif m[3] in _NAMES:
            ours, convert = _NAMES[m[3]]
            weight = state[f"blocks.{m[1]}.{m[2]}.base_layer.weight"].shape
            out[f"blocks.{m[1]}.{m[2]}.{ours}"] = np.ascontiguousarray(convert(value, weight))
        else:
            raise PeftConversionError(f"{key}: a peft parameter this conversion does not know.")
    return base, spec, out


def _targets(base: Any) -> tuple[str, ...]:
    """The block layers peft wraps: the same in every block, and nothing outside them."""
    per_block: list[tuple[str, ...]] = []
    for i, block in enumerate(base.blocks):
        wrapped = tuple(
            _LAYERS[n] for n, m in block.named_modules() if n in _LAYERS and _is_tuner(m)
        )
        others = [n for n, m in block.named_modules() if n not in _LAYERS and _is_tuner(m)]
        if others:
            raise PeftConversionError(f"blocks.{i}: peft wraps {others}; only {list(_LAYERS)}.")
        per_block.append(wrapped)
    outside = [n for n, m in base.named_modules() if _is_tuner(m) and not n.startswith("blocks.")]
    if outside:
        raise PeftConversionError(
            f"peft wraps {outside} (a target name like 'proj' also matches patch_embed.proj): "
            "target the blocks' layers only, e.g. "
            "target_modules=r'blocks\\.\\d+\\.attn\\.(qkv|proj)'."
        )
    if not per_block or not per_block[0] or len(set(per_block)) != 1:
        raise PeftConversionError(
            f"peft must wrap the same layers in every block; it wraps {sorted(set(per_block))}."
        )
    return tuple(t for t in LINEARS if t in per_block[0])


def _is_tuner(module: Any) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "active_adapters")


def _spec(config: Any, targets: tuple[str, ...], base: Any) -> TuneSpec:
    kind = type(config).__name__
    if getattr(config, "bias", "none") != "none":
        raise PeftConversionError(f"{kind}(bias={config.bias!r}): only bias='none' converts.")
    if kind == "LoraConfig":
        if config.rank_pattern or config.alpha_pattern or config.use_rslora:
            raise PeftConversionError(
                "LoraConfig with rank_pattern, alpha_pattern or use_rslora: one rank and "
                "alpha = scaling * rank for every layer convert."
            )
        return TuneSpec("dora" if config.use_dora else "lora", targets, int(config.r),
                        float(config.lora_alpha), float(config.lora_dropout))  # fmt: skip
    if kind == "IA3Config":
        block = base.blocks[0]
        inputs = tuple(
            _LAYERS[n] for n, m in block.named_modules()
            if n in _LAYERS and _is_tuner(m) and m.is_feedforward
        )  # fmt: skip
        return TuneSpec("ia3", targets, ia3_inputs=inputs)
    if kind == "VeraConfig":
        return TuneSpec("vera", targets, int(config.r), dropout=float(config.vera_dropout),
                        vera_d=float(config.d_initial))  # fmt: skip
    raise PeftConversionError(f"{kind}: converts LoraConfig (LoRA, DoRA), IA3Config, VeraConfig.")


def to_peft(params: Mapping[str, Any], peft_model: Any) -> dict[str, Any]:
    """Our trained `tuning` parameters and head as a state dict for `peft_model.load_state_dict(
    sd, strict=False)`. VeRA's fixed matrices must be the peft model's (parameters converted
    from it): PeftConversionError otherwise."""
    import torch

    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in
            traverse_util.flatten_dict(dict(params)).items()}  # fmt: skip
    out = {}
    state = peft_model.state_dict()
    for key, value in state.items():
        m = _KEY.search(key)
        if m is not None and m[3].startswith(("vera_A", "vera_B")):
            ours, convert = _NAMES[m[3]]
            weight = state[key.replace(m[3], "base_layer.weight")].shape
            layer = "/".join(("attn" if m[2].startswith("attn") else "mlp", _LAYERS[m[2]]))
            theirs = convert(value.detach().cpu().numpy(), weight)
            if not np.allclose(flat[f"blocks_{m[1]}/{layer}/{ours}"], theirs, atol=1e-6):
                raise PeftConversionError(
                    f"{key}: VeRA's fixed random matrices differ from this peft model's (a VeRA "
                    "run trained here draws its own); only parameters converted from this "
                    "peft model export back into it."
                )
            continue
        if m is not None and m[3] in _NAMES:
            ours, _ = _NAMES[m[3]]
            layer = "/".join(("attn" if m[2].startswith("attn") else "mlp", _LAYERS[m[2]]))
            mine = flat[f"blocks_{m[1]}/{layer}/{ours}"]
            mine = mine.T if ours in ("lora_a", "lora_b") else mine.reshape(value.shape)
        elif re.search(r"(^|\.)head\.(modules_to_save\.default\.)?(weight|bias)$", key):
            mine = flat["head/kernel"].T if key.endswith("weight") else flat["head/bias"]
        else:
            continue
        out[key] = torch.from_numpy(np.array(mine, np.float32, order="C"))
    return out
