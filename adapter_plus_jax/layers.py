"""Basic layers with timm's semantics, knowing nothing of adapters: initialisers, activations,
stochastic depth, the MLP, LayerScale, softmax attention and the attention pool.

Every product goes through `precision` (float32 as nn.Dense computes it; bfloat16 accumulated
in float32, as torch autocast does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from adapter_plus_jax.backend import ATTENTION_KERNELS
from adapter_plus_jax.precision import Dense, einsum

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


# ----------------------------------------------------------------------------------------------
# Activations, stochastic depth, and the layers of a transformer block.


def _gelu(x: jax.Array) -> jax.Array:
    # torch's formula; XLA:CPU runs it faster than jax.nn.gelu's erfc form.
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


def dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> Dense:
    # timm's init for Linear layers: trunc_normal(std=.02) (cut at +-2 absolute), zero bias.
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        name=name,
        kernel_init=trunc_normal(0.02, cutoff=100.0),
    )


def plain_linear(features: int, name: str, dtype: Any) -> Callable:
    """`dense` as (x, train) -> y: the form `Mlp.linear` takes."""
    layer = dense(features, name, dtype)
    return lambda x, train: layer(x)


class Mlp(nn.Module):
    """timm `Mlp`: fc1, activation, dropout, fc2, dropout. `linear(features, name, dtype)` makes
    fc1 and fc2 ((x, train) -> y; default `plain_linear`): PEFT methods that change them pass
    their own (`tuning.linear`)."""

    hidden_dim: int
    act: str = "gelu"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    linear: Callable = plain_linear

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_dim = x.shape[-1]
        x = activation(self.act)(self.linear(self.hidden_dim, "fc1", self.dtype)(x, train))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = self.linear(out_dim, "fc2", self.dtype)(x, train)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class LayerScale(nn.Module):
    """timm `LayerScale`: a learned per-channel gain."""

    init_values: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],))
        return x * gamma


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    drop: nn.Module,
    train: bool,
    implementation: str = "xla",
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v on [batch, tokens, heads, head_dim]; the softmax in float32.

    The products run heads-first ([batch, heads, tokens, head_dim], batch and heads leading in
    both operands): XLA:CPU then emits batched library dots without transposes inside them,
    faster than tokens-first einsums (docs/performance.md, "The train step, op class by op
    class").

    implementation='cudnn' (NVIDIA GPUs, 16-bit compute, no attention dropout: checked by
    `backend.check_attention`) runs cuDNN's fused attention kernel instead. 'auto' is resolved
    before a model is built (`backend.resolve_attention`, in `create_model`), not here.
    """
    if implementation not in ATTENTION_KERNELS:
        raise ValueError(
            f"attention={implementation!r}: expected one of {ATTENTION_KERNELS} (create_model "
            "resolves 'auto' into one of them: backend.resolve_attention)."
        )
    if implementation == "cudnn":  # one dtype for the kernel (qk_norm, LoRA scales: float32)
        return fused_attention(q.astype(v.dtype), k.astype(v.dtype), v, "cudnn")
    scale = q.shape[-1] ** -0.5
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q * scale, k, v))
    logits = einsum("bhqd,bhkd->bhqk", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    weights = drop(weights, deterministic=not train)
    return einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention, with an odd token count padded by one masked token.

    jax 0.11's cuDNN backward refuses odd sequence lengths (ViT-B/16's 197): it takes its empty
    bias placeholder for a bias, and biased cuDNN attention needs even lengths. The padded key is
    masked out (`key_value_seq_lengths`) and the padded query's row dropped, so the result is the
    unpadded attention's.
    """
    n = q.shape[1]
    if n % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
    lengths = jnp.full((q.shape[0],), n, jnp.int32)
    y = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=implementation,
    )  # fmt: skip
    return y[:, :n]


class AttentionPool(nn.Module):
    """timm `AttentionPoolLatent` ('map' global pool): a learned latent query attends to the
    tokens, followed by a residual MLP; returns the first latent."""

    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        heads = (self.num_heads, c // self.num_heads)
        latent = self.param("latent", trunc_normal(c**-0.5), (1, 1, c))
        q = dense(c, "q", self.dtype)(jnp.broadcast_to(latent, (b, 1, c))).reshape(b, 1, *heads)
        kv = dense(2 * c, "kv", self.dtype)(x).reshape(b, n, 2, *heads)
        y = attend(q, kv[:, :, 0], kv[:, :, 1], lambda w, deterministic: w, False)
        y = dense(c, "proj", self.dtype)(y.reshape(b, 1, c))
        y = y + Mlp(self.mlp_dim, "gelu", 0.0, self.dtype, name="mlp")(
            nn.LayerNorm(epsilon=self.norm_eps, name="norm")(y), False
        )
        return y[:, 0]
