"""PEFT methods that change the backbone's own layers: LoRA on any linear layer, DoRA, (IA)³,
VeRA, SSF and FacT (`fact.py`). (Adapters, LoRA on q/k/v per head and prompts are `peft.py`'s.)

Each is a `TuneSpec` naming the linear layers it changes (`targets`: each block's `qkv`,
`proj`, `fc1`, `fc2`). A targeted layer is a `TunedDense`: the same `kernel` and `bias` as the
backbone's layer (the same checkpoint names) plus the method's parameters. With x the layer's
input, W (in, out) and b its weights, s = alpha / dim:

    lora   y = x W + b + s (drop(x) A) B                        A (in, dim), B (dim, out) = 0
    dora   y = x W + b + (g - 1) drop(x) W + g s (drop(x) A) B   g = m / sg(|W + s A B|),
                                                                m = |W| at init
    ia3    y = (x W + b) * l, or (x * l) W + b on `ia3_inputs`  l = 1
    vera   y = x W + b + lambda_b * ((drop(x) A) * lambda_d) B   A, B random and frozen
    ssf    y = (x W + b) * gamma + beta, also after each LayerNorm and the patch embedding

|.| is the norm over the input axis per output and sg stops its gradient, as in Liu et al.
(2024, section 4.3) and HF peft. The conventions (scaling, inits, which side (IA)³ scales,
VeRA's shared matrices) are HF peft 0.17's, so that a peft-wrapped timm model converts
(`convert.from_timm`) and computes the same; SSF is Lian et al. (2022). docs/recipe.md
("Baselines") gives each method's recipe and sources.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from adapter_plus_jax import fact
from adapter_plus_jax.layers import dense, trunc_normal
from adapter_plus_jax.precision import Dense, einsum

KINDS = ("lora", "dora", "ia3", "vera", "ssf", *fact.KINDS)
LINEARS = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """Which linear layers of each block a method changes, and how (see the module docstring).

    Attributes:
      kind: one of KINDS.
      targets: the changed layers, a non-empty subset of LINEARS.
      dim: the rank (lora, dora, vera).
      alpha: lora and dora scale their product by alpha / dim.
      dropout: on the input of the low-rank product (lora, dora, vera).
      ia3_inputs: the targets whose input (ia3) is scaled, not their output: peft's
        `feedforward_modules`.
      vera_d: VeRA's initial lambda_d.
      fact_scale: FacT's s (`fact.py`); its paper sets it per task.
    """

    kind: str = "lora"
    targets: tuple[str, ...] = LINEARS
    dim: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    ia3_inputs: tuple[str, ...] = ("fc2",)
    vera_d: float = 0.1
    fact_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ia3_inputs", tuple(self.ia3_inputs))
        checks = [
            (self.kind in KINDS, "kind", f"one of {KINDS}"),
            (
                len(self.targets) > 0
                and set(self.targets) <= set(LINEARS)
                and len(set(self.targets)) == len(self.targets),
                "targets",
                f"a non-empty subset of {LINEARS}",
            ),  # fmt: skip
            (isinstance(self.dim, int) and self.dim > 0, "dim", "a positive int"),
            (self.alpha > 0, "alpha", "a positive number"),
            (0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)"),
            (set(self.ia3_inputs) <= set(LINEARS), "ia3_inputs", f"a subset of {LINEARS}"),
            (
                self.kind not in fact.KINDS or self.targets == LINEARS,
                "targets",
                f"all of {LINEARS} for FacT",
            ),  # fmt: skip
        ]
        for ok, field, expected in checks:
            if not ok:
                raise ValueError(
                    f"Bad PEFT config field 'tune.{field}': got {getattr(self, field)!r}, "
                    f"expected {expected}."
                )

    @property
    def scaling(self) -> float:
        return self.alpha / self.dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TuneSpec:
        """From a mapping of the fields (a ConfigDict too); layer lists may be strings joined
        with '-' ('qkv-fc2', as `config.spec_config` writes them)."""
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"Unknown tune config field(s) {unknown}; known: {sorted(known)}.")
        for key in ("targets", "ia3_inputs"):
            if isinstance(cfg.get(key), str):
                cfg[key] = tuple(x for x in cfg[key].split("-") if x)
        return cls(**cfg)


def kaiming_uniform(fan_in: int) -> Callable:
    """torch's kaiming_uniform_(a=sqrt(5)) of a (out, fan_in) weight, as a (fan_in, out) kernel:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _ssf_inits() -> tuple[Callable, Callable]:
    """SSF's init: scale ~ N(1, 0.02), shift ~ N(0, 0.02) (Lian et al.'s code)."""
    normal = nn.initializers.normal(0.02)
    return (lambda k, s, d=jnp.float32: 1.0 + normal(k, s, d)), normal


class TunedDense(Dense):
    """A backbone linear layer changed by a `TuneSpec` (`name` is the layer's, one of LINEARS):
    `kernel` and `bias` as `Dense`, plus the method's parameters."""

    spec: TuneSpec | None = None
    layer: str = ""

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, shared: dict[str, jax.Array] | None = None
    ) -> jax.Array:
        """`shared`: FacT's factors for this block (`fact.for_block`)."""
        s, features = self.spec, self.features
        fan_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (fan_in, features))
        bias = self.param("bias", self.bias_init, (features,)) if self.use_bias else None
        kind, dtype = s.kind, self.dtype
        if kind == "ia3" and self.layer in s.ia3_inputs:
            x = x * self.param("ia3", nn.initializers.ones, (fan_in,)).astype(x.dtype)
        x = x.astype(dtype)
        y = einsum("...i,io->...o", x, kernel.astype(dtype)).astype(jnp.float32)
        if kind in ("lora", "dora", "vera"):
            dropped = nn.Dropout(s.dropout)(x, deterministic=not train)
        if kind in ("lora", "dora"):
            a = self.param("lora_a", kaiming_uniform(fan_in), (fan_in, s.dim))
            b = self.param("lora_b", nn.initializers.zeros, (s.dim, features))
            low = einsum("...r,ro->...o", einsum("...i,ir->...r", dropped, a.astype(dtype)),
                         b.astype(dtype)).astype(jnp.float32)  # fmt: skip
            if kind == "lora":
                y = y + s.scaling * low
            else:
                norm0 = lambda k, shape, d=jnp.float32: jnp.linalg.norm(kernel, axis=0)  # noqa: E731
                magnitude = self.param("dora_m", norm0, (features,))
                weight = kernel + s.scaling * (a @ b)
                norm = jax.lax.stop_gradient(jnp.linalg.norm(weight, axis=0))
                scale = magnitude / norm
                # peft's form: the base product on the dropped input is rescaled (the same as
                # scale * (x W + s drop(x) A B) without dropout).
                base = y
                if train and s.dropout > 0:
                    base = einsum("...i,io->...o", dropped, kernel.astype(dtype))
                y = y + (scale - 1) * base.astype(jnp.float32) + scale * s.scaling * low
        elif kind == "vera":
            a = self.param("vera_a", kaiming_uniform(fan_in), (fan_in, s.dim))
            b = self.param("vera_b", kaiming_uniform(s.dim), (s.dim, features))
            lam_d = self.param("vera_lambda_d", nn.initializers.constant(s.vera_d), (s.dim,))
            lam_b = self.param("vera_lambda_b", nn.initializers.zeros, (features,))
            inner = einsum("...i,ir->...r", dropped, a.astype(dtype)) * lam_d.astype(dtype)
            y = y + lam_b * einsum("...r,ro->...o", inner, b.astype(dtype)).astype(jnp.float32)
        elif kind in fact.KINDS:
            if kind == "fact_tt":
                shape, fan_in = (
                    fact.core_shape(self.layer, s.dim),
                    fact.core_fan_in(self.layer, s.dim),
                )
                core = self.param("fact_core", kaiming_uniform(fan_in), shape)
            else:
                core = fact.layer_core(shared["cores"], self.layer)
            drop = nn.Dropout(s.dropout)
            y = y + fact.delta(
                x, self.layer, shared["u"].astype(dtype), shared["v"].astype(dtype),
                core.astype(dtype), lambda t: drop(t, deterministic=not train), s.fact_scale,
            ).astype(jnp.float32)  # fmt: skip
        if bias is not None:
            y = y + bias
        if kind == "ia3" and self.layer not in s.ia3_inputs:
            y = y * self.param("ia3", nn.initializers.ones, (features,))
        if kind == "ssf":
            y = scale_shift(self, y, "ssf_scale", "ssf_shift")
        return y.astype(dtype)


def scale_shift(module: nn.Module, y: jax.Array, scale: str = "scale", shift: str = "shift"):
    """SSF's y * gamma + beta over the last axis, its parameters created in `module`."""
    scale_init, shift_init = _ssf_inits()
    gamma = module.param(scale, scale_init, (y.shape[-1],))
    beta = module.param(shift, shift_init, (y.shape[-1],))
    return y * gamma.astype(y.dtype) + beta.astype(y.dtype)


class ScaleShift(nn.Module):
    """SSF after a LayerNorm or the patch embedding: y * scale + shift."""

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        return scale_shift(self, y)


def linear(
    features: int, name: str, dtype: Any, use_bias: bool = True, spec: TuneSpec | None = None,
    shared: dict[str, jax.Array] | None = None,
) -> Callable[[jax.Array, bool], jax.Array]:  # fmt: skip
    """The backbone's linear layer `name` (one of LINEARS) as (x, train) -> y: a `TunedDense`
    when `spec` targets it (with FacT's `shared` factors), else the plain layer
    (`layers.dense`). Call inside a compact method."""
    if spec is None or name not in spec.targets:
        layer = dense(features, name, dtype, use_bias)
        return lambda x, train: layer(x)
    # The backbone's initialisers (`layers.dense`): timm's trunc_normal(0.02), a zero bias.
    layer = TunedDense(features, use_bias, dtype, trunc_normal(0.02, cutoff=100.0), spec=spec,
                       layer=name, name=name)  # fmt: skip
    return lambda x, train: layer(x, train, shared)


def after_norm(spec: TuneSpec | None, name: str) -> Callable[[jax.Array], jax.Array]:
    """SSF's scale and shift after the LayerNorm (or patch embedding) `name` when `spec` is
    SSF, else the identity. Call inside a compact method."""
    if spec is None or spec.kind != "ssf":
        return lambda y: y
    return ScaleShift(name=f"{name}_ssf")


# ----------------------------------------------------------------------------------------------
# Folding a method into the backbone's weights.


def merge(spec: TuneSpec, params: Mapping[str, Any]) -> dict:
    """`params` of a model tuned by `spec` folded into a plain ViT's (the same names, without
    the method's parameters), for inference: eval-mode outputs are unchanged, to float32
    rounding (computed in float64). Every kind is linear in the layer's input, so it folds:

        lora   W + s A B               dora   m / |W + s A B| * (W + s A B)
        vera   W + (A lambda_d) (B lambda_b)       fact   W + its update applied to I
        ia3    W * l, b * l (outputs)  or  l * W (inputs: rows)
        ssf    W * gamma, b * gamma + beta; LayerNorm scale * gamma, bias * gamma + beta
    """
    from flax import traverse_util

    flat = {
        k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(dict(params)).items()
    }
    out: dict[tuple[str, ...], np.ndarray] = {}
    layers = {k[:-1] for k in flat if k[-1] == "kernel"}
    for key, value in flat.items():
        if key[:-1] in layers and key[-1] not in ("kernel", "bias") or key[0] == "fact":
            continue  # the method's own, folded below
        if len(key) > 1 and key[-2].endswith("_ssf"):
            continue
        out[key] = value
    for layer in layers:
        # a block's linear layer that the method targets: blocks_<i>/attn/qkv and the like
        if layer[0].startswith("blocks_") and layer[-1] in spec.targets:
            _fold_linear(spec, layer, flat, out)
    for key in [k for k in flat if len(k) > 1 and k[-2].endswith("_ssf") and k[-1] == "scale"]:
        target = (*key[:-2], key[-2].removesuffix("_ssf"))
        gamma, beta = flat[key], flat[(*key[:-1], "shift")]
        weight = (
            "scale" if (*target, "scale") in out else "kernel"
        )  # a LayerNorm, or the patch conv
        out[(*target, weight)] = out[(*target, weight)] * gamma
        out[(*target, "bias")] = out[(*target, "bias")] * gamma + beta
    return traverse_util.unflatten_dict({k: np.float32(v) for k, v in out.items()})


def _fold_linear(spec: TuneSpec, layer: tuple, flat: dict, out: dict) -> None:
    def get(name: str) -> np.ndarray:
        return flat[(*layer, name)]

    w = get("kernel")
    bias = (*layer, "bias")
    if spec.kind in ("lora", "dora"):
        w = w + spec.scaling * get("lora_a") @ get("lora_b")
        if spec.kind == "dora":
            w = w * (get("dora_m") / np.linalg.norm(w, axis=0))
    elif spec.kind == "vera":
        w = w + (get("vera_a") * get("vera_lambda_d")) @ (get("vera_b") * get("vera_lambda_b"))
    elif spec.kind == "ia3" and layer[-1] in spec.ia3_inputs:
        w = get("ia3")[:, None] * w
    elif spec.kind == "ia3":
        w = w * get("ia3")
        if bias in out:
            out[bias] = out[bias] * get("ia3")
    elif spec.kind in fact.KINDS:
        w = w + _fact_delta_weight(spec, layer, flat, w.shape[0])
    elif spec.kind == "ssf":
        if bias not in out:
            raise ValueError(f"merge: {'/'.join(layer)} has no bias to take SSF's shift.")
        w = w * get("ssf_scale")
        out[bias] = out[bias] * get("ssf_scale") + get("ssf_shift")
    out[(*layer, "kernel")] = w


def _fact_delta_weight(spec: TuneSpec, layer: tuple, flat: dict, fan_in: int) -> np.ndarray:
    """FacT's update of `layer` as a weight: its (linear) update applied to the identity."""
    block = int(layer[0].removeprefix("blocks_"))
    shared = {k[-1]: flat[k] for k in flat if k[0] == "fact"}
    if spec.kind == "fact_tt":
        core = flat[(*layer, "fact_core")]
    else:
        core = fact.layer_core(shared["core"] @ shared["factors"][
            :, fact.PER_BLOCK * block : fact.PER_BLOCK * (block + 1)], layer[-1])  # fmt: skip
    delta = fact.delta(np.eye(fan_in), layer[-1], shared["u"], shared["v"], np.asarray(core),
                       lambda t: t, spec.fact_scale)  # fmt: skip
    return np.asarray(delta, np.float64)
