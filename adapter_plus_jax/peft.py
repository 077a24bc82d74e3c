"""Parameter-efficient modules: the Adapter (Adapter+ by default), LoRA branches and VPT prompts,
and the registry of training methods.

The math follows the reference package `adapter-plus` 0.1.0 (`adapter_plus/vit_adapter.py`):

    Adapter(x, skip) = scaling * DropPath(up(Dropout(act(down(norm(x)))))) + skip

`Adapter` and `LoRA` are that branch (`bottleneck`). Where the adapter sits in a block
(`AdapterSpec.config`: post, pre, parallel, intermediate, houlsby, pfeiffer) is `POSITIONS`, a
block's forward per position, which `model.Block` runs; LoRA branches are added to q, k, v or o
in `model.Attention`, and prompts are written into the token sequence by `model.Block`.

The settings are frozen, validated dataclasses with the reference's field names
(`AdapterSpec()` is Adapter+), so that a bad field fails at once with a message naming it;
`*Spec.from_config` reads the reference's configs (dicts, OmegaConf or ml_collections).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from adapter_plus_jax.layers import DropPath, activation, torch_linear_uniform, trunc_normal
from adapter_plus_jax.precision import Dense
from adapter_plus_jax.tuning import TuneSpec

INITS = ("houlsby", "lora", "bert")
LORA_LOCATIONS = ("q", "k", "v", "o")


# ----------------------------------------------------------------------------------------------
# Adapter positions.

# Each is the reference's AdapterBlock.forward_<position>: `attn` and `mlp` are the block's
# residual branches (y -> DropPath(layer(norm(y))), from `model.Block`), `adapter(y, skip)` is
# the block's `Adapter` on y plus skip.

Branch = Callable[[jax.Array], jax.Array]


def _post(x: jax.Array, attn: Branch, mlp: Branch, adapter: Callable) -> jax.Array:
    """Adapter+: after the MLP's residual sum."""
    x = x + attn(x)
    x = x + mlp(x)
    return adapter(x, x)


def _pre(x: jax.Array, attn: Branch, mlp: Branch, adapter: Callable) -> jax.Array:
    """Between the attention's residual sum and the MLP."""
    x = x + attn(x)
    x = adapter(x, x)
    return x + mlp(x)


def _intermediate(x: jax.Array, attn: Branch, mlp: Branch, adapter: Callable) -> jax.Array:
    """On the MLP branch's output, before its residual sum."""
    x = x + attn(x)
    y = mlp(x)
    return x + adapter(y, y)


def _parallel(x: jax.Array, attn: Branch, mlp: Branch, adapter: Callable) -> jax.Array:
    """Beside the MLP branch, both reading the attention's residual sum."""
    y = x + attn(x)
    return adapter(y, y + mlp(y))


def _pfeiffer(x: jax.Array, attn: Branch, mlp: Branch, adapter: Callable) -> jax.Array:
    """On the MLP's residual sum, with the MLP branch as its skip (Pfeiffer et al.)."""
    y = x + attn(x)
    skip = mlp(y)
    return adapter(y + skip, skip) + y


def _houlsby(x: jax.Array, attn: Branch, mlp: Branch, adapter: Callable) -> jax.Array:
    """On both branches' outputs, before their residual sums; the attention's has its own."""
    y = attn(x)
    x = x + adapter(y, y, name="adapter_attn")
    y = mlp(x)
    return x + adapter(y, y)


POSITIONS: dict[str, Callable[..., jax.Array]] = {
    "post": _post,
    "pre": _pre,
    "parallel": _parallel,
    "intermediate": _intermediate,
    "houlsby": _houlsby,
    "pfeiffer": _pfeiffer,
}


# ----------------------------------------------------------------------------------------------
# Validated, hashable specs with the reference's field names.


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
    """Where and how the adapters sit in each block. The defaults are Adapter+ as the paper
    configures it: after the MLP residual (post), a learned per-channel scaling, houlsby init,
    the ViT's activation, biases, no LayerNorm, no dropout, drop path 0.1 and rank 8."""

    config: str = "post"
    attn_adapter: bool = False
    scaling: Scaling = "channel"
    drop_path: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        _check(self.config in POSITIONS, "config", self.config, f"one of {tuple(POSITIONS)}")
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
    """Low-rank branches added to q, k, v (per head, from the attention input) and/or o. The
    defaults are the paper's LoRA: rank 8 on q and k, linear, no bias, dropout 0.1 before the
    branch, and the houlsby init (the reference's LoRAAttention never passes `init` on)."""

    location: tuple[str, ...] = ("q", "k")
    act_layer: bool = False
    bias: bool = False
    dropout: float = 0.1
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
    """VPT prompts: `num_tokens` learnable tokens per block (deep) or before block 0 (shallow).
    The defaults are the reference's VPT-deep: 50 tokens, prompt dropout 0.1."""

    num_tokens: int = 50
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
    # A dict, an OmegaConf DictConfig (the reference's configs) or an ml_collections ConfigDict.
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - known - set(ignore))
    if unknown:
        raise ValueError(f"Unknown {what} config field(s) {unknown}; known: {sorted(known)}.")
    return cls(**{k: v for k, v in cfg.items() if k in known})


# ----------------------------------------------------------------------------------------------
# The training methods: one registry, the paper's methods and every adapter position of the
# reference.


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method: its PEFT modules, which parameters train (see
    `params.trainable_mask`) and the reference's learning rate for it."""

    adapter: AdapterSpec | None = None
    lora: LoRASpec | None = None
    prompt: PromptSpec | None = None
    train_mode: str = "peft"
    lr: float = 1e-3
    tune: TuneSpec | None = None  # `tuning.py`: methods that change the backbone's layers

    def sized(self, dim: int | None = None, num_tokens: int | None = None) -> Method:
        """The method with adapter/LoRA (DoRA, VeRA) rank `dim` and `num_tokens` prompts (None:
        as is). LoRA and DoRA on linear layers keep alpha = rank (a scaling of 1)."""
        changes = {}
        if dim is not None and self.adapter is not None:
            changes["adapter"] = dataclasses.replace(self.adapter, dim=dim)
        if dim is not None and self.lora is not None:
            changes["lora"] = dataclasses.replace(self.lora, dim=dim)
        if dim is not None and self.tune is not None and self.tune.kind in RANKED:
            alpha = float(dim) if self.tune.kind in ("lora", "dora") else self.tune.alpha
            changes["tune"] = dataclasses.replace(self.tune, dim=dim, alpha=alpha)
        if num_tokens is not None and self.prompt is not None:
            changes["prompt"] = dataclasses.replace(self.prompt, num_tokens=num_tokens)
        return dataclasses.replace(self, **changes)


# The other adapter positions use the reference's base adapter: Adapter+ without its scaling.
_BASE = dict(scaling=1.0)
METHODS: dict[str, Method] = {
    "adapter_plus": Method(adapter=AdapterSpec()),
    "post": Method(adapter=AdapterSpec(**_BASE)),
    "pre": Method(adapter=AdapterSpec(config="pre", **_BASE)),
    "intermediate": Method(adapter=AdapterSpec(config="intermediate", **_BASE)),
    "parallel": Method(adapter=AdapterSpec(config="parallel", **_BASE)),
    "pfeiffer": Method(adapter=AdapterSpec(config="pfeiffer", norm_layer=True, **_BASE)),
    "houlsby": Method(adapter=AdapterSpec(config="houlsby", attn_adapter=True, **_BASE)),
    "lora": Method(lora=LoRASpec()),
    "vpt": Method(prompt=PromptSpec()),
    "linear": Method(train_mode="linear"),
    "finetune": Method(train_mode="finetune", lr=1e-4),
    # The paper's baselines and other common methods (docs/recipe.md, "Baselines").
    "bitfit": Method(train_mode="bitfit"),
    "ln_tune": Method(train_mode="ln_tune"),
    "ssf": Method(tune=TuneSpec("ssf")),
    "ia3": Method(tune=TuneSpec("ia3", targets=("qkv", "fc2"), ia3_inputs=("fc2",))),
    "lora_linear": Method(tune=TuneSpec("lora", targets=("qkv",))),
    "dora": Method(tune=TuneSpec("dora", targets=("qkv",))),
    "vera": Method(tune=TuneSpec("vera", targets=("qkv", "fc1"))),
    "fact_tt": Method(tune=TuneSpec("fact_tt", dropout=0.1)),
    "fact_tk": Method(tune=TuneSpec("fact_tk", dropout=0.1)),
}
RANKED = ("lora", "dora", "vera", "fact_tt", "fact_tk")  # `tuning` kinds with a rank


def get_method(name: str) -> Method:
    """`METHODS[name]`, with a clear error for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(METHODS)}.")
    return METHODS[name]


# ----------------------------------------------------------------------------------------------
# Modules.


def _branch_inits(init: str, fan_in: int):
    """(down kernel, down bias, up kernel) initializers; the up bias is always zero."""
    zeros = nn.initializers.zeros
    if init == "houlsby":
        return trunc_normal(0.01), zeros, trunc_normal(0.01)
    if init == "lora":
        return torch_linear_uniform(fan_in), torch_linear_uniform(fan_in), zeros
    return nn.initializers.normal(0.02), zeros, nn.initializers.normal(0.02)  # bert


def bottleneck(
    module: nn.Module, spec: BranchSpec, x: jax.Array, bias: bool, act: str, norm_eps: float,
    dtype: Any, train: bool,
) -> jax.Array:  # fmt: skip
    """scaling * DropPath(up(drop(act(down(norm(x)))))), the branch adapters and LoRA share; its
    layers and the scaling are created in `module`'s compact method (named norm, down, up,
    scaling). `spec.pre_dropout` moves the dropout before `down` (LoRA's place for it)."""
    s, features = spec, x.shape[-1]
    down_init, down_bias_init, up_init = _branch_inits(s.init, features)
    if s.norm_layer:
        x = nn.LayerNorm(epsilon=norm_eps, name="norm")(x)
    y = x
    if s.pre_dropout:
        y = nn.Dropout(s.dropout)(y, deterministic=not train)
    y = Dense(s.dim, use_bias=bias, kernel_init=down_init, bias_init=down_bias_init, dtype=dtype,
              name="down")(y)  # fmt: skip
    if s.act_layer:
        y = activation(act)(y)
    if not s.pre_dropout:
        y = nn.Dropout(s.dropout)(y, deterministic=not train)
    y = Dense(features, use_bias=bias, kernel_init=up_init, dtype=dtype, name="up")(y)
    y = DropPath(s.drop_path)(y, train)
    if s.scaling == "learned":
        return y * module.param("scaling", nn.initializers.ones, (1,))
    if s.scaling == "channel":
        return y * module.param("scaling", nn.initializers.ones, (features,))
    return y if s.scaling == 1.0 else y * s.scaling


class Adapter(nn.Module):
    """The adapter of a block: `bottleneck(x)` (+ skip); Adapter+ with the default spec.

    Attributes:
      spec: the adapter's settings.
      act: the activation used when `spec.act_layer` (the ViT's own MLP activation).
      norm_eps: LayerNorm epsilon of the backbone.
    """

    spec: AdapterSpec
    act: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, skip: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        s = self.spec
        y = bottleneck(self, s, x, s.bias, self.act, self.norm_eps, self.dtype, train)
        return y if skip is None else y + skip


class LoRA(nn.Module):
    """One LoRA branch of the attention (`bottleneck(x)`, added to q, k, v or o by
    `model.Attention`).

    Attributes:
      spec: the branches' settings.
      use_bias: biases on both projections (the reference gives q/k/v branches biases only when
        the qkv projection has one).
      act, norm_eps: as in `Adapter`.
    """

    spec: LoRASpec
    use_bias: bool = False
    act: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return bottleneck(self, self.spec, x, self.use_bias, self.act, self.norm_eps, self.dtype,
                          train)  # fmt: skip


def prompt_init(num_tokens: int, patch_size: tuple[int, int]):
    """The reference's uniform prompt init, U(-v, v) with v = sqrt(6 / (3 * p^2 + T))."""
    val = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + num_tokens))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -val, val)

    return init
