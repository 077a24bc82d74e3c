"""The bfloat16 product forms on this device: what rounding once costs.

Our bfloat16 layers (`precision.Dense`, `precision.einsum_f32`) compute a product as torch's
addmm does: bfloat16 operands, a float32 result, the float32 bias added, one rounding to
bfloat16. On XLA:CPU that form is what reaches the fast AMX/AVX512-BF16 kernels; on a GPU it
may cost a float32 write and a separate convert pass unless XLA folds them into the GEMM. This
times, at ViT-B/16's layer shapes (qkv, fc1, fc2 over batch x 197 tokens), the four forms
(float32 or bfloat16 result, with or without a bias) and names the kernels XLA compiled each to.

    python benchmarks/dot_forms.py --batch 64 --out dot_forms.md
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

SHAPES = {"qkv": (768, 2304), "fc1": (768, 3072), "fc2": (3072, 768)}  # (in, out)
OURS_BIAS = "float32 result + float32 bias, rounded once (ours)"
BF16_BIAS = "bfloat16 result + bfloat16 bias"
OURS_PLAIN = "float32 result, rounded, no bias (ours)"
BF16_PLAIN = "bfloat16 result, no bias"
FORMS: dict[str, Callable] = {
    OURS_BIAS: lambda x, w, b: (jnp.dot(x, w, preferred_element_type=jnp.float32) + b).astype(
        jnp.bfloat16
    ),
    BF16_BIAS: lambda x, w, b: jnp.dot(x, w) + b.astype(jnp.bfloat16),
    OURS_PLAIN: lambda x, w, b: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(
        jnp.bfloat16
    ),
    BF16_PLAIN: lambda x, w, b: jnp.dot(x, w),
}
# Each form against the bfloat16-result form with the same bias ('+') or none.
BASELINE = {form: BF16_BIAS if "+" in form else BF16_PLAIN for form in FORMS}


def seconds_per_call(fn: Callable, args: tuple, calls: int) -> float:
    """Mean seconds per call of `calls` calls in a row, after one untimed call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(calls):
        y = fn(*args)
    jax.block_until_ready(y)
    return (time.perf_counter() - start) / calls


def kernels(hlo: str) -> str:
    """The custom calls (library GEMMs) and the count of fusions in optimised HLO text."""
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    fusions = len(re.findall(r"^\s*\S+ = [^\n]*? fusion\(", hlo, re.M))  # tuple shapes too
    return f"{', '.join(calls) or 'no custom call'}; {fusions} fusion(s)"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="images; rows = batch x 197 tokens")
    p.add_argument("--width", type=float, default=1.0, help="scale the layer widths (tests)")
    p.add_argument("--calls", type=int, default=100, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="the best round counts")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.batch < 1 or a.calls < 1 or a.rounds < 1 or a.width <= 0:
        p.error("--batch, --calls and --rounds must be positive, --width above 0")
    rows = a.batch * 197
    device = jax.devices()[0]
    lines = [
        f"# bfloat16 product forms: {rows} rows ({a.batch} x 197 tokens), "
        f"{device.device_kind}, jax {jax.__version__}",
        "",
        "| layer | form | us per call | TFLOP/s | vs bfloat16 result | compiled to |",
        "|---|---|---|---|---|---|",
    ]
    for layer, (k, m) in SHAPES.items():
        k, m = max(8, int(k * a.width)), max(8, int(m * a.width))
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
        w = jax.random.normal(keys[1], (k, m), jnp.bfloat16) * k**-0.5
        b = jax.random.normal(keys[2], (m,), jnp.float32)
        times, compiled = {}, {}
        for form, fn in FORMS.items():
            jitted = jax.jit(fn)
            compiled[form] = kernels(jitted.lower(x, w, b).compile().as_text())
            times[form] = min(seconds_per_call(jitted, (x, w, b), a.calls) for _ in range(a.rounds))
        for form, s in times.items():
            base = times[BASELINE[form]]
            lines.append(
                f"| {layer} {k}->{m} | {form} | {s * 1e6:.1f} | {2 * rows * k * m / s / 1e12:.1f} "
                f"| {s / base:.2f}x | {compiled[form]} |"
            )
        print(f"  {layer} done", flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
