"""Conversion between timm / adapter-plus PyTorch ViTs and the Flax model.

The architecture is read off the live torch module (`timm_arch.py`), never from a table of
model names. Parameter names map one way, Flax -> timm, in `timm_key`; the same mapping fills
Flax parameters from a torch state dict (`params_from_state_dict`) and exports them back
(`to_adapter_plus`). Every Flax parameter must be filled and every torch tensor used, or the
conversion fails with the list of keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapter_plus_jax import hf_peft
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.params import key_diff
from adapter_plus_jax.timm_arch import ConversionError, peft_specs_from_timm, vit_config_from_timm

# ----------------------------------------------------------------------------------------------
# The key mapping: Flax parameter path -> timm state-dict key.
#
#   patch_embed/kernel                  patch_embed.proj.weight        (OIHW -> HWIO)
#   blocks_{i}/attn/qkv/kernel          blocks.{i}.attn.qkv.weight     (transposed)
#   blocks_{i}/norm1/scale              blocks.{i}.norm1.weight
#   blocks_{i}/ls1/gamma                blocks.{i}.ls1.gamma
#   blocks_{i}/adapter/down/kernel      blocks.{i}.adapter.bottleneck.1.weight   (adapter-plus)
#   blocks_{i}/adapter/up/kernel        blocks.{i}.adapter.bottleneck.4.weight
#   blocks_{i}/adapter/norm/scale       blocks.{i}.adapter.norm_a.weight
#   blocks_{i}/attn/lora_q/down/kernel  blocks.{i}.attn.adapters.q.bottleneck.1.weight
#   blocks_{i}/prompt                   blocks.{i}.prompt
#   everything else: '/' -> '.', kernel/scale -> weight.

_BRANCH_MODULES = {"down": "bottleneck.1", "up": "bottleneck.4", "norm": "norm_a"}


def _is_branch(name: str) -> bool:
    return name in ("adapter", "adapter_attn") or name.startswith("lora_")


def timm_key(path: tuple[str, ...]) -> str:
    """The timm (adapter-plus) state-dict key of a Flax parameter path."""
    parts: list[str] = []
    for i, name in enumerate(path[:-1]):
        if m := re.fullmatch(r"blocks_(\d+)", name):
            parts += ["blocks", m[1]]
        elif m := re.fullmatch(r"lora_([qkvo])", name):
            parts += ["adapters", m[1]]
        elif i > 0 and _is_branch(path[i - 1]) and name in _BRANCH_MODULES:
            parts.append(_BRANCH_MODULES[name])
        elif name == "patch_embed":
            parts.append("patch_embed.proj")
        else:
            parts.append(name)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale") else leaf)
    return ".".join(parts)


def _torch_to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
    if leaf == "kernel":
        return value.T
    return value


def _flax_to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel":
        return value.T
    return value


def params_from_state_dict(
    module: VisionTransformer,
    state_dict: Mapping[str, Any],
    ignore: Iterable[str] = (),
) -> dict:
    """Flax params for `module` filled from a timm state dict (torch tensors or numpy arrays).

    Raises ConversionError listing missing keys, unused keys (not in `ignore`) and shape
    mismatches, in torch's names and layouts.
    """
    shapes = traverse_util.flatten_dict(abstract_params(module))
    ignored = set(ignore)
    arrays = {k: _to_numpy(v) for k, v in state_dict.items() if k not in ignored}
    expected = {
        timm_key(path): _flax_to_torch(path[-1], np.empty(a.shape, np.bool_)).shape
        for path, a in shapes.items()
    }
    problems = key_diff(expected, {k: v.shape for k, v in arrays.items()})
    if problems:
        raise ConversionError(f"Checkpoint does not match the model: {problems}.")
    return traverse_util.unflatten_dict(
        {
            path: jnp.asarray(_torch_to_flax(path[-1], arrays[timm_key(path)]), a.dtype)
            for path, a in shapes.items()
        }
    )


def abstract_params(module: VisionTransformer) -> dict:
    """Shapes and dtypes of the module's parameters, without computing anything."""
    cfg = module.config
    images = jax.ShapeDtypeStruct((1, *cfg.img_size, cfg.in_chans), jnp.float32)
    rngs = {"params": jax.random.key(0)}
    return jax.eval_shape(lambda x: module.init(rngs, x), images)["params"]


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy copy: JAX may alias a numpy buffer on CPU, and torch may later change the
    tensor in place (an optimizer step), which must not reach the converted parameters."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        value = value.float() if value.dtype.is_floating_point else value
        return value.numpy().copy()
    return np.array(value)


# ----------------------------------------------------------------------------------------------
# Entry points.


def from_timm(model: Any, dtype: Any = jnp.float32) -> tuple[VisionTransformer, dict]:
    """Convert a live timm VisionTransformer (an adapter-plus model, or a timm model wrapped by
    HF peft: `hf_peft.py`) to (module, variables)."""
    tune, state = None, None
    if hf_peft.is_peft_model(model):
        model, tune, state = hf_peft.unwrap(model)
    config = vit_config_from_timm(model)
    adapter, lora, prompt = peft_specs_from_timm(model)
    module = VisionTransformer(config, adapter=adapter, lora=lora, prompt=prompt, dtype=dtype,
                               tune=tune)  # fmt: skip
    params = params_from_state_dict(module, state if state is not None else model.state_dict())
    return module, {"params": params}


def to_adapter_plus(
    params: Mapping[str, Any], include: str = r"adapter|lora_|prompt|^head/"
) -> dict[str, Any]:
    """Export the adapter, LoRA, prompt and head parameters as a PyTorch state dict that the
    reference model loads (`model.load_state_dict(sd, strict=False)`)."""
    import torch

    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for path, value in flat.items():
        if re.search(include, "/".join(path)):
            # A fresh C-ordered copy: torch wants a writable array.
            array = np.array(_flax_to_torch(path[-1], np.asarray(value, np.float32)), order="C")
            out[timm_key(path)] = torch.from_numpy(array)
    return out
