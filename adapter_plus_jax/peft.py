"""Parameter-efficient modules: the Adapter (Adapter+ by default), LoRA branches and VPT prompts.

The math follows the reference package `adapter-plus` 0.1.0 (`adapter_plus/vit_adapter.py`):

    Adapter(x, skip) = scaling * DropPath(up(Dropout(act(down(norm(x)))))) + skip

Where the adapter sits in a block (`config`: post, pre, parallel, intermediate, houlsby,
pfeiffer) is wired in `model.Block`; LoRA branches are used inside `model.Attention`; prompts are
written into the token sequence by `model.Block`.

Configurations are ml_collections ConfigDicts with the reference's field names. They are turned
into frozen, validated `*Spec` dataclasses when a model is built, so that a bad field fails at
once with a message naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

POSITIONS = ("post", "pre", "parallel", "intermediate", "houlsby", "pfeiffer")
INITS = ("houlsby", "lora", "bert")
LORA_LOCATIONS = ("q", "k", "v", "o")


# ----------------------------------------------------------------------------------------------
# Configs (reference field names) and their validated, hashable specs.


def adapter_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Adapter config with the reference defaults of Adapter+ (conf/adapter/adapter_plus.yaml)."""
    cfg = ml_collections.ConfigDict(
        dict(
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
    )
    cfg.update(overrides)
    return cfg


def lora_config(**overrides: Any) -> ml_collections.ConfigDict:
    """LoRA config of the reference's experiment (r=8 on q and k, dropout before the branch).

    The reference's yaml says `init: lora`, but its LoRAAttention never passes `init` on, so its
    branches get the houlsby init; that is our default too. Set init='lora' for true LoRA init.
    """
    cfg = ml_collections.ConfigDict(
        dict(
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
    )
    cfg.update(overrides)
    return cfg


def prompt_config(**overrides: Any) -> ml_collections.ConfigDict:
    """VPT config (conf/prompt/prepend.yaml): 50 deep prompts, dropout 0.1 (tasks override T)."""
    cfg = ml_collections.ConfigDict(dict(num_tokens=50, dropout=0.1, deep=True))
    cfg.update(overrides)
    return cfg


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


def activation(name: str):
    """The MLP activations timm's ViTs use."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"Unknown activation {name!r}; expected gelu, gelu_tanh or quick_gelu.")


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
        y = nn.Dense(
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
        y = nn.Dense(features, use_bias=bias, kernel_init=up_init, dtype=self.dtype, name="up")(y)
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
