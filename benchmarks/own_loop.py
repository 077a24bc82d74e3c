"""A user's own training loop against the step `apj train` runs: the README's loops at its speed.

Peers, on one ViT with Adapter+ r=8 (random weights: speed does not depend on them) and the
same batch of uint8 images, each a complete step per call:

- runs: the step `apj train` runs (`experiment.run_train_step`): the loaders' images in [0, 255],
  normalised inside the step;
- README, Linen: the README's loop: `apj.normalize` on the batch, then the step of
  `apj.train.make_train_step` (the backend's plan: chunks and compiler options);
- README, NNX: the README's NNX loop: `apj.nnx.make_train_step` on an `apj.nnx` model with an
  `nnx.Optimizer` over `Trainable`;
- plain jax.jit: a hand-written step under plain `jax.jit` (the whole batch at once, XLA's
  default options), as a loop written without the backend's plan would run.

Rounds are interleaved (the order reversed every round); images/s = batch / median step time,
with each peer's ratio to the runs' step. Like `apj train` and as the README tells a script of
one's own to do, the script first restarts itself with huge pages where that helps
(`apj.backend.reexec_with_huge_pages`), so every peer runs with them.

Usage:
    python benchmarks/own_loop.py --batch 8 --out DIR
    python benchmarks/own_loop.py --batch 32 --rounds 3 --steps 2 --out DIR

Writes DIR/own_loop_<size>_b<batch>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "tests"))  # train_step.py's reference, for its timing helpers
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import train_step as ts  # noqa: E402
from flax import nnx  # noqa: E402

import adapter_plus_jax as apj  # noqa: E402
from adapter_plus_jax import experiment, train  # noqa: E402
from adapter_plus_jax import params as params_lib  # noqa: E402
from adapter_plus_jax.model import VisionTransformer, ViTConfig  # noqa: E402

RUNS = "runs (`apj train`'s step)"


def linen_peers(module, params, images, labels) -> list[ts.Peer]:
    """The runs' step, the README's Linen loop and a plain `jax.jit` step."""
    tx = optax.adamw(1e-3, weight_decay=1e-4, mask=apj.decay_mask)
    cfg = module.config

    def fresh():  # each peer donates its own state
        state, frozen = train.init_state(jax.tree.map(jnp.copy, params), tx)
        return {"state": state, "frozen": frozen}

    def peer(name, step, inputs):
        held = fresh()

        def run() -> None:
            held["state"], metrics = step(held["state"], held["frozen"], inputs(), labels)
            jax.block_until_ready(metrics)

        return ts.Peer(name, run)

    raw = jnp.asarray(images, jnp.float32)
    runs = experiment.run_train_step(module, tx, 0.0, jax.random.key(1))
    readme = train.make_train_step(module, tx)

    def plain(state, frozen, x, y):  # no plan: the whole batch, XLA's defaults
        def loss_fn(trainable):
            logits = module.apply({"params": params_lib.merge(trainable, frozen)}, x, train=True,
                                  rngs={"dropout": jax.random.fold_in(jax.random.key(1),
                                                                      state.step)})  # fmt: skip
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = train.TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                               opt_state)  # fmt: skip
        return new, {"loss": loss}

    return [
        peer(RUNS, runs, lambda: raw),
        peer(
            "README, Linen (apj.train.make_train_step)",
            readme,
            lambda: apj.normalize(images, cfg.mean, cfg.std),
        ),  # fmt: skip
        peer(
            "plain jax.jit, no plan",
            jax.jit(plain, donate_argnums=0),
            lambda: apj.normalize(images, cfg.mean, cfg.std),
        ),  # fmt: skip
    ]


def nnx_peer(module, params, images, labels) -> ts.Peer:
    """The README's NNX loop."""
    model = apj.nnx.VisionTransformer(module, jax.tree.map(jnp.copy, params), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=1e-4, mask=apj.decay_mask),
                              wrt=apj.nnx.Trainable)  # fmt: skip
    step = apj.nnx.make_train_step(model, optimizer)
    cfg = module.config

    def run() -> None:
        x = apj.normalize(images, cfg.mean, cfg.std)
        jax.block_until_ready(step(model, optimizer, x, labels))

    return ts.Peer("README, NNX (apj.nnx.make_train_step)", run)


def markdown(results: dict) -> str:
    a = results["args"]
    base = results["train"][RUNS]["images_per_s"]
    lines = [
        f"# A user's own loop: ViT-{a['model_size']}/16 224, Adapter+ r=8, batch {a['batch']}, "
        f"{a['dtype']}",
        "",
        f"Device: {results['device']}; jax {results['jax']}; plan {results['plan']}; malloc huge "
        f"pages {'on' if results['huge_pages'] else 'off'}; load average "
        f"{results['load_before']:.1f} before, {results['load_after']:.1f} after. "
        f"{a['rounds']} interleaved rounds x {a['steps']} steps after {a['warmup']} warmup steps; "
        "images/s = batch / median step time (interquartile range in brackets).",
        "",
        "| Train step | images/s | vs runs |",
        "|---|---|---|",
    ]
    for name, r in results["train"].items():
        lo, hi = r["images_per_s_iqr"]
        lines.append(f"| {name} | {r['images_per_s']:.2f} [{lo:.2f}-{hi:.2f}] | "
                     f"{r['images_per_s'] / base:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ts.add_step_args(p)
    p.add_argument("--out", type=Path, default=None, help="write the .md and .json here")
    a = p.parse_args(argv)

    width, heads = ts.SIZES[a.model_size]
    config = ViTConfig(num_classes=a.classes, drop_path_rate=0.1, embed_dim=width, depth=ts.DEPTH,
                       num_heads=heads, mlp_dim=4 * width)  # fmt: skip
    module = VisionTransformer(config, adapter=apj.AdapterSpec(), dtype=jnp.dtype(a.dtype))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (a.batch, 224, 224, 3)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, a.classes, a.batch), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), images[:1].astype(jnp.float32))["params"]
    plan = apj.backend.plan(module)
    results: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "device": f"{jax.devices()[0].device_kind}, {len(os.sched_getaffinity(0))} cores "
        f"({platform.machine()})",
        "jax": jax.__version__,
        "plan": f"chunk {plan.chunk_size(a.batch)}, compiler options {plan.compiler_options}",
        "huge_pages": apj.backend.huge_pages_on(),
        "load_before": os.getloadavg()[0],
    }
    print(f"== {results['device']}; {results['plan']}", flush=True)
    peers = [*linen_peers(module, params, images, labels), nnx_peer(module, params, images, labels)]
    for peer in peers:
        why = ts.warm_up(peer, a.warmup)
        if why is not None:
            raise SystemExit(f"{peer.name}: {why}")
        print(f"  {peer.name}: compiled and warmed up in {peer.setup_s:.1f} s", flush=True)
    times = ts.interleaved(peers, a.rounds, a.steps)
    results["train"] = {p.name: ts.summarise(times[p.name], a.batch) for p in peers}
    results["load_after"] = os.getloadavg()[0]
    ts.write_results(markdown(results), results, a.out, f"own_loop_{a.model_size}_b{a.batch}")
    return results


if __name__ == "__main__":
    apj.backend.reexec_with_huge_pages()  # as the README tells a script of one's own to do
    main()
