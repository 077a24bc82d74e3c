"""Parameter-efficient modules: the Adapter (Adapter+ by default), LoRA branches and VPT prompts.

The math follows the reference package `adapter-plus` 0.1.0 (`adapter_plus/vit_adapter.py`):

    Adapter(x, skip) = scaling * DropPath(up(Dropout(act(down(norm(x)))))) + skip

Where the adapter sits in a block (`config`: post, pre, parallel, intermediate, houlsby,
pfeiffer) is wired in `model.Block`; LoRA branches are used inside `model.Attention`; prompts are
written into the token sequence by `model.Block`.

Configurations are ml_collections ConfigDicts with the reference's field names. They are turned
into frozen, validated `*Spec` dataclasses when a model is built, so that a bad field fails at
once with a message naming it.

Also here: `trainable_mask` (which parameters a method trains, as a bool tree for optax) and
`merge_lora` (folds linear LoRA branches into the frozen attention weights for inference).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax.core import FrozenDict, freeze, unfreeze

from adapter_plus_jax.precision import Dense

if TYPE_CHECKING:
    from adapter_plus_jax.model import VisionTransformer

POSITIONS = ("post", "pre", "parallel", "intermediate", "houlsby", "pfeiffer")
INITS = ("houlsby", "lora", "bert")
LORA_LOCATIONS = ("q", "k", "v", "o")


# ----------------------------------------------------------------------------------------------
# Configs (reference field names) and their validated, hashable specs.


def _config(defaults: dict[str, Any], overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    # Not type-safe: `scaling` is a float or a string, and overrides may switch between them.
    return ml_collections.ConfigDict({**defaults, **overrides}, type_safe=False)


def adapter_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Adapter config with the reference defaults of Adapter+ (conf/adapter/adapter_plus.yaml)."""
    defaults = dict(
        config="post",
        dim=8,
        act_layer=True,
        norm_layer=False,
        bias=True,
        init="houlsby",
        scaling="channel",
        attn_adapter=False,
        dropout=0.0,
        drop_path=0.1,
    )
    return _config(defaults, overrides)


def lora_config(**overrides: Any) -> ml_collections.ConfigDict:
    """LoRA config of the reference's experiment (r=8 on q and k, dropout before the branch).

    The reference's yaml says `init: lora`, but its LoRAAttention never passes `init` on, so its
    branches get the houlsby init; that is our default too. Set init='lora' for true LoRA init.
    """
    defaults = dict(
        config="attention",
        location="qk",
        dim=8,
        act_layer=False,
        norm_layer=False,
        bias=False,
        init="houlsby",
        scaling=1.0,
        dropout=0.1,
        pre_dropout=True,
        drop_path=0.0,
    )
    return _config(defaults, overrides)


def prompt_config(**overrides: Any) -> ml_collections.ConfigDict:
    """VPT config (conf/prompt/prepend.yaml): 50 deep prompts, dropout 0.1 (tasks override T)."""
    return _config(dict(num_tokens=50, dropout=0.1, deep=True), overrides)


def presets() -> dict[str, dict[str, ml_collections.ConfigDict]]:
    """Named method presets: {name: {'adapter'|'lora'|'prompt': ConfigDict}}."""
    plain = dict(scaling=1.0)  # the reference's conf/adapter/base_adapter.yaml
    return {
        "adapter_plus": {"adapter": adapter_config()},
        "post": {"adapter": adapter_config(**plain, config="post")},
        "pre": {"adapter": adapter_config(**plain, config="pre")},
        "intermediate": {"adapter": adapter_config(**plain, config="intermediate")},
        "parallel": {"adapter": adapter_config(**plain, config="parallel")},
        "pfeiffer": {"adapter": adapter_config(**plain, config="pfeiffer", norm_layer=True)},
        "houlsby": {"adapter": adapter_config(**plain, config="houlsby", attn_adapter=True)},
        "lora": {"lora": lora_config()},
        "vpt": {"prompt": prompt_config()},
    }


Scaling = float | str  # a fixed float, 'learned' (one scalar) or 'channel' (one per feature)


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """One bottleneck branch: the fields shared by adapters and LoRA branches."""

    dim: int = 8
    act_layer: bool = True
    norm_layer: bool = False
    bias: bool = True
    init: str = "houlsby"
    scaling: Scaling = 1.0
    dropout: float = 0.0
    pre_dropout: bool = False
    drop_path: float = 0.0

    def __post_init__(self):
        _check(isinstance(self.dim, int) and self.dim > 0, "dim", self.dim, "a positive int")
        _check(self.init in INITS, "init", self.init, f"one of {INITS}")
        ok_scaling = self.scaling in ("learned", "channel") or (
            isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
        )
        _check(ok_scaling, "scaling", self.scaling, "a float, 'learned' or 'channel'")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        _check(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class AdapterSpec(BranchSpec):
    """Where and how the adapters sit in each block."""

    config: str = "post"
    attn_adapter: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.config in POSITIONS, "config", self.config, f"one of {POSITIONS}")
        _check(
            self.attn_adapter == (self.config == "houlsby"),
            "attn_adapter",
            self.attn_adapter,
            "True exactly when config='houlsby' (only that position uses the attention adapter)",
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AdapterSpec:
        return _spec_from(cls, cfg, "adapter", ignore=("pre_dropout",))


@dataclasses.dataclass(frozen=True)
class LoRASpec(BranchSpec):
    """Low-rank branches added to q, k, v (per head, from the attention input) and/or o."""

    location: tuple[str, ...] = ("q", "k")
    act_layer: bool = False
    bias: bool = False
    pre_dropout: bool = True

    def __post_init__(self):
        super().__post_init__()
        loc = self.location
        ok = len(loc) > 0 and all(x in LORA_LOCATIONS for x in loc) and len(set(loc)) == len(loc)
        _check(ok, "location", loc, f"a non-empty subset of {LORA_LOCATIONS}, e.g. 'qk'")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LoRASpec:
        cfg = dict(cfg)
        where = cfg.pop("config", "attention")
        _check(where == "attention", "lora.config", where, "'attention'")
        if "location" in cfg:
            cfg["location"] = tuple(cfg["location"])
        return _spec_from(cls, cfg, "lora")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """VPT prompts: `num_tokens` learnable tokens per block (deep) or before block 0 (shallow)."""

    num_tokens: int = 10
    dropout: float = 0.1
    deep: bool = True

    def __post_init__(self):
        n = self.num_tokens
        _check(isinstance(n, int) and n > 0, "num_tokens", n, "a positive int")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PromptSpec:
        return _spec_from(cls, cfg, "prompt", ignore=("config",))


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"Bad PEFT config field '{field}': got {value!r}, expected {expected}.")


def _spec_from(cls, cfg: Mapping[str, Any], what: str, ignore: tuple[str, ...] = ()):
    cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - known - set(ignore))
    if unknown:
        raise ValueError(f"Unknown {what} config field(s) {unknown}; known: {sorted(known)}.")
    return cls(**{k: v for k, v in cfg.items() if k in known})


# ----------------------------------------------------------------------------------------------
# Initializers (torch semantics).


def trunc_normal(std: float, cutoff: float = 2.0):
    """Normal(0, std) truncated at +-cutoff*std, without variance correction (torch's
    `trunc_normal_(std=std, a=-cutoff*std, b=cutoff*std)`)."""

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -cutoff, cutoff, shape, dtype)

    return init


def torch_linear_uniform(fan_in: int):
    """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _branch_inits(init: str, fan_in: int):
    """(down kernel, down bias, up kernel) initializers; the up bias is always zero."""
    zeros = nn.initializers.zeros
    if init == "houlsby":
        return trunc_normal(0.01), zeros, trunc_normal(0.01)
    if init == "lora":
        return torch_linear_uniform(fan_in), torch_linear_uniform(fan_in), zeros
    return nn.initializers.normal(0.02), zeros, nn.initializers.normal(0.02)  # bert


# ----------------------------------------------------------------------------------------------
# Modules.


def _gelu(x: jax.Array) -> jax.Array:
    # torch's formula; jax.nn.gelu's erfc form costs XLA:CPU twice the time.
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(0.5**0.5)))


_ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
    """The MLP activations timm's ViTs use. Low-precision inputs are computed in float32 and
    rounded once, as torch's kernels do (op by op in bfloat16, each step would round)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}.")
    fn = _ACTIVATIONS[name]
    return lambda x: fn(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole branch per sample and rescales by 1/keep (as timm)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)


class Adapter(nn.Module):
    """Bottleneck branch: scaling * DropPath(up(drop(act(down(norm(x)))))) (+ skip).

    Attributes:
      spec: the branch's settings (`AdapterSpec` or `LoRASpec`).
      act: the activation name used when `spec.act_layer` (the ViT's own MLP activation).
      use_bias: bias on both projections (LoRA branches turn it off where the reference does).
      norm_eps: LayerNorm epsilon of the backbone.
    """

    spec: BranchSpec
    act: str = "gelu"
    use_bias: bool | None = None
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None = None, train: bool = False):
        s = self.spec
        features = x.shape[-1]
        bias = s.bias if self.use_bias is None else self.use_bias
        down_init, down_bias_init, up_init = _branch_inits(s.init, features)
        if s.norm_layer:
            x = nn.LayerNorm(epsilon=self.norm_eps, name="norm")(x)
        y = x
        if s.pre_dropout:
            y = nn.Dropout(s.dropout)(y, deterministic=not train)
        y = Dense(
            s.dim,
            use_bias=bias,
            kernel_init=down_init,
            bias_init=down_bias_init,
            dtype=self.dtype,
            name="down",
        )(y)
        if s.act_layer:
            y = activation(self.act)(y)
        if not s.pre_dropout:
            y = nn.Dropout(s.dropout)(y, deterministic=not train)
        y = Dense(features, use_bias=bias, kernel_init=up_init, dtype=self.dtype, name="up")(y)
        y = DropPath(s.drop_path)(y, train)
        if s.scaling == "learned":
            y = y * self.param("scaling", nn.initializers.ones, (1,))
        elif s.scaling == "channel":
            y = y * self.param("scaling", nn.initializers.ones, (features,))
        elif s.scaling != 1.0:
            y = y * s.scaling
        return y if skip is None else y + skip


def prompt_init(num_tokens: int, patch_size: tuple[int, int]):
    """The reference's uniform prompt init, U(-v, v) with v = sqrt(6 / (3 * p^2 + T))."""
    val = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + num_tokens))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -val, val)

    return init


# ----------------------------------------------------------------------------------------------
# Which parameters train (big_vision style: regex rules over '/'-joined parameter paths).

# (group, rule): the first rule that fully matches a path gives its group. Every parameter must
# match one, so that a parameter this table does not know about fails loudly instead of being
# silently frozen or trained.
_BLOCK = r"blocks_\d+/"
_BRANCH = (
    r"(adapter|adapter_attn|attn/lora_[qkvo])/((down|up)/(kernel|bias)|norm/(scale|bias)|scaling)"
)
_NORMS = r"(blocks_\d+/(norm1|norm2|attn/q_norm|attn/k_norm)|norm_pre|norm|fc_norm|attn_pool/norm)"
PARAM_GROUPS: tuple[tuple[str, str], ...] = (
    ("peft", _BLOCK + _BRANCH),
    ("peft", _BLOCK + "prompt"),
    ("head", r"head/(kernel|bias)"),
    ("norm", _NORMS + r"/(scale|bias)"),
    ("backbone", r"patch_embed/(kernel|bias)|cls_token|reg_token|pos_embed"),
    ("backbone", _BLOCK + r"((attn/(qkv|proj)|mlp/fc[12])/(kernel|bias)|ls[12]/gamma)"),
    ("backbone", r"attn_pool/(latent|(q|kv|proj|mlp/fc[12])/(kernel|bias))"),
)

# The groups each training mode updates (the reference's spec 8.4; 'train_ln' adds LayerNorms).
TRAINABLE_GROUPS: dict[str, frozenset[str]] = {
    "linear": frozenset({"head"}),
    "peft": frozenset({"head", "peft"}),
    "train_ln": frozenset({"head", "peft", "norm"}),
    "finetune": frozenset({"head", "peft", "norm", "backbone"}),
}


def param_group(path: str) -> str | None:
    """The group ('peft', 'head', 'norm' or 'backbone') of a '/'-joined parameter path, or None
    when no rule matches."""
    for group, rule in PARAM_GROUPS:
        if re.fullmatch(rule, path):
            return group
    return None


def _path_str(keypath: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def trainable_mask(params: Any, mode: str = "peft") -> Any:
    """A tree of bools shaped like `params`: True on the parameters that `mode` trains.

    Modes: 'linear' (head only), 'peft' (adapters, LoRA branches, prompts and head, as the
    reference trains them), 'train_ln' ('peft' plus every LayerNorm scale and bias) and
    'finetune' (everything). `params` is the 'params' collection (arrays or ShapeDtypeStructs,
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
