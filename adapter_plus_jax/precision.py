"""Low-precision compute as torch autocast does it: bfloat16 operands, products accumulated in
float32.

`Dense` and `einsum` are what the model and the PEFT modules use for every product. In float32
they are plain `nn.Dense` / `jnp.einsum` arithmetic. In bfloat16 (or float16):

- products take bfloat16 operands and accumulate in float32 (`einsum_f32`), and a custom VJP
  keeps the backward products in that form (autodiff would make them float32 x float32);
- `Dense` adds its bias to the float32 accumulator and rounds once, as torch's addmm does, so
  that a trainable bias's gradient is summed in float32 (summed in bfloat16, an adapter bias's
  gradient is much less accurate than the reference's: tests/test_mixed_precision.py).

The form in which a backend computes such a product is `backend.f32_dot`'s choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from adapter_plus_jax.backend import f32_dot, low_precision


def _swap(spec: str) -> tuple[str, str]:
    """The einsum specs of the two input gradients of 'a,b->c': 'c,b->a' and 'a,c->b'."""
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Two-operand einsum of low-precision operands, accumulated in and returned as float32.

    `spec` has no ellipsis, and every index of `a` and of `b` appears in the other operand or in
    the output. The gradients are products of the same kind, returned in the operands' dtypes.
    """
    return f32_dot(spec, a, b)


def _einsum_f32_fwd(spec: str, a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple]:
    return f32_dot(spec, a, b), (a, b)


def _einsum_f32_bwd(spec: str, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = res
    spec_a, spec_b = _swap(spec)
    da = f32_dot(spec_a, g.astype(b.dtype), b)
    db = f32_dot(spec_b, a, g.astype(a.dtype))
    return da.astype(a.dtype), db.astype(b.dtype)


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def einsum_f32_acc(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum_f32` rounded to `a`'s dtype: torch autocast's matmul."""
    return einsum_f32(spec, a, b).astype(a.dtype)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum_f32_acc` for low-precision operands, jnp.einsum otherwise."""
    if low_precision(a.dtype):
        return einsum_f32_acc(spec, a, b)
    return jnp.einsum(spec, a, b)


class Dense(nn.Module):
    """`nn.Dense` (the same parameters, and in float32 the same arithmetic) whose low-precision
    product accumulates in float32 with the bias, rounded once to `dtype`."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        if not low_precision(self.dtype):
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
            return y if bias is None else y + bias.astype(self.dtype)
        flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = einsum_f32("mk,kn->mn", flat, kernel.astype(self.dtype))
        if bias is not None:
            y = y + bias
        return y.astype(self.dtype).reshape(*x.shape[:-1], self.features)
