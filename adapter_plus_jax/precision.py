"""Low-precision compute as torch autocast does it: bfloat16 operands, products accumulated in
float32, and the backend-specific form that makes those products fast.

`Dense` and `einsum` are what the model and the PEFT modules use for every product. In float32
they are plain `nn.Dense` / `jnp.einsum` arithmetic. In bfloat16 (or float16):

- products take bfloat16 operands and accumulate in float32 (`einsum_f32`), and a custom VJP
  keeps the backward products in that form (autodiff would make them float32 x float32);
- `Dense` adds its bias to the float32 accumulator and rounds once, as torch's addmm does, so
  that a trainable bias's gradient is summed in float32 (summed in bfloat16, an adapter bias's
  gradient over 800 tokens was 5.7x less accurate than the reference's).

This module is also the one place for backend-specific choices: the XLA:CPU ones are behind
`on_cpu()` (XLA:CPU's dot layouts in `_f32_dot`, the chunks that evaluation and the train
step process a batch in, `chunk_size`, the dot library, `compiler_options`); the GPU one is
the opt-in cuDNN attention, checked by `check_attention`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from adapter_plus_jax.errors import SetupError


def on_cpu() -> bool:
    """The one switch for XLA:CPU-specific choices: True when JAX computes on CPUs."""
    return jax.default_backend() == "cpu"


def low_precision(dtype: Any) -> bool:
    """True for 16-bit compute dtypes (bfloat16, float16)."""
    return jnp.dtype(dtype).itemsize < 4


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def check_attention(
    implementation: str, dtype: Any, attn_drop_rate: float, backend: bool = True
) -> None:
    """Raise SetupError (a ValueError), saying what to change, where `layers.attend` cannot run
    this way.

    cuDNN's fused attention (jax.nn.dot_product_attention) runs on NVIDIA GPUs only, has
    bfloat16/float16 kernels only, and takes no attention dropout. `backend=False` skips the
    GPU check, which starts JAX's backend (too early before `jax.distributed.initialize`).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise SetupError(
            f"attention={implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}."
        )
    if implementation != "cudnn":
        return
    if not low_precision(dtype):
        raise SetupError(
            f"attention='cudnn' has no {jnp.dtype(dtype).name} kernel: use dtype='bfloat16' "
            "or attention='xla'."
        )
    if attn_drop_rate:
        raise SetupError(
            f"attention='cudnn' takes no attention dropout (attn_drop_rate={attn_drop_rate}): "
            "set it to 0 or use attention='xla'."
        )
    if backend and jax.default_backend() != "gpu":
        raise SetupError(
            f"attention='cudnn' needs an NVIDIA GPU; JAX computes on {jax.default_backend()} "
            "here. Use attention='xla'."
        )


def _swap(spec: str) -> tuple[str, str]:
    """The einsum specs of the two input gradients of 'a,b->c': 'c,b->a' and 'a,c->b'."""
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


def _f32_dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(spec, a, b) with a float32 result, in the form XLA:CPU's fast kernels take.

    XLA:CPU sends bfloat16 dots with a float32 result to its AMX / AVX512-BF16 kernels, 3-4x
    faster than the same dots with a bfloat16 result. They need the left operand laid out
    [batch, free, contracted] (they reject the transposed left operand that autodiff's products
    have); the barriers keep XLA from folding that transpose back into the dot, and from fusing
    the dot into an element-wise consumer (a path without bfloat16 x bfloat16 -> float32
    support). Other backends get the plain einsum (cuBLAS and TPUs take every layout).
    """
    if not on_cpu():
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    batch = [i for i in sa if i in sb and i in out]
    free = [i for i in sa if i not in sb]
    order = "".join(batch + free + [i for i in sa if i in sb and i not in out])
    if order != sa:
        a = jax.lax.optimization_barrier(jnp.einsum(f"{sa}->{order}", a))
    y = jnp.einsum(f"{order},{sb}->{out}", a, b, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Two-operand einsum of low-precision operands, accumulated in and returned as float32.

    `spec` has no ellipsis, and every index of `a` and of `b` appears in the other operand or in
    the output. The gradients are products of the same kind, returned in the operands' dtypes.
    """
    return _f32_dot(spec, a, b)


def _einsum_f32_fwd(spec: str, a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple]:
    return _f32_dot(spec, a, b), (a, b)


def _einsum_f32_bwd(spec: str, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = res
    spec_a, spec_b = _swap(spec)
    da = _f32_dot(spec_a, g.astype(b.dtype), b)
    db = _f32_dot(spec_b, a, g.astype(a.dtype))
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


# Chunks on XLA:CPU in float32 (`chunk_size`) hold this many bytes of token activations: 8
# ViT-B/16 images (8 x 197 tokens x 768 x 4 bytes, 4.8 MB). At batch 32, evaluation in chunks
# of 8 ran ViT-B/16 1.29x the batched forward (chunks of 4: 1.25x), and the train step in chunks
# of 8 ran 1.72x the batched step (2.03 vs 1.18 img/s; chunks of 4 or 16: 1.89, 1.90), on a
# 2-core AMD EPYC (benchmarks/train_step.py). Small models are not split: there the loop's
# overhead is all a chunk would add.
CPU_CHUNK = 8
CPU_CHUNK_BYTES = CPU_CHUNK * 197 * 768 * 4


# XLA:CPU's float32 dots through oneDNN instead of YNNPACK (XLA's default), measured against
# it with benchmarks/train_step.py (docs/performance.md, "oneDNN's dots"): on a 2-core Intel
# Xeon with AMX the train step ran 1.08-1.11x and evaluation 1.12x faster at batch 8 and 32; on
# a 2-core AMD EPYC (Zen 4) the train step 0.96-1.11x at batch 8 (three runs) and 1.05x at 32,
# evaluation 1.02-1.12x. Only on those vendors' CPUs; ADAPTER_PLUS_JAX_CPU_DOTS=onednn|xla
# overrides.
ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
ONEDNN_VENDORS = ("GenuineIntel", "AuthenticAMD")
CPU_DOTS_ENV = "ADAPTER_PLUS_JAX_CPU_DOTS"


def cpu_vendor(path: str = "/proc/cpuinfo") -> str | None:
    """The CPU's vendor_id ('GenuineIntel', 'AuthenticAMD', ...), None where unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def check_cpu_dots_env() -> None:
    """Raise SetupError for a value of ADAPTER_PLUS_JAX_CPU_DOTS other than onednn or xla."""
    choice = os.environ.get(CPU_DOTS_ENV)
    if choice and choice not in ("onednn", "xla"):
        raise SetupError(f"{CPU_DOTS_ENV}={choice!r}: expected 'onednn' or 'xla'.")


def compiler_options(dtype: Any) -> dict[str, Any] | None:
    """XLA compiler options for the jitted train, eval and serving steps: oneDNN's float32 dots
    on Intel and AMD CPUs (`ONEDNN_DOTS`), XLA's defaults (None) everywhere else."""
    check_cpu_dots_env()
    if not on_cpu() or low_precision(dtype):
        return None
    choice = os.environ.get(CPU_DOTS_ENV) or ("onednn" if cpu_vendor() in ONEDNN_VENDORS else "xla")
    return dict(ONEDNN_DOTS) if choice == "onednn" else None


def _chunks_by_default(dtype: Any) -> bool:
    """Whether the backend's choice splits batches into chunks: on XLA:CPU in float32."""
    return on_cpu() and not low_precision(dtype)


def chunk_size(
    batch: int, dtype: Any, chunk: int | None = None, image_bytes: int | None = None
) -> int | None:
    """How many images `eval_form` and the train step process at a time out of `batch`: None
    for the whole batch at once.

    `chunk=None` is the backend's choice: on XLA:CPU in float32, as many images as fit in
    `CPU_CHUNK_BYTES` of token activations (`image_bytes` per image, e.g.
    `ViTConfig.token_bytes`; `CPU_CHUNK` images if not given), so that a chunk's activations stay
    in the CPU's caches between the ops of a block while a whole batch's spill to memory; the
    batched form on accelerators and in 16-bit compute. A batch that holds at most one full
    chunk is never split.
    """
    if chunk is None:
        if not _chunks_by_default(dtype):
            return None
        chunk = CPU_CHUNK if image_bytes is None else max(1, CPU_CHUNK_BYTES // image_bytes)
    return chunk if batch - batch % chunk > chunk else None


def split_chunks(x: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array | None]:
    """(the full chunks of `x` stacked as [n // chunk, chunk, ...], the remainder or None)."""
    full = x.shape[0] - x.shape[0] % chunk
    head = x[:full].reshape(-1, chunk, *x.shape[1:])
    return head, (x[full:] if full < x.shape[0] else None)


def split_batch(batch: Any, chunk: int) -> tuple[Any, Any | None]:
    """`split_chunks` on every array of a pytree whose arrays share the leading batch axis:
    (the full chunks, as the same pytree; the remainder as the same pytree, or None)."""
    leaves, tree = jax.tree.flatten(batch)
    heads, rests = zip(*(split_chunks(a, chunk) for a in leaves), strict=True)
    return tree.unflatten(heads), (None if rests[0] is None else tree.unflatten(rests))


def eval_form(
    apply: Callable[[Any, Any], jax.Array],
    dtype: Any,
    chunk: int | None = None,
    image_bytes: int | None = None,
) -> Callable:
    """`apply(params, batch)` for evaluation, in the form that is fastest on the backend: the
    batch in chunks (`chunk_size`) one after another under `jax.lax.map`, a last, smaller chunk
    for the remainder; or `apply` itself where the backend keeps the batched form.

    `batch` is the images, or a pytree of arrays that share the leading batch axis (images and
    per-example task ids, say), split alike.
    """
    if chunk is None and not _chunks_by_default(dtype):
        return apply

    def chunked(params: Any, batch: Any) -> jax.Array:
        size = chunk_size(jax.tree.leaves(batch)[0].shape[0], dtype, chunk, image_bytes)
        if size is None:
            return apply(params, batch)
        head, rest = split_batch(batch, size)
        logits = jax.lax.map(lambda c: apply(params, c), head)
        logits = logits.reshape(-1, *logits.shape[2:])
        return logits if rest is None else jnp.concatenate([logits, apply(params, rest)])

    return chunked
