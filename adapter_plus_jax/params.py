"""Parameter trees: which parameters a method trains (big_vision style: regex rules over
'/'-joined paths), counting them, splitting them into trainable and frozen subtrees, filling a
model from pretrained weights, folding LoRA into the frozen weights, and the one report of how
two sets of named arrays differ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

if TYPE_CHECKING:  # only for annotations: params sits below the model in the layering
    from adapter_plus_jax.model import VisionTransformer
    from adapter_plus_jax.peft import LoRASpec

MAX_LISTED = 10

# ----------------------------------------------------------------------------------------------
# Which parameters train.

# (group, rule): the first rule that fully matches a path gives its group. Every parameter must
# match one, so that a parameter this table does not know about fails loudly instead of being
# silently frozen or trained.
_BLOCK = r"blocks_\d+/"
_BRANCH = (
    r"(adapter|adapter_attn|attn/lora_[qkvo])/((down|up)/(kernel|bias)|norm/(scale|bias)|scaling)"
)
_NORMS = r"(blocks_\d+/(norm1|norm2|attn/q_norm|attn/k_norm)|norm_pre|norm|fc_norm|attn_pool/norm)"
_LINEAR = r"(attn/(qkv|proj)|mlp/fc[12])"  # a block's linear layers, which `tuning` may change
_TUNED = r"lora_[ab]|dora_m|ia3|vera_lambda_[bd]|ssf_scale|ssf_shift|fact_core"
_SSF_AFTER = r"(blocks_\d+/(norm1|norm2)|norm|fc_norm|patch_embed)_ssf"
PARAM_GROUPS: tuple[tuple[str, str], ...] = (
    ("peft", _BLOCK + _BRANCH),
    ("peft", _BLOCK + "prompt"),
    ("peft", _BLOCK + _LINEAR + "/(" + _TUNED + ")"),
    ("peft", _SSF_AFTER + "/(scale|shift)"),
    ("peft", r"fact/(u|v|core|factors)"),
    ("fixed", _BLOCK + _LINEAR + "/vera_[ab]"),  # VeRA's random matrices: the task's, frozen
    ("head", r"head/(kernel|bias)"),
    ("norm", _NORMS + r"/scale"),
    ("norm_bias", _NORMS + r"/bias"),
    ("bias", r"patch_embed/bias|" + _BLOCK + _LINEAR + "/bias"),
    ("bias", r"attn_pool/(q|kv|proj|mlp/fc[12])/bias"),
    ("backbone", r"patch_embed/kernel|cls_token|reg_token|pos_embed"),
    ("backbone", _BLOCK + r"(" + _LINEAR + r"/kernel|ls[12]/gamma)"),
    ("backbone", r"attn_pool/(latent|(q|kv|proj|mlp/fc[12])/kernel)"),
)

# The groups each training mode updates (docs/recipe.md section 7; 'train_ln' adds LayerNorms;
# 'bitfit' every bias, LayerNorms' included; 'ln_tune' the LayerNorms).
TRAINABLE_GROUPS: dict[str, frozenset[str]] = {
    "linear": frozenset({"head"}),
    "peft": frozenset({"head", "peft"}),
    "train_ln": frozenset({"head", "peft", "norm", "norm_bias"}),
    "finetune": frozenset({"head", "peft", "norm", "norm_bias", "bias", "backbone"}),
    "bitfit": frozenset({"head", "bias", "norm_bias"}),
    "ln_tune": frozenset({"head", "norm", "norm_bias"}),
}
# What a backbone is: the groups every task on it shares, unless its method trains them.
BACKBONE_GROUPS = frozenset({"norm", "norm_bias", "bias", "backbone"})


def param_group(path: str) -> str | None:
    """The group ('peft', 'fixed', 'head', 'norm', 'norm_bias', 'bias' or 'backbone') of a
    '/'-joined parameter path, or None when no rule matches."""
    for group, rule in PARAM_GROUPS:
        if re.fullmatch(rule, path):
            return group
    return None


def _path_str(keypath: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def trainable_mask(params: Any, mode: str = "peft") -> Any:
    """A tree of bools shaped like `params`: True on the parameters that `mode` trains.

    Modes: 'linear' (head only), 'peft' (adapters, LoRA branches, prompts, the parameters of
    `tuning`'s methods and head, as the reference trains them), 'train_ln' ('peft' plus every
    LayerNorm scale and bias), 'finetune' (everything but VeRA's fixed matrices), 'bitfit'
    (every bias, LayerNorms' included, and the head) and 'ln_tune' (every LayerNorm scale and
    bias, and the head). `params` is the 'params' collection (arrays or ShapeDtypeStructs,
    dict or FrozenDict); the result has the same tree structure, for `optax.masked` and friends.

    Raises ValueError for an unknown mode, or listing the paths that no rule matches.
    """
    if mode not in TRAINABLE_GROUPS:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {sorted(TRAINABLE_GROUPS)}.")
    groups = TRAINABLE_GROUPS[mode]
    unmatched: list[str] = []

    def mark(keypath: tuple[Any, ...], _: Any) -> bool:
        path = _path_str(keypath)
        group = param_group(path)
        if group is None:
            unmatched.append(path)
        return group in groups

    mask = jax.tree_util.tree_map_with_path(mark, params)
    if unmatched:
        raise ValueError(
            f"trainable_mask: {len(unmatched)} parameter(s) match no rule of PARAM_GROUPS "
            f"(pass the 'params' collection, not the whole variables): {unmatched[:10]}"
        )
    return mask


def trainable_count(params: Any, mode: str = "peft") -> int:
    """The number of scalars that `mode` trains (see `trainable_mask`)."""
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves(trainable_mask(params, mode))
    return sum(int(np.prod(p.shape)) for p, on in zip(leaves, flags, strict=True) if on)


def param_count(tree: Any) -> int:
    """The number of scalars in a tree of arrays (or ShapeDtypeStructs)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def split(params: Mapping[str, Any], mask: Mapping[str, Any]) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees of `params` by a boolean `mask` of the same structure."""
    flat = traverse_util.flatten_dict(dict(params))
    flat_mask = traverse_util.flatten_dict(dict(mask))
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """Inverse of `split`."""
    flat = traverse_util.flatten_dict(dict(frozen))
    flat.update(traverse_util.flatten_dict(dict(trainable)))
    return traverse_util.unflatten_dict(flat)


HEAD_MULTIPLE = 128  # head widths round up to this by default (`head_width`)


def head_width(num_classes: int, setting: int = 0) -> int:
    """The width a head of `num_classes` classes is padded to: `setting` if positive (at least
    the class count), the class count itself for -1, else the class count rounded up to a
    multiple of HEAD_MULTIPLE, so that runs with other class counts compile the same step."""
    if setting > 0:
        if setting < num_classes:
            raise ValueError(
                f"model.head_width={setting} is smaller than the {num_classes} classes; use 0 "
                "(automatic) or a width >= the class count."
            )
        return setting
    if setting == -1 or num_classes == 0:
        return num_classes
    return -(-num_classes // HEAD_MULTIPLE) * HEAD_MULTIPLE


def resize_head(params: Mapping[str, Any], width: int) -> dict:
    """`params` with the head's kernel and bias cut or padded with zeros to `width` outputs. A
    padded class whose logit is masked out (`train.mask_classes`) gets no gradient, so its
    zeros never change; cutting back to the class count gives the unpadded head."""
    head = dict(params["head"])
    pad = width - head["bias"].shape[-1]

    def resized(x: Any) -> Any:
        if pad <= 0:
            return x[..., :width]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])

    return {**params, "head": {k: resized(v) for k, v in head.items()}}


# ----------------------------------------------------------------------------------------------
# Pretrained weights into a model with fresh PEFT modules.


def init_params(module: VisionTransformer, pretrained: dict, rng: jax.Array) -> dict:
    """Fresh params for the PEFT modules; every backbone and head parameter from `pretrained`
    (DoRA's magnitudes follow the weights they scale)."""
    cfg = module.config
    images = jnp.zeros((1, *cfg.img_size, cfg.in_chans), jnp.float32)
    fresh = traverse_util.flatten_dict(jax.jit(module.init)(rng, images)["params"])
    given = traverse_util.flatten_dict(pretrained)
    unknown = sorted("/".join(k) for k in set(given) - set(fresh))
    if unknown:
        raise ValueError(f"Pretrained parameters the model does not have: {unknown}")
    fresh.update(given)
    for key in fresh:
        if key[-1] == "dora_m" and key not in given:
            # DoRA's magnitude starts as the norm of the weight it now holds, per output.
            fresh[key] = jnp.linalg.norm(fresh[(*key[:-1], "kernel")], axis=0)
    return traverse_util.unflatten_dict(fresh)


# ----------------------------------------------------------------------------------------------
# How two sets of named arrays differ.


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    more = len(keys) - MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def key_diff(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]) -> str:
    """'' when `found` has exactly the names and shapes of `expected`; otherwise one line with
    the missing, unexpected and wrongly shaped names (the first 10 of each, and how many)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = [
        f"{k} {tuple(found[k])} (model: {tuple(expected[k])})"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    parts = [
        f"{what} ({len(keys)}): {_listing(keys)}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", bad),
        )
        if keys
    ]
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Folding LoRA into the frozen weights.


def _branch_affine(branch: Mapping[str, Any], spec: LoRASpec) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with branch(x) = x @ W + b, in float64, for a linear branch (no act, no norm).

    W = K_down K_up diag(s), b = (b_down K_up + b_up) s; s is the fixed, learned (one scalar) or
    per-channel scaling. Eval mode: dropout and drop path are the identity there.
    """
    down, up = branch["down"], branch["up"]
    k_up = np.asarray(up["kernel"], np.float64)
    learned = spec.scaling in ("learned", "channel")
    scaling = np.asarray(branch["scaling"], np.float64) if learned else spec.scaling
    weight = np.asarray(down["kernel"], np.float64) @ k_up * scaling
    bias = np.zeros(k_up.shape[1])
    if "bias" in down:
        bias = bias + np.asarray(down["bias"], np.float64) @ k_up
    if "bias" in up:
        bias = bias + np.asarray(up["bias"], np.float64)
    return weight, bias * scaling


def merge_lora(
    module: VisionTransformer, variables: Mapping[str, Any]
) -> tuple[VisionTransformer, Any]:
    """Fold the LoRA branches into the attention's qkv and proj weights, for inference.

    q/k/v branches read the attention input x and add to that third of the qkv output, so
    W_qkv[:, part] += W and b_qkv[part] += b. The 'o' branch reads the proj output p:
    p + (p W_o + b_o) = x W_p (I + W_o) + b_p (I + W_o) + b_o, folded into proj.

    Returns (the module without LoRA, its variables); a module without LoRA comes back as is.
    Eval-mode outputs are unchanged (to float32 rounding); LoRA dropout and drop path, which are
    training-only, are gone. Raises ValueError when the branches are not linear (act_layer or
    norm_layer set).
    """
    spec = module.lora
    if spec is None:
        return module, variables
    nonlinear = [f"{name}=True" for name in ("act_layer", "norm_layer") if getattr(spec, name)]
    if nonlinear:
        raise ValueError(
            f"merge_lora: LoRA branches with {', '.join(nonlinear)} are not linear and cannot be "
            "folded into qkv/proj; keep them unmerged."
        )
    merged = unfreeze(variables)
    c = module.config.embed_dim
    for i in range(module.config.depth):
        attn = merged["params"][f"blocks_{i}"]["attn"]
        branches = {loc: attn.pop(f"lora_{loc}") for loc in spec.location}
        qkv, proj = attn["qkv"], attn["proj"]
        for part, loc in enumerate("qkv"):
            if loc not in branches:
                continue
            weight, bias = _branch_affine(branches[loc], spec)
            cols = slice(part * c, (part + 1) * c)
            qkv["kernel"] = _add(qkv["kernel"], weight, (slice(None), cols))
            if "bias" in qkv:  # the branch has a bias only when qkv has one
                qkv["bias"] = _add(qkv["bias"], bias, cols)
        if "o" in branches:
            weight, bias = _branch_affine(branches["o"], spec)
            out = np.eye(c) + weight
            kernel = np.asarray(proj["kernel"], np.float64) @ out
            proj_bias = np.asarray(proj["bias"], np.float64) @ out + bias
            proj["kernel"] = jnp.asarray(kernel, proj["kernel"].dtype)
            proj["bias"] = jnp.asarray(proj_bias, proj["bias"].dtype)
    if isinstance(variables, FrozenDict):
        merged = freeze(merged)
    return module.clone(lora=None), merged


def _add(param: jax.Array, delta: np.ndarray, index: Any) -> jax.Array:
    """param with delta added at index, summed in float64."""
    value = np.array(param, np.float64)
    value[index] += delta
    return jnp.asarray(value, param.dtype)
