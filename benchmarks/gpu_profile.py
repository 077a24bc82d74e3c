"""Where a GPU train step's time goes, kernel by kernel: ours against torch eager and
torch.compile, on the same batch, the same weights, in one process.

The models and steps are those of `benchmarks/train_step.py` (ViT with Adapter+ r=8, AdamW on
adapters and head, drop path 0.1), in bfloat16 (torch: bf16 autocast), ours with the attention
`create_model` takes by default there. Each side runs `--warmup` steps, then `--steps` profiled
steps; every figure is milliseconds per step of device-kernel time.

- Ours: the jax.profiler trace's device events (kernels and copies on the GPU's streams). Each
  is named by, or carries, the HLO instruction it ran; the optimized HLO's `op_name` metadata
  maps that to a module path, so the time is also split by op class and direction
  (`profile_step.classify_ours`: forward, backward, optimizer).
- torch: torch.profiler's CUDA kernels and copies (its Chrome trace, whose format is stable
  across torch versions).
- Both: kernels grouped into families by name (`FAMILIES`: GEMMs, fused attention,
  convolution, copies, element-wise and reductions), and the largest kernels listed.

Usage (on a GPU; on a CPU it runs, with XLA:CPU's thunks for ours and no torch kernels):
    python benchmarks/gpu_profile.py --batch 128 --torch-compile --out DIR
Writes DIR/gpu_profile_<size>_b<batch>.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import profile_step as ps  # benchmarks/: puts the repository and tests/ on sys.path
import torch
import train_step as ts
from torch.profiler import ProfilerActivity, profile

from adapter_plus_jax import backend
from adapter_plus_jax.convert import from_timm

# (family, pattern over the kernel's name, lowercased); the first match wins.
FAMILIES = (
    ("fused attention", r"flash|fmha|sdpa|attention|attn"),
    ("convolution", r"conv(?!ert)|implicit|fprop|dgrad|wgrad"),  # not XLA's converts
    ("GEMM (cuBLAS, CUTLASS, Triton GEMM)", r"gemm|nvjet|xmma|cutlass|cublas|matmul|wgmma|_mma"),
    ("copies and memset", r"memcpy|memset|copy|transpose"),
    ("element-wise and reductions", r"."),
)
TOP = 15


def family(kernel: str) -> str:
    """The family of a kernel (or copy) from its name."""
    low = kernel.lower()
    return next(name for name, pattern in FAMILIES if re.search(pattern, low))


def device_pids(events: list[dict]) -> set[Any]:
    """The trace's processes that are GPU devices (their process_name metadata names one)."""
    return {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and re.search(r"/device:GPU|GPU:\d|gpu", str(e.get("args", {}).get("name", "")))
    }


def our_device_events(events: list[dict], op_names: dict[str, str]) -> list[tuple[str, str, float]]:
    """(kernel name, HLO instruction or '', microseconds) of every device event of our trace.
    Off GPUs (a CPU test run) the XLA:CPU thunk events stand in for kernels."""
    pids = device_pids(events)
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        args = e.get("args") or {}
        hlo = str(args.get("hlo_op") or (e["name"] if e["name"] in op_names else ""))
        if e.get("pid") in pids or (not pids and hlo):
            out.append((e["name"], hlo, float(e["dur"])))
    return out


def summarise(kernels: list[tuple[str, float]], steps: int) -> dict:
    """Milliseconds per step by family and for the largest kernels, from (name, us) pairs."""
    by_family: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, us in kernels:
        by_family[family(name)] += us / 1e3 / steps
        by_name[name][0] += us / 1e3 / steps
        by_name[name][1] += 1 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "busy_ms": sum(by_family.values()),
        "families": dict(by_family),
        "top": [{"kernel": k, "ms": v[0], "per_step": v[1]} for k, v in top],
    }


def profile_ours(module, params, x, y, warmup: int, steps: int) -> dict:
    """Our step (`train_step.jax_train_peer`, the backend's plan) under jax.profiler."""
    peer = ts.jax_train_peer("ours", module, params, x, y, backend.plan(module))
    op_names = ps.instruction_op_names(peer.compiled.as_text())
    events, wall = ps.traced_steps(peer, warmup, steps)
    found = our_device_events(events, op_names)
    result = summarise([(name, us) for name, _, us in found], steps)
    # Which events were read: a GPU's stream events, or (no GPU in the trace) XLA:CPU's thunks.
    result["source"] = "GPU streams" if device_pids(events) else "XLA thunks (no GPU in the trace)"
    classes: dict[str, float] = collections.defaultdict(float)
    for _, hlo, us in found:
        name, direction = ps.classify_ours(op_names[hlo]) if hlo in op_names else ("?", "?")
        classes[f"{name} ({direction})"] += us / 1e3 / steps
    result["classes"] = dict(sorted(classes.items(), key=lambda kv: -kv[1]))
    result["wall_ms"] = wall * 1e3 / steps
    return result


def profile_torch(peer: ts.Peer, warmup: int, steps: int) -> dict:
    """A torch peer's step under torch.profiler: its CUDA kernels and copies."""
    for _ in range(warmup):
        peer.step()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            peer.step()
        wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [
        (e["name"], float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    result = summarise(kernels, steps)
    result["wall_ms"] = wall * 1e3 / steps
    return result


def markdown(results: dict) -> str:
    a, sides = results["args"], results["sides"]
    names = list(sides)
    lines = [
        f"# GPU train step profile: ViT-{a['model_size']}/16 {a['image']}, Adapter+ r=8, batch "
        f"{a['batch']}, bfloat16",
        "",
        f"{results['device']}; jax {results['versions']['jax']}, torch "
        f"{results['versions']['torch']}; ours with attention='{results['attention']}', read "
        f"from the trace's {sides['ours'].get('source', '?')}; "
        f"{a['steps']} profiled steps per side after {a['warmup']} warmup steps. "
        "Milliseconds per step of device-kernel time (profiling slows the steps a little).",
        "",
        "| kernel family | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for fam, _ in FAMILIES:
        row = [sides[n]["families"].get(fam, 0.0) for n in names]
        if any(row):
            lines.append(f"| {fam} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    lines.append(
        "| **all kernels** | " + " | ".join(f"**{sides[n]['busy_ms']:.2f}**" for n in names) + " |"
    )
    lines.append(
        "| step wall time | " + " | ".join(f"{sides[n]['wall_ms']:.2f}" for n in names) + " |"
    )
    ours = sides.get("ours")
    if ours and ours.get("classes"):
        lines += ["", "Ours by op class (`profile_step.classify_ours`), ms per step:", ""]
        lines += ["| op class (direction) | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in ours["classes"].items()]
    for n in names:
        lines += [
            "",
            f"Largest kernels, {n}:",
            "",
            "| kernel | ms/step | calls/step |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{t['kernel'][:110]}` | {t['ms']:.3f} | {t['per_step']:.0f} |"
            for t in sides[n]["top"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ts.add_step_args(p)
    p.add_argument("--image", type=int, default=ts.IMAGE, help="input size (smaller: a toy check)")
    p.add_argument("--depth", type=int, default=ts.DEPTH, help="blocks (fewer: a toy check)")
    p.add_argument("--torch-compile", action="store_true", help="profile torch.compile's step too")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(dtype="bfloat16", warmup=3, steps=5)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((a.batch, a.image, a.image, 3), np.float32)
    y_np = rng.integers(0, a.classes, a.batch)
    model = ts.reference_model(a.model_size, a.classes, a.image, a.depth)
    module, variables = from_timm(model, dtype=jnp.dtype(a.dtype))
    module = module.clone(config=module.config.replace(drop_path_rate=0.1))  # as train_step.py
    module = module.clone(attention=backend.resolve_attention("auto", module.dtype, module.config))
    results: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "versions": {"torch": torch.__version__, "jax": jax.__version__},
        "attention": module.attention,
        "sides": {},
    }
    bf16 = a.dtype == "bfloat16"
    print(f"== profiling ours (attention={module.attention})", flush=True)
    results["sides"]["ours"] = profile_ours(
        module, variables["params"], jnp.asarray(x_np), jnp.asarray(y_np, jnp.int32),
        a.warmup, a.steps,
    )  # fmt: skip
    tx = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
    ty = torch.from_numpy(y_np).to(device)
    model = model.to(device)
    threads = torch.get_num_threads()
    print("== profiling torch eager", flush=True)
    eager = ts.torch_train_peer("torch eager", model, tx, ty, bf16, threads)
    results["sides"]["torch eager"] = profile_torch(eager, a.warmup, a.steps)
    if a.torch_compile:
        print("== profiling torch.compile (compiles first)", flush=True)
        compiled = ts.torch_train_peer(
            "torch.compile", torch.compile(copy.deepcopy(model)), tx, ty, bf16, threads
        )
        results["sides"]["torch.compile"] = profile_torch(compiled, a.warmup, a.steps)
    ts.write_results(markdown(results), results, a.out, f"gpu_profile_{a.model_size}_b{a.batch}")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
