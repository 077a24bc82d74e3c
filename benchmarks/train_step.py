"""Training-step throughput and peak memory: our jitted JAX step against the reference.

Both sides train the same model on the same batch in one process, with the same weights:

- ours: `VisionTransformer` with Adapter+ (converted from the reference model), the step of
  `train.make_train_step` (AdamW on the trainable subtree, the state donated) in the backend's
  plan, as runs and users' loops build it (`backend.plan`: on CPUs in float32 the batch in
  chunks of 8 ViT-B/16 images, gradients summed, and oneDNN's dots on Intel and AMD CPUs); on
  CPUs in float32 also the same step, and the evaluation forward, with the other dot library
  (XLA's default YNNPACK where ours is oneDNN, else oneDNN), and, where the batch is split,
  the step over the whole batch at once;
- ours with the attention `create_model` takes by default here (`attention='auto'`: cuDNN's
  fused kernel on NVIDIA GPUs in bfloat16, XLA's einsums elsewhere); where that is cuDNN's,
  also ours with the einsums (`attention='xla'`), train and evaluation, and how far the two
  logits are apart;
- with `--xla-option NAME:KEY=VALUE[,KEY=VALUE]` (repeatable), ours compiled with those XLA
  options as one more peer each (e.g. `cudnn_ln:xla_gpu_enable_cudnn_layer_norm=true`); an
  option this XLA does not know is reported, not fatal;
- reference: adapter-plus `VisionTransformerAdapter` on timm, torch.optim.AdamW, only adapters
  and head trainable; with `--torch-compile` also the same under `torch.compile`, train step
  and evaluation forward.

Like `apj train`, the script restarts itself once with glibc's huge-page tunable where that
helps (`backend.reexec_with_huge_pages`); both sides then run under it, and the table says
whether it was on. `ADAPTER_PLUS_JAX_HUGE_PAGES=0 python benchmarks/train_step.py ...`
measures without.

Adapter+ everywhere: post position, channel scaling, r=8, no norm, bias, houlsby init, drop path
0.1 on the adapters and stochastic depth 0.1 in the ViT. `--dtype bfloat16` runs torch under
bf16 autocast and our model with bfloat16 compute (parameters float32 in both).

Measurements are interleaved: every round times `--steps` steps of each peer in turn, the order
reversed every round, so that other load on the machine hits all peers alike; torch's OpenMP
threads wait passively (`OMP_WAIT_POLICY=PASSIVE` unless set), so that they do not spin on the
cores of the peer timed after torch. Images/s is
batch / median step time. Also measured:

- evaluation images/s (forward in eval mode, no gradients) of the reference and ours, and of
  our LoRA model (r=8 on q, k) with and without `merge_lora`;
- a big float32 matmul in torch and in jax (GFLOP/s); the better one is this machine's peak, and
  each training step's model FLOP/s (forward + input gradients, ~70 GFLOP per image for
  ViT-B/16, counted analytically) is reported as a fraction of it;
- peak memory of a step: on CPU the host RSS rise over the step (sampled every 2 ms, after
  `malloc_trim` so that freed heap is not counted as reuse); on GPU the device peak of torch's
  peers (torch.cuda.max_memory_allocated, weights and state included) and, for ours, what
  XLA's buffer assignment plans for the step (arguments + outputs + temporaries, less what is
  donated and aliased), since jax's `peak_bytes_in_use` is the process's peak, shared by all
  our peers.

`--hlo-dir DIR` writes each of our train steps' optimized HLO (DIR/<peer>.hlo.txt.gz), which
says what XLA fused and which kernels (cuBLAS, cuDNN, Triton) it chose.

Usage:
    python benchmarks/train_step.py --model-size base --batch 8 --dtype float32 --out DIR
    python benchmarks/train_step.py --dtype bfloat16 --torch-compile --out DIR

Writes DIR/train_step_<size>_<dtype>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import gzip
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# jax must not grab most of a GPU that torch shares in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# torch's OpenMP threads otherwise spin on after each op and take the cores from the peer timed
# next: on a 2-core Xeon that made our step 0.84x instead of 0.94x the reference, whose own step
# did not change (2.38-2.43 s spinning, 2.33-2.39 s passive). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "tests"))  # the torch reference (tests/reference.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from reference import (  # noqa: E402
    ADAPTER_PLUS,
    freeze_like_reference,
    reference_adamw,
    reference_vit,
)

from adapter_plus_jax import backend, train  # noqa: E402
from adapter_plus_jax.convert import from_timm  # noqa: E402
from adapter_plus_jax.model import VisionTransformer  # noqa: E402
from adapter_plus_jax.params import init_params, merge_lora, split, trainable_mask  # noqa: E402
from adapter_plus_jax.peft import LoRASpec  # noqa: E402

SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # width, heads; depth 12
DEPTH, PATCH, IMAGE = 12, 16, 224
OURS = "ours (jax)"
# XLA's Eigen dots instead of YNNPACK (XLA's default) for float32, for profile_step.py
# --eigen-dots (train_step.py times oneDNN's against YNNPACK's: `other_dots`).
EIGEN_DOTS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    )
}
BATCHED = "ours (jax, whole batch at once)"
XLA_ATTENTION = "ours (jax, attention='xla')"  # on GPUs where the default is cuDNN's
COMPILED = "reference (torch.compile)"
# Dense bfloat16 peaks from the vendors' datasheets (TFLOP/s), for MFU on GPUs; the most
# specific name first.
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756, "H200": 989, "H100": 989, "A100": 312, "L4": 121}
LORA, MERGED = "ours, LoRA r=8 q,k (unmerged)", "ours, LoRA merged (merge_lora)"


def other_dots(plan: backend.Plan) -> tuple[str, backend.Plan]:
    """(peer name, plan) with the float32 dot library that `plan` does not use."""
    if plan.compiler_options == backend.ONEDNN_DOTS:
        default = dataclasses.replace(plan, compiler_options=None)
        return "ours (jax, XLA's default YNNPACK dots)", default
    onednn = dataclasses.replace(plan, compiler_options=backend.ONEDNN_DOTS)
    return "ours (jax, oneDNN dots)", onednn


# ----------------------------------------------------------------------------------------------
# Models.


def reference_model(
    size: str, classes: int, image: int = IMAGE, depth: int = DEPTH
) -> torch.nn.Module:
    """The adapter-plus model with the Adapter+ config, frozen as the reference trains it."""
    width, heads = SIZES[size]
    model = reference_vit(
        adapter=ADAPTER_PLUS, img_size=image, patch_size=PATCH, embed_dim=width, depth=depth,
        num_heads=heads, num_classes=classes, drop_path_rate=0.1,
    )  # fmt: skip
    freeze_like_reference(model)
    return model


def model_gflop_per_image(size: str, classes: int, image: int = IMAGE, depth: int = DEPTH) -> float:
    """Forward + input-gradient GFLOP of one image (2 FLOP per multiply-add, backward = 2x the
    forward's matmuls without weight gradients): ~70 for ViT-B/16 at 224."""
    width, _ = SIZES[size]
    tokens = (image // PATCH) ** 2 + 1
    per_block = tokens * 12 * width**2 + 2 * tokens**2 * width  # qkv+proj+mlp, q@k and a@v
    patch = (tokens - 1) * 3 * PATCH**2 * width
    forward_macs = depth * per_block + patch + width * classes
    return 2 * 2 * forward_macs / 1e9


# ----------------------------------------------------------------------------------------------
# Peers: each runs one complete, synchronised step per call.


@dataclasses.dataclass
class Peer:
    name: str
    step: Callable[[], None]
    setup_s: float = 0.0  # compile / first-step time
    info: dict = dataclasses.field(default_factory=dict)
    compiled: Any = None  # ours: the compiled XLA executable (profile_step.py reads its HLO)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_train_peer(
    name: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
    threads: int,
) -> Peer:
    opt = reference_adamw(model, lr=1e-3)
    model.train()
    device = x.device.type

    def step() -> None:
        torch.set_num_threads(threads)  # process-wide; each torch peer sets its own
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync()

    return Peer(name, step)


def jax_train_peer(
    name: str,
    module: VisionTransformer,
    params: dict,
    x: jax.Array,
    y: jax.Array,
    plan: backend.Plan,
) -> Peer:
    """Our step as `train.make_train_step` builds it in `plan`, less the input normalisation
    (the batch here is already normalised); compiled ahead of time to time compilation."""
    trainable, frozen = split(params, trainable_mask(params))
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates them; `params` lives on
    tx = train.adamw(train.reference_lr(1e-3, 10), 1e-4)
    state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    start = time.perf_counter()
    compiled = train.make_train_step(module, tx, plan=plan).lower(state, frozen, x, y).compile()
    compile_s = time.perf_counter() - start
    # XLA counts a loop's body once: a chunked step's count covers one chunk (and the rest).
    size = plan.chunk_size(x.shape[0])
    counted = x.shape[0] if size is None else size + x.shape[0] % size
    info = {"xla_flops_per_image": compiled.cost_analysis()["flops"] / counted}
    memory = compiled.memory_analysis()
    if memory is not None:
        info["xla_temp_mib"] = memory.temp_size_in_bytes / 2**20
        planned = (
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes
        )  # fmt: skip
        info["xla_planned_mib"] = planned / 2**20
    holder = {"state": state}

    def step() -> None:
        holder["state"], _ = compiled(holder["state"], frozen, x, y)
        jax.block_until_ready(holder["state"])

    return Peer(name, step, compile_s, info, compiled)


def torch_eval_peer(name: str, model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> Peer:
    """The reference's evaluation forward: eval mode, no autograd."""
    device = x.device.type

    def step() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
            model(x)
        sync()

    return Peer(name, step)


def jax_eval_peer(
    name: str, module: VisionTransformer, params: dict, x: jax.Array, plan: backend.Plan
) -> Peer:
    """The forward as runs evaluate it: in `plan`'s chunks, with its compiler options."""
    start = time.perf_counter()
    forward = backend.map_chunks(lambda p, images: module.apply({"params": p}, images), plan.chunk)
    compiled = plan.jit(forward).lower(params, x).compile()
    compile_s = time.perf_counter() - start

    def step() -> None:
        compiled(params, x).block_until_ready()

    return Peer(name, step, compile_s)


# ----------------------------------------------------------------------------------------------
# Measuring.


_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


class RssPeak:
    """Peak host RSS while active, sampled by a thread (ru_maxrss cannot be reset)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.proc, self.peak = interval_s, psutil.Process(), 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    @contextlib.contextmanager
    def rise(self) -> Iterator[dict]:
        """Yields a dict whose 'bytes' is set to peak RSS minus RSS at entry, on exit."""
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # give freed heap back, so the step's own rise is visible
        base = self.peak = self.proc.memory_info().rss
        self._stop.clear()
        thread = threading.Thread(target=self._run, daemon=True)
        out: dict = {}
        thread.start()
        try:
            yield out
        finally:
            self._stop.set()
            thread.join()
            out["bytes"] = max(self.peak, self.proc.memory_info().rss) - base


def device_peak_mib(peer: Peer) -> float | None:
    """Device memory peak in MiB (GPU only): torch's since its reset; for ours, the step's
    buffers as XLA planned them (jax's `peak_bytes_in_use` cannot be reset: it would give every
    peer of ours the largest one's peak)."""
    if peer.name.startswith("ours"):
        return peer.info.get("xla_planned_mib")
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def interleaved(peers: list[Peer], rounds: int, steps: int) -> dict[str, list[tuple[float, float]]]:
    """Per-peer (wall, process CPU) seconds of each step over `rounds` rounds of `steps` steps.

    CPU seconds (all threads, user + system) barely depend on other processes' load, unlike
    wall time; they include the spin-waiting of idle worker threads, which is real cost too.
    """
    times: dict[str, list[tuple[float, float]]] = {p.name: [] for p in peers}
    for r in range(rounds):
        for peer in peers if r % 2 == 0 else peers[::-1]:
            for _ in range(steps):
                start, cpu = time.perf_counter(), time.process_time()
                peer.step()
                times[peer.name].append((time.perf_counter() - start, time.process_time() - cpu))
        line = ", ".join(
            f"{p.name} {statistics.median(w for w, _ in times[p.name]):.3f} s" for p in peers
        )
        print(f"  round {r + 1}/{rounds}: median step {line}", flush=True)
    return times


def peak_memory_mib(peers: list[Peer], passes: int = 2) -> dict[str, float]:
    """Peak memory of one step per peer, the largest of `passes` alternating passes. Apart from
    the timed steps: the RSS sampler thread takes the GIL, which would slow eager torch."""
    rss = None if torch.cuda.is_available() else RssPeak()
    memory = {p.name: 0.0 for p in peers}
    for r in range(passes):
        for peer in peers if r % 2 == 0 else peers[::-1]:
            if rss is None:
                torch.cuda.reset_peak_memory_stats()
                peer.step()
                value = device_peak_mib(peer) or 0.0
            else:
                with rss.rise() as grown:
                    peer.step()
                value = grown["bytes"] / 2**20
            memory[peer.name] = max(memory[peer.name], value)
    return memory


def matmul_gflops(n: int, dtype: str, repeats: int, rounds: int) -> dict[str, float]:
    """Best-of-rounds median GFLOP/s of an n x n matmul in torch and in jax, interleaved."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    ta, tb = (torch.from_numpy(m).to(device, getattr(torch, dtype)) for m in (a_np, b_np))
    ja, jb = (jnp.asarray(m, dtype) for m in (a_np, b_np))
    # As our model's products (precision.einsum_f32_acc) and torch: accumulated in float32.
    jdot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    jdot(ja, jb).block_until_ready()

    def run_torch() -> None:
        torch.mm(ta, tb)
        sync()

    fns = {"torch": run_torch, "jax": lambda: jdot(ja, jb).block_until_ready()}
    best = {k: 0.0 for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            best[name] = max(best[name], 2 * n**3 / statistics.median(samples) / 1e9)
    return best


# ----------------------------------------------------------------------------------------------
# Main.


def warm_up(peer: Peer, steps: int) -> str | None:
    """Runs `steps` untimed steps; returns why it failed (for optional peers) or None."""
    start = time.perf_counter()
    try:
        for _ in range(steps):
            peer.step()
    except Exception as e:  # torch.compile fails in many ways on CPUs (compiler, inductor)
        traceback.print_exc()
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    peer.setup_s += time.perf_counter() - start
    return None


def summarise(times: list[tuple[float, float]], batch: int) -> dict:
    wall = [w for w, _ in times]
    med = statistics.median(wall)
    q = statistics.quantiles(wall, n=4) if len(wall) > 1 else [med, med, med]
    cpu = statistics.median(c for _, c in times)
    return {
        "median_step_s": med,
        "images_per_s": batch / med,
        "images_per_s_iqr": [batch / q[2], batch / q[0]],
        "median_step_cpu_s": cpu,
        "images_per_cpu_s": batch / cpu,
        "steps": len(times),
    }


def markdown(results: dict) -> str:
    a = results["args"]
    peak = results["matmul_gflops"]
    depth = a.get("depth", DEPTH)
    blocks = "" if depth == DEPTH else f", {depth} blocks"
    lines = [
        f"# Training step: ViT-{a['model_size']}/16 {a.get('image', IMAGE)}{blocks}, Adapter+ "
        f"r=8, batch {a['batch']}, "
        f"{a['classes']} classes, {a['dtype']}",
        "",
        f"Device: {results['device']}; torch {results['versions']['torch']} "
        f"(default {results['torch_threads']} threads), jax {results['versions']['jax']}; "
        f"load average {results['load_before']:.1f} before, {results['load_after']:.1f} after"
        + (f"; XLA_FLAGS={results['xla_flags']}" if results["xla_flags"] else "")
        + f"; malloc huge pages {'on' if results.get('huge_pages') else 'off'} (backend.py)"
        + ". "
        f"{a['rounds']} interleaved rounds x {a['steps']} steps after {a['warmup']} warmup "
        "steps; images/s = batch / median step time (interquartile range in brackets).",
        "",
        f"Matmul peak ({a['matmul_n']}^2 float32): torch {peak['torch']:.0f} GFLOP/s, jax "
        f"{peak['jax']:.0f} GFLOP/s. Model FLOPs per image (forward + input gradients): "
        f"{results['gflop_per_image']:.1f} GFLOP.",
    ]
    if "matmul_gflops_run_dtype" in results:
        p16 = results["matmul_gflops_run_dtype"]
        lines[-1] += f" {a['dtype']} matmul: torch {p16['torch']:.0f}, jax {p16['jax']:.0f}."
    lines[-1] += f" Peak ({a['dtype']}): {results['peak_gflops']:.0f} GFLOP/s."
    on_cpu = results["device_kind"] == "cpu"
    memory_label = "peak RSS rise (MiB)" if on_cpu else "device memory (MiB)†"
    lines += [
        "",
        f"| Train step | images/s | vs ref.* | of peak | images/CPU-s | vs ref.* | {memory_label} "
        "| setup (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # The fastest eager reference: the conservative baseline for "as fast as the reference".
    eager = [
        r for n, r in results["train"].items() if n.startswith("reference (torch,") and "steps" in r
    ]
    ref = max((r["images_per_s"] for r in eager), default=None)
    ref_cpu = max((r["images_per_cpu_s"] for r in eager), default=None)
    for name, r in results["train"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | |")
            continue
        lo, hi = r["images_per_s_iqr"]
        lines.append(
            f"| {name} | {r['images_per_s']:.2f} [{lo:.2f}-{hi:.2f}] | "
            f"{r['images_per_s'] / ref:.2f}x | {r['fraction_of_peak']:.1%} | "
            f"{r['images_per_cpu_s']:.2f} | {r['images_per_cpu_s'] / ref_cpu:.2f}x | "
            f"{r['memory_mib']:.0f} | {r['setup_s']:.1f} |"
        )
    lines += [
        "",
        "\\* vs the fastest eager reference peer. Of peak: model FLOP/s over the matmul peak. "
        "images/CPU-s: per second of process CPU time (all threads), which other processes' load "
        "hardly changes."
        + (
            ""
            if on_cpu
            else " † torch: its device peak (torch.cuda.max_memory_allocated); ours: the step's "
            "buffers as XLA planned them (arguments + outputs + temporaries, less what is aliased)."
        ),
        "",
        "| Evaluation forward | images/s | vs ref. | images/CPU-s |",
        "|---|---|---|---|",
    ]
    evals = results["inference"]
    base = next(r["images_per_s"] for n, r in evals.items() if n.startswith("reference"))
    for name, r in evals.items():
        lo, hi = r["images_per_s_iqr"]
        lines.append(
            f"| {name} | {r['images_per_s']:.2f} [{lo:.2f}-{hi:.2f}] | "
            f"{r['images_per_s'] / base:.2f}x | {r['images_per_cpu_s']:.2f} |"
        )
    lines += [
        "",
        f"Evaluation: Adapter+ unless named; ours as runs evaluate "
        f"(`train.make_eval_step`). Merging LoRA made it "
        f"{evals[MERGED]['images_per_s'] / evals[LORA]['images_per_s']:.2f}x "
        "the unmerged LoRA model's speed.",
    ]
    if "cudnn_max_abs_logit_diff" in results:
        lines += [
            "",
            f"attention='{results['default_attention']}' (the default here) against 'xla': "
            f"logits differ by at most "
            f"{results['cudnn_max_abs_logit_diff']:.2e} (largest logit "
            f"{results['max_abs_logit']:.2f}).",
        ]
    if "default_attention_failed" in results:
        lines += ["", "cuDNN's attention (the default here) failed, so ours is the einsums: "
                  f"{results['default_attention_failed']}"]  # fmt: skip
    mfu = model_flops_utilisation(results)
    if mfu:
        lines += ["", mfu]
    info = results["train"].get(OURS, {}).get("info", {})
    if info:
        note = f"XLA's own count for our step: {info['xla_flops_per_image'] / 1e9:.1f} GFLOP/image"
        if "xla_temp_mib" in info:
            note += f"; XLA temp buffer {info['xla_temp_mib']:.0f} MiB"
        lines += ["", note + "."]
    return "\n".join(lines) + "\n"


def model_flops_utilisation(results: dict) -> str | None:
    """A line with each train peer's MFU: model FLOP/s over the GPU's datasheet bfloat16 dense
    peak; None off GPUs or for a GPU not in `DATASHEET_BF16_TFLOPS`."""
    if results["device_kind"] != "cuda":
        return None
    name = next((k for k in DATASHEET_BF16_TFLOPS if k in results["device"]), None)
    if name is None:
        return None
    peak = DATASHEET_BF16_TFLOPS[name] * 1e3
    parts = [
        f"{peer} {r['images_per_s'] * results['gflop_per_image'] / peak:.1%}"
        for peer, r in results["train"].items()
        if "images_per_s" in r
    ]
    return f"MFU (model FLOP/s over the {name}'s {peak / 1e3:.0f} bf16 TFLOP/s): " + ", ".join(
        parts
    )


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The model and timing arguments of the train-step benchmarks."""
    p.add_argument("--model-size", choices=sorted(SIZES), default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=47)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per peer")
    p.add_argument("--steps", type=int, default=3, help="timed steps per peer and round")
    p.add_argument("--rounds", type=int, default=4)


def xla_option(text: str) -> tuple[str, dict[str, Any]]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> (NAME, {KEY: VALUE}), values as bool, int, float or str."""
    name, _, pairs = text.partition(":")
    if not name or not pairs:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    options: dict[str, Any] = {}
    for pair in pairs.split(","):
        key, eq, value = pair.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{pair!r} in {text!r}: expected KEY=VALUE")
        options[key] = _option_value(value)
    return name, options


def _option_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def write_hlo(peers: list[Peer], folder: Path) -> None:
    """Each compiled peer's optimized HLO, gzipped, as FOLDER/<peer name>.hlo.txt.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    for peer in peers:
        if peer.compiled is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", peer.name).strip("_")
            path = folder / f"{slug}.hlo.txt.gz"
            path.write_bytes(gzip.compress(peer.compiled.as_text().encode()))
            print(f"  wrote {path}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(p)
    p.add_argument("--image", type=int, default=IMAGE, help="input size (smaller: a toy check)")
    p.add_argument("--depth", type=int, default=DEPTH, help="blocks (fewer: a toy check)")
    p.add_argument(
        "--torch-threads",
        type=lambda v: [int(n) for n in v.split(",")],
        default=None,
        help="comma-separated torch thread counts, one eager reference peer each (default: "
        "torch's default). Under foreign load 1 thread can beat 2: OpenMP's static split waits "
        "for the preempted thread at every op",
    )
    p.add_argument("--torch-compile", action="store_true", help="add torch.compile as a peer")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument(
        "--xla-option",
        type=xla_option,
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="one more peer of ours, compiled with these XLA options (repeatable)",
    )
    p.add_argument("--hlo-dir", type=Path, default=None, help="write our steps' optimized HLO")
    p.add_argument("--out", type=Path, default=None, help="write the .md and .json here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = a.dtype == "bfloat16"
    results: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "device_kind": device,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),  # e.g. under taskset
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "jax": jax.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "huge_pages": backend.huge_pages_on(),  # both sides run under it
        "load_before": os.getloadavg()[0],  # other users' load skews everything; say how much
    }
    results["device"] = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU, {results['cpus_usable']} of {os.cpu_count()} cores ({platform.machine()})"
    )
    print(f"== {results['device']}", flush=True)

    print("== matmul peak", flush=True)
    results["matmul_gflops"] = matmul_gflops(a.matmul_n, "float32", 5, 3)
    if bf16:
        results["matmul_gflops_run_dtype"] = matmul_gflops(a.matmul_n, "bfloat16", 5, 3)
    # "Of peak" is over the peak of the dtype the step computes in.
    results["peak_gflops"] = max(
        results.get("matmul_gflops_run_dtype", results["matmul_gflops"]).values()
    )
    print(f"  {results['matmul_gflops']}", flush=True)

    print(f"== building ViT-{a.model_size}/16 with Adapter+ ({a.dtype})", flush=True)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((a.batch, a.image, a.image, 3), np.float32)
    y_np = rng.integers(0, a.classes, a.batch)
    tx = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)  # NCHW for torch
    ty = torch.from_numpy(y_np).to(device)
    jx, jy = jnp.asarray(x_np), jnp.asarray(y_np, jnp.int32)

    model = reference_model(a.model_size, a.classes, a.image, a.depth)
    module, variables = from_timm(model, dtype=jnp.dtype(a.dtype))
    # timm stores the rates as float32 (0.10000000149); runner.py sets the config's 0.1.
    module = module.clone(config=module.config.replace(drop_path_rate=0.1))
    params = variables["params"]
    model = model.to(device)
    threads = a.torch_threads or [torch.get_num_threads()]
    peers = [
        torch_train_peer(f"reference (torch, {n} thread{'s' * (n > 1)})", model, tx, ty, bf16, n)
        for n in threads
    ]
    print("== compiling our step", flush=True)
    results["train"] = {}
    plan = backend.plan(module)  # chunks and compiler options do not depend on the attention
    # The attention create_model takes here by default; where that is cuDNN's kernel, the
    # einsums (module) are a peer of their own.
    default = module.clone(attention=backend.resolve_attention("auto", module.dtype, module.config))
    try:
        peers.append(jax_train_peer(OURS, default, params, jx, jy, plan))
    except Exception as e:  # cuDNN's kernel needs a recent cuDNN, and rejects some shapes
        results["default_attention_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  attention={default.attention} failed: {results['default_attention_failed']}")
        default = module
        peers.append(jax_train_peer(OURS, default, params, jx, jy, plan))
    results["default_attention"] = default.attention
    einsums = module if default.attention != "xla" else None
    if einsums is not None:
        peers.append(jax_train_peer(XLA_ATTENTION, module, params, jx, jy, plan))
    other = other_dots(plan) if device == "cpu" and not bf16 else None
    if other is not None:  # the other float32 dot library, for comparison
        peers.append(jax_train_peer(other[0], module, params, jx, jy, other[1]))
    if plan.chunk_size(a.batch):
        whole = dataclasses.replace(plan, chunk=None)
        peers.append(jax_train_peer(BATCHED, module, params, jx, jy, whole))
    for name, options in a.xla_option:  # XLA options to try, one peer each
        peer_name = f"ours + {name}"
        optioned = dataclasses.replace(
            plan, compiler_options={**(plan.compiler_options or {}), **options}
        )
        try:
            peers.append(jax_train_peer(peer_name, default, params, jx, jy, optioned))
        except Exception as e:  # an option this XLA does not know, or cannot apply
            results["train"][peer_name] = {"skipped": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  {peer_name}: {results['train'][peer_name]['skipped']}", flush=True)
    if a.hlo_dir is not None:
        write_hlo(peers, a.hlo_dir)
    if a.torch_compile:
        compiled = torch.compile(copy.deepcopy(model))
        peers.append(torch_train_peer(COMPILED, compiled, tx, ty, bf16, threads[0]))

    results["gflop_per_image"] = model_gflop_per_image(a.model_size, a.classes, a.image, a.depth)
    print(f"== warmup: {a.warmup} steps per peer", flush=True)
    for peer in list(peers):
        why = warm_up(peer, a.warmup)
        print(f"  {peer.name}: {'ok' if why is None else why} ({peer.setup_s:.1f} s)", flush=True)
        if why is not None:
            results["train"][peer.name] = {"skipped": why}
            peers.remove(peer)
            if peer.name == XLA_ATTENTION:
                einsums = None
            if peer.name == OURS and einsums is not None:  # cuDNN's kernel failed to run
                results["default_attention_failed"] = why
                default, einsums = module, None  # evaluation: the einsums, as OURS

    print(f"== timing: {a.rounds} rounds x {a.steps} steps", flush=True)
    times = interleaved(peers, a.rounds, a.steps)
    print("== peak memory of a step", flush=True)
    memory = peak_memory_mib(peers)
    for peer in peers:
        r = summarise(times[peer.name], a.batch)
        r["fraction_of_peak"] = (
            r["images_per_s"] * results["gflop_per_image"] / results["peak_gflops"]
        )
        r["memory_mib"] = memory[peer.name]
        r["setup_s"] = peer.setup_s
        r["info"] = peer.info
        results["train"][peer.name] = r
    del peers
    gc.collect()

    print("== evaluation forward: Adapter+, and LoRA r=8 on q, k unmerged and merged", flush=True)
    lora = VisionTransformer(
        module.config, lora=LoRASpec(), dtype=module.dtype, attention=default.attention
    )
    backbone = {k: v for k, v in flatten_dict(params).items() if "adapter" not in k}
    lora_params = init_params(lora, unflatten_dict(backbone), jax.random.key(0))
    merged, merged_vars = merge_lora(lora, {"params": lora_params})
    eval_peers = [
        torch_eval_peer(f"reference (torch, {threads[0]} threads)", model, tx, bf16),
        jax_eval_peer(OURS, default, params, jx, plan),
        jax_eval_peer(LORA, lora, lora_params, jx, plan),
        jax_eval_peer(MERGED, merged, merged_vars["params"], jx, plan),
    ]
    if other is not None:
        eval_peers.append(jax_eval_peer(other[0], module, params, jx, other[1]))
    if einsums is not None:
        eval_peers.append(jax_eval_peer(XLA_ATTENTION, einsums, params, jx, plan))
        # The same logits both ways, within bfloat16 rounding: what the default's kernel changes.
        xla_logits, cudnn_logits = (m.apply({"params": params}, jx) for m in (einsums, default))
        results["cudnn_max_abs_logit_diff"] = float(jnp.abs(xla_logits - cudnn_logits).max())
        results["max_abs_logit"] = float(jnp.abs(xla_logits).max())
    if a.torch_compile:  # its forward compiled on its own (eval mode, no autograd)
        compiled_eval = torch.compile(copy.deepcopy(model))
        eval_peers.append(torch_eval_peer(COMPILED, compiled_eval, tx, bf16))
    for peer in list(eval_peers):
        why = warm_up(peer, a.warmup)
        if why is not None:
            print(f"  {peer.name} evaluation skipped: {why}", flush=True)
            eval_peers.remove(peer)
    times = interleaved(eval_peers, a.rounds, a.steps)
    results["inference"] = {p.name: summarise(times[p.name], a.batch) for p in eval_peers}

    results["load_after"] = os.getloadavg()[0]
    write_results(markdown(results), results, a.out, f"train_step_{a.model_size}_{a.dtype}")
    return results


def write_results(text: str, results: dict, out: Path | None, name: str) -> None:
    """Print the table; with `out`, also write it and the raw results to OUT/NAME.{md,json}."""
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        stem = out / name
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
        print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    backend.reexec_with_huge_pages()  # as `apj train` runs; ADAPTER_PLUS_JAX_HUGE_PAGES=0: without
    main()
