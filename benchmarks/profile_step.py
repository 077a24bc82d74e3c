"""Where a training step's time goes, per op class: our jitted step (jax.profiler) and the
reference's eager step (torch.profiler), on the same batch, the same weights, in one process.

The two models and steps are exactly those of `benchmarks/train_step.py` (ViT with Adapter+
r=8, AdamW on adapters and head, drop path 0.1). Each side runs `--warmup` steps, then
`--steps` profiled steps; the figures are milliseconds per step.

- Ours: every XLA:CPU thunk (one fused kernel, dot or copy) is an event in the jax.profiler
  trace, named as its HLO instruction. The compiled HLO's `op_name` metadata names the Flax
  module path and the jax primitive each instruction came from
  (`transpose(jvp(VisionTransformer))/blocks_3/mlp/fc1/dot_general`), which `classify_ours`
  maps to an op class and a direction (forward, backward = `transpose(jvp(...))`, or the rest
  of the step). Thunks can run concurrently; each instant of wall time is split evenly between
  the thunks running then, so the classes add up to the time covered by thunks. What remains
  of the step's wall time is "host": dispatch, Python, waiting.
- Reference: torch.profiler's self CPU time of every aten op, classified by op name and input
  shapes (`classify_torch`); the rest of the step's wall time is "host" (Python, autograd's
  bookkeeping between ops).

Usage:
    python benchmarks/profile_step.py --batch 8 --out DIR
Writes DIR/profile_<size>_b<batch>.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import train_step as ts  # benchmarks/: puts the repository and tests/ on sys.path
from torch.profiler import ProfilerActivity, profile

from adapter_plus_jax import backend
from adapter_plus_jax.convert import from_timm

# Op classes, in the order the tables list them.
MATMULS = "block matmuls (qkv, proj, fc1, fc2)"
ATTN = "attention products (q k^T, a v)"
ATTN_LAYOUT = "attention layout (q/k/v split, head transposes)"
SOFTMAX = "softmax"
NORM = "layer norm"
GELU = "GELU"
ADAPTER = "adapter branch"
DROP = "drop path (masks, scaling)"
EMBED = "patch embedding"
HEAD = "head + loss"
OPTIMIZER = "optimizer + metrics"
OTHER = "other element-wise (residual and bias adds, copies)"
FUSED_ATTN = "attention (fused kernel: products + softmax)"
HOST = "host (dispatch, Python, idle)"
CLASSES = (MATMULS, ATTN, ATTN_LAYOUT, SOFTMAX, FUSED_ATTN, NORM, GELU, ADAPTER, DROP, EMBED, HEAD,
           OPTIMIZER, OTHER, HOST)  # fmt: skip

# (pattern over the op_name with the jit/jvp prefix removed, class); the first match wins.
OUR_RULES = (
    (r"/(adapter\w*|lora_\w)/", ADAPTER),
    (r"Drop(Path|out)|random_|threefry|rng_bit", DROP),
    (r"/(qkv|proj|fc1|fc2)/dot_general", MATMULS),
    (r"/attn/\w+,\w+->\w+/dot_general|/attn/mul$", ATTN),
    (r"/attn/(\w+,\w+->\w+/)?(transpose|squeeze|reshape|slice|copy|concatenate)", ATTN_LAYOUT),
    (r"/attn/(reduce_max|reduce_sum|exp|sub|div|max|stop_gradient|add_any|custom_jvp)", SOFTMAX),
    (r"/(norm\d?|fc_norm|norm_pre)/", NORM),
    (r"/mlp/(erf|mul|add|exp|integer_pow|neg|sub|select_n|add_any)$", GELU),
    (r"patch_embed|_embed", EMBED),
    (r"/head/", HEAD),
)


def classify_ours(op_name: str) -> tuple[str, str]:
    """(op class, direction) of an HLO instruction from its op_name metadata."""
    if "jvp(" not in op_name:
        return OPTIMIZER, "update"
    direction = "backward" if "transpose(jvp(" in op_name else "forward"
    if "VisionTransformer" not in op_name:
        return HEAD, direction  # the loss, inside value_and_grad but outside the model
    path = re.sub(r"^.*VisionTransformer\)*", "", op_name)
    for pattern, name in OUR_RULES:
        if re.search(pattern, path):
            return name, direction
    return OTHER, direction


def instruction_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata, for every instruction that has one."""
    pattern = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]*)"', re.M)
    return {m.group(1): m.group(2) for m in pattern.finditer(hlo_text)}


def split_concurrent(intervals: list[tuple[float, float, str]]) -> tuple[dict[str, float], float]:
    """Per-key time of (start, end, key) intervals, each instant shared evenly between the
    intervals active then; and the length of their union."""
    edges = sorted({t for s, e, _ in intervals for t in (s, e)})
    starts = collections.defaultdict(list)
    for i, (s, _, _) in enumerate(intervals):
        starts[s].append(i)
    active: set[int] = set()
    totals: dict[str, float] = collections.defaultdict(float)
    covered = 0.0
    for left, right in zip(edges, edges[1:], strict=False):
        active = {i for i in active if intervals[i][1] > left} | set(starts[left])
        if active:
            covered += right - left
            for i in active:
                totals[intervals[i][2]] += (right - left) / len(active)
    return dict(totals), covered


def traced_steps(peer: ts.Peer, warmup: int, steps: int) -> tuple[list[dict], float]:
    """(the jax.profiler trace events, wall seconds) of `steps` steps of `peer`, after `warmup`
    untraced ones."""
    for _ in range(warmup):
        peer.step()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                peer.step()
            wall = time.perf_counter() - start
        raw = next(Path(tmp).rglob("perfetto_trace.json.gz")).read_bytes()
    trace = json.loads(gzip.decompress(raw))
    return (trace["traceEvents"] if isinstance(trace, dict) else trace), wall


def profile_ours(module, params, x, y, warmup: int, steps: int, plan: backend.Plan) -> dict:
    """Per-class milliseconds per step of our jitted step, built and compiled in `plan`."""
    peer = ts.jax_train_peer("ours", module, params, x, y, plan)
    op_names = instruction_op_names(peer.compiled.as_text())
    events, wall = traced_steps(peer, warmup, steps)
    intervals = []
    for e in events:
        if e.get("ph") != "X" or e["name"] not in op_names:
            continue
        name, direction = classify_ours(op_names[e["name"]])
        intervals.append((e["ts"], e["ts"] + e["dur"], f"{name}|{direction}"))
    if not intervals:
        raise SystemExit("The jax trace holds no XLA thunk events; this jax traces differently.")
    totals, covered = split_concurrent(intervals)
    per_class: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for key, us in totals.items():
        name, direction = key.split("|")
        per_class[name][direction] = us / 1e3 / steps
    per_class[HOST] = {"update": max(wall * 1e3 - covered / 1e3, 0.0) / steps}
    return {"wall_ms": wall * 1e3 / steps, "classes": dict(per_class)}


def _dims(shapes: list) -> list[int]:
    return [d for s in shapes if isinstance(s, list) for d in s]


def classify_torch(event, tokens: int, batch: int) -> str:
    """Op class of one torch.profiler event (an aten op or a wrapper) from its name, input
    shapes and ancestors."""
    name, shapes = event.name, event.input_shapes or []
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return OPTIMIZER
        parent = parent.cpu_parent
    if "scaled_dot_product" in name or "flash_attention" in name:
        return FUSED_ATTN
    if "layer_norm" in name:
        return NORM
    if "convolution" in name or "conv2d" in name:
        return EMBED
    if "bernoulli" in name:
        return DROP
    if "cross_entropy" in name or "log_softmax" in name or "nll_loss" in name:
        return HEAD
    dims = _dims(shapes)
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        matrices = [s for s in shapes if isinstance(s, list) and len(s) == 2]
        if all(min(s) >= 768 for s in matrices):
            return MATMULS
        return ADAPTER if tokens in dims else HEAD
    if "gelu" in name:
        return GELU if shapes and shapes[0] and shapes[0][-1] > 64 else ADAPTER
    if name in ("aten::mul", "aten::div", "aten::div_", "aten::mul_") and [batch, 1, 1] in shapes:
        return DROP
    if name in ("aten::mul", "aten::mul_") and any(s == [768] for s in shapes):
        return ADAPTER  # channel scaling (no LayerScale in these ViTs)
    return OTHER


def profile_reference(model, x, y, warmup: int, steps: int) -> dict:
    """Per-class milliseconds per step of the reference's eager step (self CPU time per op)."""
    peer = ts.torch_train_peer("reference", model, x, y, False, torch.get_num_threads())
    for _ in range(warmup):
        peer.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            peer.step()
        wall = time.perf_counter() - start
    batch = x.shape[0]
    tokens = batch * ((x.shape[-1] // ts.PATCH) ** 2 + 1)
    per_class: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        per_class[classify_torch(event, tokens, batch)] += event.self_cpu_time_total / 1e3 / steps
    counted = sum(per_class.values())
    per_class[HOST] += max(wall * 1e3 / steps - counted, 0.0)
    return {"wall_ms": wall * 1e3 / steps, "classes": {k: {"all": v} for k, v in per_class.items()}}


def markdown(results: dict) -> str:
    a, ours, ref = results["args"], results["ours"], results["reference"]
    lines = [
        f"# Train step profile: ViT-{a['model_size']}/16 224, Adapter+ r=8, batch {a['batch']}, "
        "float32",
        "",
        f"{results['device']}; jax {results['versions']['jax']}, torch "
        f"{results['versions']['torch']}; {a['steps']} profiled steps per side after "
        f"{a['warmup']} warmup steps. Profiled step time: ours {ours['wall_ms']:.0f} ms, "
        f"reference {ref['wall_ms']:.0f} ms (profiling slows both a little).",
        "",
        "| op class | ours fwd (ms) | ours bwd (ms) | ours other (ms) | ours total | reference "
        "| ours - ref. |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in CLASSES:
        o, r = ours["classes"].get(name, {}), ref["classes"].get(name, {}).get("all", 0.0)
        if not o and not r:
            continue
        total = sum(o.values())
        fwd, bwd, rest = o.get("forward", 0.0), o.get("backward", 0.0), o.get("update", 0.0)
        lines.append(
            f"| {name} | {fwd:.0f} | {bwd:.0f} | {rest:.0f} | {total:.0f} | {r:.0f} | "
            f"{total - r:+.0f} |"
        )
    total_ours = sum(v for c in ours["classes"].values() for v in c.values())
    total_ref = sum(c["all"] for c in ref["classes"].values())
    lines.append(
        f"| **step** | | | | **{total_ours:.0f}** | **{total_ref:.0f}** | "
        f"**{total_ours - total_ref:+.0f}** |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", choices=sorted(ts.SIZES), default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=47)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--eigen-dots",
        action="store_true",
        help="compile our step with train_step.py's EIGEN_DOTS options (XLA's Eigen dots emit "
        "no trace events: their time shows up as host)",
    )
    a = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((a.batch, ts.IMAGE, ts.IMAGE, 3), np.float32)
    y_np = rng.integers(0, a.classes, a.batch)
    model = ts.reference_model(a.model_size, a.classes)
    module, variables = from_timm(model)
    module = module.clone(config=module.config.replace(drop_path_rate=0.1))  # as train_step.py
    plan = backend.plan(module)
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "device": f"CPU, {torch.get_num_threads()} threads for torch",
        "versions": {"torch": torch.__version__, "jax": jax.__version__},
    }
    print("== profiling ours", flush=True)
    results["ours"] = profile_ours(
        module, variables["params"], jnp.asarray(x_np), jnp.asarray(y_np, jnp.int32),
        a.warmup, a.steps,
        backend.Plan(plan.chunk, ts.EIGEN_DOTS) if a.eigen_dots else plan,
    )  # fmt: skip
    print("== profiling the reference", flush=True)
    results["reference"] = profile_reference(
        model, torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y_np),
        a.warmup, a.steps,
    )  # fmt: skip
    ts.write_results(markdown(results), results, a.out, f"profile_{a.model_size}_b{a.batch}")
    return results


if __name__ == "__main__":
    backend.reexec_with_huge_pages()  # as `apj train` runs; ADAPTER_PLUS_JAX_HUGE_PAGES=0: without
    sys.exit(main() and 0)
