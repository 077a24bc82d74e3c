"""Every choice that depends on the hardware JAX computes on, in one module.

The model, the PEFT modules and the train and eval steps are written once, for every backend.
What differs between backends is decided here and nowhere else:

- chunks: on XLA:CPU in float32 a large batch runs in chunks of a few images, one after another,
  so that each layer's output is still in the CPU's caches when the next op reads it; chunks
  are sized by activation bytes (`CHUNK_BYTES`), so a small model is not split. Accelerators and
  16-bit compute keep the whole batch.
- compiler options: XLA:CPU's float32 dots through oneDNN on Intel and AMD CPUs
  (`compiler_options`; `ADAPTER_PLUS_JAX_CPU_DOTS=onednn|xla` overrides).
- the form of 16-bit products on XLA:CPU (`f32_dot`), which the bfloat16 layers use.
- the attention implementation: 'auto' (the default) takes cuDNN's fused kernel where it runs
  (`auto_attention`: NVIDIA GPUs from Ampere on, 16-bit compute, no attention dropout) and
  XLA's einsums everywhere else; an explicit choice is checked by `check_attention`.
- host memory: glibc's huge pages for XLA:CPU's large buffers, which only a restart of the
  process can turn on (`reexec_with_huge_pages`).
- compilation: JAX's persistent compilation cache, on by default in
  ~/.cache/adapter_plus_jax/xla (`use_compilation_cache`), so that runs whose steps are the same
  program (the same backbone, method and padded head) compile once per machine.

The steps take these choices from one object, `plan(module)`: `train.make_train_step`,
`train.make_eval_step` (and their NNX counterparts, `serving.TaskSet`) build their jitted steps
with it, in the runner and in a user's own loop alike. Why each choice is what it is, with the
measurements behind it: docs/performance.md, which this module's comments refer to by section.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from adapter_plus_jax.errors import SetupError


def on_cpu() -> bool:
    """True when JAX computes on CPUs (XLA:CPU)."""
    return jax.default_backend() == "cpu"


def low_precision(dtype: Any) -> bool:
    """True for 16-bit compute dtypes (bfloat16, float16)."""
    return jnp.dtype(dtype).itemsize < 4


# ----------------------------------------------------------------------------------------------
# The persistent compilation cache.

CACHE_ENV = "ADAPTER_PLUS_JAX_COMPILATION_CACHE"
DEFAULT_CACHE = "~/.cache/adapter_plus_jax/xla"
CACHE_OFF = ("off", "none", "false", "0")
CACHE_MAX_BYTES = 4 << 30
# Programs that compile faster than this are not written to the cache: a tiny model's steps are
# kept, the one-op programs of eager jax calls are not. Each write lists the whole directory to
# evict its oldest entries, so caching those thousands of programs made later compiles slower
# (docs/performance.md, "Compilation").
CACHE_MIN_COMPILE_S = 0.25


def compilation_cache_dir(setting: str | None = None) -> Path | None:
    """Where compiled programs are cached, or None for no cache: `setting` (the config's
    `compilation_cache`) if given, else $ADAPTER_PLUS_JAX_COMPILATION_CACHE, else a directory
    that JAX was already told (JAX_COMPILATION_CACHE_DIR), else DEFAULT_CACHE. 'off' (or none,
    false, 0) turns the cache off."""
    value = setting or os.environ.get(CACHE_ENV) or jax.config.jax_compilation_cache_dir
    value = value or DEFAULT_CACHE
    return None if value.strip().lower() in CACHE_OFF else Path(value).expanduser()


def use_compilation_cache(setting: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `compilation_cache_dir(setting)` before the
    first compilation; returns the directory (None: off). Unless the environment says
    otherwise, programs that took at least CACHE_MIN_COMPILE_S to compile are kept (the steps of
    small models too) and the cache is capped at CACHE_MAX_BYTES, its least recently used
    entries evicted.
    A directory that cannot be created turns the cache off with a warning."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = compilation_cache_dir(setting)
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"WARNING: no compilation cache ({path}: {e.strerror}).", file=sys.stderr)
            path = None
    if str(path or "") != (jax.config.jax_compilation_cache_dir or ""):
        cc.reset_cache()  # a directory set earlier in this process is replaced
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path


# ----------------------------------------------------------------------------------------------
# Attention.

ATTENTION_KERNELS = ("xla", "cudnn")  # what `layers.attend` computes with
ATTENTION_IMPLEMENTATIONS = ("auto", *ATTENTION_KERNELS)  # what users choose from
CUDNN_MIN_COMPUTE_CAPABILITY, CUDNN_MAX_HEAD_DIM = 8.0, 128  # cuDNN's fused kernels: Ampere on
CUDNN_MIN_VERSION = 90000  # cuDNN 9: what 'auto' was measured with (docs/performance.md, "GPU")


def nvidia_compute_capability(device: Any | None = None) -> float | None:
    """The CUDA compute capability of `device` (default: JAX's first device) if it is an NVIDIA
    GPU, else None."""
    device = jax.devices()[0] if device is None else device
    if device.platform != "gpu":
        return None
    try:  # CUDA devices say "9.0"; ROCm's say "gfx90a" or nothing
        return float(getattr(device, "compute_capability", ""))
    except ValueError:
        return None


def cudnn_version() -> int | None:
    """The version of the cuDNN jax loads (91900 for 9.19.0); None for none, or where this jax
    keeps its check elsewhere (then 'auto' keeps the einsums)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        return int(check_cudnn_version())
    except Exception:  # no cuDNN (RuntimeError), or a jax without this function
        return None


def auto_attention(
    dtype: Any, attn_drop_rate: float, head_dim: int, compute_capability: float | None
) -> str:
    """What attention='auto' computes with: 'cudnn' where cuDNN's fused kernel runs (an NVIDIA
    GPU of `compute_capability` 8.0 or later with cuDNN 9, None for none; a 16-bit dtype, no
    attention dropout, a head dimension that is a multiple of 8 up to 128), 'xla' everywhere
    else: on CPUs, TPUs and other GPUs, and in float32 (the reference's arithmetic)."""
    fits = (
        (compute_capability or 0.0) >= CUDNN_MIN_COMPUTE_CAPABILITY
        and low_precision(dtype) and not attn_drop_rate
        and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
    )  # fmt: skip
    return "cudnn" if fits else "xla"


def resolve_attention(implementation: str, dtype: Any, config: Any) -> str:
    """`implementation` with 'auto' replaced by this machine's choice (`auto_attention`) for a
    model of `config` (a `ViTConfig`: its width, heads and attention dropout)."""
    if implementation != "auto":
        return implementation
    capability = nvidia_compute_capability()
    if capability is not None and (cudnn_version() or 0) < CUDNN_MIN_VERSION:
        capability = None  # an NVIDIA GPU, but no cuDNN that runs the fused kernel
    head_dim = config.embed_dim // config.num_heads
    return auto_attention(dtype, config.attn_drop_rate, head_dim, capability)


def check_attention(implementation: str, dtype: Any, attn_drop_rate: float) -> None:
    """Raise SetupError (a ValueError), saying what to change, where `layers.attend` cannot run
    with `implementation`: cuDNN's fused attention (jax.nn.dot_product_attention) runs on NVIDIA
    GPUs only, has bfloat16/float16 kernels only, and takes no attention dropout."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise SetupError(
            f"attention={implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}."
        )
    if implementation != "cudnn":  # 'auto' takes cuDNN only where it runs
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
    if jax.default_backend() != "gpu":
        raise SetupError(
            f"attention='cudnn' needs an NVIDIA GPU; JAX computes on {jax.default_backend()} "
            "here. Use attention='xla'."
        )


# ----------------------------------------------------------------------------------------------
# 16-bit products with float32 results.


def f32_dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(spec, a, b) with a float32 result, in the form the backend's fast kernels take.

    XLA:CPU sends 16-bit dots with a float32 result to its AMX / AVX512-BF16 kernels only when
    the left operand is laid out [batch, free, contracted] (they reject the transposed left
    operand that autodiff's products have); the barriers keep XLA from folding that transpose
    back into the dot, and from fusing the dot into an element-wise consumer (a path without
    16-bit x 16-bit -> float32 support). Other backends take every layout: the plain einsum.
    docs/performance.md, "Results", has the bfloat16 measurements.
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


# ----------------------------------------------------------------------------------------------
# Compiler options: XLA:CPU's float32 dots through oneDNN (docs/performance.md, "oneDNN's dots").

ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
ONEDNN_VENDORS = ("GenuineIntel", "AuthenticAMD")  # where they were measured faster
CPU_DOTS_ENV = "ADAPTER_PLUS_JAX_CPU_DOTS"  # 'onednn' or 'xla': overrides the vendor rule


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
    """XLA compiler options for steps computing in `dtype`: oneDNN's float32 dots on Intel and
    AMD CPUs (`ONEDNN_DOTS`), XLA's defaults (None) everywhere else."""
    check_cpu_dots_env()
    if not on_cpu() or low_precision(dtype):
        return None
    choice = os.environ.get(CPU_DOTS_ENV) or ("onednn" if cpu_vendor() in ONEDNN_VENDORS else "xla")
    return dict(ONEDNN_DOTS) if choice == "onednn" else None


# ----------------------------------------------------------------------------------------------
# Chunks (docs/performance.md, "Chunks").

# A chunk holds this many bytes of float32 token activations: the [tokens, width] output of a
# layer for 8 ViT-B/16 images (197 tokens x 768 features x 4 bytes each).
CHUNK_BYTES = 8 * 197 * 768 * 4


def image_bytes(config: Any) -> int:
    """Bytes of one image's float32 [tokens, embed_dim] activation for a `ViTConfig`."""
    tokens = config.grid_size[0] * config.grid_size[1] + config.num_prefix_tokens
    return tokens * config.embed_dim * 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the steps of one model run on this backend.

    Attributes:
      chunk: images per chunk in the train and eval steps (None: the whole batch at once). A
        batch that holds at most one full chunk is not split.
      compiler_options: XLA options for `jax.jit` (None: XLA's defaults).
    """

    chunk: int | None = None
    compiler_options: Mapping[str, Any] | None = None

    def chunk_size(self, batch: int) -> int | None:
        """Images per chunk for a batch of `batch` images; None for the whole batch at once."""
        c = self.chunk
        return c if c is not None and batch - batch % c > c else None

    def jit(self, fn: Callable, **jit_kwargs: Any) -> Callable:
        """`jax.jit(fn, **jit_kwargs)` with this plan's compiler options."""
        options = None if self.compiler_options is None else dict(self.compiler_options)
        return jax.jit(fn, compiler_options=options, **jit_kwargs)


def plan(module: Any) -> Plan:
    """This backend's plan for a model (`model.VisionTransformer`: its `dtype` and `config`):
    chunks and compiler options on XLA:CPU in float32, the whole batch and XLA's defaults
    elsewhere."""
    options = compiler_options(module.dtype)
    if not on_cpu() or low_precision(module.dtype):
        return Plan(None, options)
    return Plan(max(1, CHUNK_BYTES // image_bytes(module.config)), options)


def split_batch(batch: Any, chunk: int) -> tuple[Any, Any | None]:
    """A pytree of arrays sharing the leading batch axis as (its full chunks, stacked
    [n // chunk, chunk, ...] in the same pytree; the remainder as the same pytree, or None)."""
    leaves, tree = jax.tree.flatten(batch)
    full = leaves[0].shape[0] - leaves[0].shape[0] % chunk
    heads = [a[:full].reshape(-1, chunk, *a.shape[1:]) for a in leaves]
    rests = None if full == leaves[0].shape[0] else [a[full:] for a in leaves]
    return tree.unflatten(heads), (None if rests is None else tree.unflatten(rests))


def map_chunks(apply: Callable[[Any, Any], jax.Array], chunk: int | None) -> Callable:
    """`apply(params, batch)` run on chunks of `chunk` examples one after another (under
    `jax.lax.map`, a last, smaller chunk for the remainder), outputs concatenated in order;
    `apply` itself for `chunk=None`. `batch` is an array or a pytree of arrays that share the
    leading batch axis (images and per-example task ids, say), split alike."""
    if chunk is None:
        return apply

    def chunked(params: Any, batch: Any) -> jax.Array:
        n = jax.tree.leaves(batch)[0].shape[0]
        if Plan(chunk).chunk_size(n) is None:
            return apply(params, batch)
        head, rest = split_batch(batch, chunk)
        out = jax.lax.map(lambda c: apply(params, c), head)
        out = out.reshape(-1, *out.shape[2:])
        return out if rest is None else jnp.concatenate([out, apply(params, rest)])

    return chunked


# ----------------------------------------------------------------------------------------------
# Host memory: huge pages (docs/performance.md, "Host memory").
#
# Every execution of a jitted XLA:CPU step takes its temporary buffer from glibc's malloc, which
# maps a block that large fresh each time; the kernel then faults it in page by page. glibc's
# tunable `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (`madvise`), so
# the same buffer takes far fewer faults. glibc reads tunables only when a process starts: a
# running script cannot turn it on for itself, only restart with it.

TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "ADAPTER_PLUS_JAX_HUGE_PAGES"  # "0": leave the process as it started
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library if it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def would_reexec(
    environ: Mapping[str, str], glibc: tuple[int, int] | None, thp: str | None
) -> bool:
    """Whether restarting with the tunable would give malloc huge pages it does not get now."""
    if environ.get(HUGE_PAGES_ENV) == "0":
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    return glibc is not None and glibc >= (2, 35) and thp == "madvise"


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the tunable added to GLIBC_TUNABLES (':'-separated, others kept)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}


def huge_pages_on() -> bool:
    """Whether this process's malloc uses transparent huge pages for its large blocks."""
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        return glibc_version() is not None and thp_mode() in ("madvise", "always")
    return thp_mode() == "always"


def _restartable() -> bool:
    """Whether starting this process over runs the same program: not an interactive session,
    a notebook kernel, or a script read from stdin (which a restart would find empty)."""
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or "ipykernel" in sys.modules
    return not interactive and sys.argv[:1] not in ([""], ["-"])


def reexec_with_huge_pages() -> None:
    """Restart this process once with `glibc.malloc.hugetlb=1` where that gives malloc huge
    pages (Linux, glibc 2.35+, transparent huge pages in `madvise` mode, the tunable not set,
    ADAPTER_PLUS_JAX_HUGE_PAGES not 0, a script or command rather than an interactive session,
    a notebook or stdin); otherwise return at once. `os.execve` keeps the PID, the
    arguments and the open files, and the process starts over: call it before any work."""
    if not sys.platform.startswith("linux") or not _restartable():
        return
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own flags included (-m, -X ...)
    if not argv or not sys.executable:
        return
    if not would_reexec(os.environ, glibc_version(), thp_mode()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, with_tunable(os.environ))
