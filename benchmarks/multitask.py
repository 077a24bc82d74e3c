"""Serving many tasks on one backbone: a mixed batch through `serving.TaskSet` (one jitted
forward, each example with its own task's adapters and head) against running each task's
examples through its own jitted model, one task after another.

The tasks are Adapter+ tasks on one ViT (random weights: speed does not depend on them) with
the ranks and class counts of VTAB-1k-like tasks (ranks cycling 1..32, 2..397 classes); with
`--method NAME`, tasks of that method (`peft.METHODS`) at its default settings, which share a
forward when their shapes agree (BitFit's biases, DoRA's layers: see serving.py). Each
batch holds `--batch` images whose task ids are drawn uniformly from the N tasks (seeded, the
same batch every round). Both sides include their host work (TaskSet: grouping and padding;
sequential: slicing per task). Rounds alternate the order of the two.

Usage:
    python benchmarks/multitask.py --size base --batch 32 --tasks 1,4,19 --out DIR
    python benchmarks/multitask.py --method dora --size small --batch 16 --tasks 1,4

Prints a table (images/s and the ratio mixed / sequential per N) and writes DIR/multitask.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter_plus_jax import backend  # noqa: E402
from adapter_plus_jax.images import normalize  # noqa: E402
from adapter_plus_jax.model import VisionTransformer, ViTConfig  # noqa: E402
from adapter_plus_jax.params import TRAINABLE_GROUPS, param_group  # noqa: E402
from adapter_plus_jax.peft import METHODS  # noqa: E402
from adapter_plus_jax.serving import TaskSet  # noqa: E402
from adapter_plus_jax.task import BackboneRecord, Task, backbone_digest, backbone_params  # noqa: E402

SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
}
RANKS = (1, 2, 4, 8, 16, 32)
# The class counts of the 19 VTAB-1k tasks.
CLASSES = (100, 102, 47, 102, 37, 397, 10, 2, 10, 45, 5, 6, 8, 16, 16, 18, 4, 8, 4)


def make_tasks(size: str, n: int, method: str = "adapter_plus") -> tuple[list[Task], dict]:
    config = ViTConfig(**SIZES[size])
    images = np.zeros((1, 224, 224, 3), np.float32)
    backbone = jax.jit(VisionTransformer(config.replace(num_classes=0)).init)(
        jax.random.key(0), images
    )["params"]
    record = BackboneRecord("random", backbone_digest(backbone))
    tasks, m = [], METHODS[method]
    groups = {*TRAINABLE_GROUPS[m.train_mode], "fixed"}  # what a task of the method owns
    for i in range(n):
        cfg = config.replace(num_classes=CLASSES[i % len(CLASSES)])
        spec = m.sized(RANKS[i % len(RANKS)]) if method == "adapter_plus" else m
        module = VisionTransformer(cfg, spec.adapter, spec.lora, spec.prompt, tune=spec.tune)
        params = jax.jit(module.init)(jax.random.key(i + 1), images)["params"]
        own = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()
               if param_group("/".join(k)) in groups}  # fmt: skip
        tasks.append(Task(f"task{i}", cfg, traverse_util.unflatten_dict(own),
                          tuple(map(str, range(cfg.num_classes))), {"kind": "resize",
                          "size": [224, 224]}, record, module.adapter, module.lora,
                          module.prompt, tune=module.tune))  # fmt: skip
    return tasks, backbone_params(backbone)


def sequential_peer(tasks: list[Task], backbone: dict):
    """Each task's examples through its own jitted model, one task after another, in the form
    and with the compiler options TaskSet uses (`backend.plan`)."""
    models = []
    for task in tasks:
        module, variables = task.model(backbone)
        cfg, plan = module.config, backend.plan(module)
        own = backend.map_chunks(lambda p, x, m=module: m.apply({"params": p}, x), plan.chunk)
        fn = plan.jit(lambda p, x, c=cfg, f=own: f(p, normalize(x, c.mean, c.std)))
        models.append((fn, variables["params"]))

    def run(images: np.ndarray, ids: np.ndarray) -> list:
        out = [None] * len(ids)
        for t, (fn, variables) in enumerate(models):
            rows = np.flatnonzero(ids == t)
            if rows.size:
                for row, logits in zip(rows, np.asarray(fn(variables, images[rows])), strict=True):
                    out[row] = logits
        return out

    return run


def measure(size: str, n: int, batch: int, rounds: int, method: str = "adapter_plus") -> dict:
    tasks, backbone = make_tasks(size, n, method)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, n, batch)
    images = rng.uniform(0, 255, (batch, 224, 224, 3)).astype(np.float32)
    serving = TaskSet(tasks, backbone, batch_size=batch)
    peers = {"mixed": lambda: serving.logits(images, ids),
             "sequential": (lambda run: lambda: run(images, ids))(sequential_peer(tasks, backbone))}
    # Warm up (compiles) and check that both give the same logits.
    mixed, seq = peers["mixed"](), peers["sequential"]()
    error = max(float(np.abs(a - b).max()) for a, b in zip(mixed, seq, strict=True))
    times = {name: [] for name in peers}
    for r in range(rounds):
        for name in (list(peers) if r % 2 == 0 else list(peers)[::-1]):
            start = time.perf_counter()
            peers[name]()
            times[name].append(time.perf_counter() - start)
    result = {name: batch / statistics.median(t) for name, t in times.items()}
    return {"method": method, "tasks": n, "groups": len(serving.groups), "batch": batch,
            "examples_per_task": batch / n,
            "mixed_images_per_s": result["mixed"],
            "sequential_images_per_s": result["sequential"],
            "ratio": result["mixed"] / result["sequential"], "max_logit_diff": error}  # fmt: skip


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"ViT-{args.size[0].upper()}/16 {args.method} tasks, {jax.devices()[0].device_kind} "
             f"({jax.default_backend()}, {platform.processor() or platform.machine()}), batch "
             f"{args.batch}, median of {args.rounds} rounds", "",
             "| tasks | examples/task | mixed img/s | sequential img/s | mixed / sequential | "
             "max logit diff |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['tasks']} | {r['examples_per_task']:.1f} | "
                     f"{r['mixed_images_per_s']:.2f} | {r['sequential_images_per_s']:.2f} | "
                     f"{r['ratio']:.2f}x | {r['max_logit_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", default="1,4,19", help="comma-separated numbers of tasks")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--method", choices=sorted(METHODS), default="adapter_plus")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.tasks.split(",")):
        rows.append(measure(args.size, n, args.batch, args.rounds, args.method))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, args)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "multitask.md").write_text(table)
        (args.out / "multitask.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
