"""The optimizer pieces against torch: the per-epoch schedule and AdamW with the decay rule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import reference_epoch_lrs

from adapter_plus_jax import backend, train
from adapter_plus_jax import params as params_lib
from adapter_plus_jax.images import normalize

# The recipe's table of per-epoch learning rates (b = 1e-3, W = 10, E = 100), as printed there.
RECIPE_TABLE = {
    0: 1e-5,
    1: 1e-5,
    2: 1.2e-4,
    3: 2.3e-4,
    9: 8.9e-4,
    10: 1e-3,
    11: 1e-3,
    12: 9.997e-4,
    50: 6.04e-4,
    98: 3.7e-6,
    99: 2.2e-6,
}


@pytest.mark.parametrize(
    ("base_lr", "warmup", "epochs", "start_factor", "min_factor", "steps_per_epoch"),
    [
        (1e-3, 10, 100, 100.0, 1000.0, 15),  # the paper's runs
        (1e-2, 3, 40, 100.0, 1000.0, 20),  # configs/demo.py
        (1e-2, 3, 6, 10.0, 100.0, 3),  # test_train_parity.py
        (1e-4, 2, 7, 100.0, 1000.0, 1),
    ],
)
def test_schedule_matches_lightning_bolts(
    base_lr, warmup, epochs, start_factor, min_factor, steps_per_epoch
) -> None:
    """Every step of every epoch runs at the lr that lightning-bolts' scheduler, stepped once
    per epoch as the reference does, gives that epoch."""
    expected = reference_epoch_lrs(base_lr, warmup, epochs, start_factor, min_factor)
    schedule = train.reference_lr(
        base_lr, steps_per_epoch, warmup, epochs, start_factor=start_factor, min_factor=min_factor
    )
    steps = np.arange(epochs * steps_per_epoch)
    got = np.asarray(jax.vmap(schedule)(steps))
    # float32 rounding of the cosine: measured up to 6e-6 relative, late in the schedule.
    np.testing.assert_allclose(got, np.repeat(expected, steps_per_epoch), rtol=2e-5)


def test_schedule_matches_the_recipe_table() -> None:
    schedule = train.reference_lr(1e-3, 15)
    for epoch, lr in RECIPE_TABLE.items():
        for step in (epoch * 15, epoch * 15 + 14):
            assert float(schedule(step)) == pytest.approx(lr, rel=2e-2), epoch


def test_decay_mask_follows_the_reference_rule() -> None:
    params = {
        "pos_embed": jnp.zeros((1, 5, 4)),
        "cls_token": jnp.zeros((1, 1, 4)),
        "head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
        "blocks_0": {
            "adapter": {
                "down": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
                "scaling": jnp.zeros(4),
            },
            "prompt": jnp.zeros((3, 4)),
            "norm1": {"scale": jnp.zeros(4)},
        },
    }
    mask = train.decay_mask(params)
    assert mask["head"] == {"kernel": True, "bias": False}
    assert mask["blocks_0"]["adapter"] == {
        "down": {"kernel": True, "bias": False},
        "scaling": False,
    }
    assert mask["blocks_0"]["prompt"] is True  # VPT prompts are decayed in the reference
    assert (
        not mask["pos_embed"] and not mask["cls_token"] and not mask["blocks_0"]["norm1"]["scale"]
    )


def test_adamw_matches_torch_adamw() -> None:
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    grads = [
        (rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))
        for _ in range(30)
    ]
    lr_at = train.reference_lr(1e-2, steps_per_epoch=3, warmup_epochs=2, epochs=10)

    tw, tb = torch.nn.Parameter(torch.tensor(w0.T)), torch.nn.Parameter(torch.tensor(b0))
    opt = torch.optim.AdamW(
        [{"params": [tw], "weight_decay": 1e-1}, {"params": [tb], "weight_decay": 0.0}], lr=1.0
    )
    params = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}
    tx = train.adamw(lr_at, weight_decay=1e-1)
    state = tx.init(params)
    for step, (gw, gb) in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = float(lr_at(step))
        tw.grad, tb.grad = torch.tensor(gw.T), torch.tensor(gb)
        opt.step()
        updates, state = tx.update({"kernel": gw, "bias": gb}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(params["kernel"], tw.detach().numpy().T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["bias"], tb.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_split_and_merge_round_trip() -> None:
    params = {"a": {"x": jnp.arange(2.0), "y": jnp.arange(3.0) + 10}, "b": jnp.ones((2, 2)) * 7}
    mask = {"a": {"x": True, "y": False}, "b": False}
    trainable, frozen = params_lib.split(params, mask)
    assert jax.tree.structure(trainable) == jax.tree.structure({"a": {"x": 0}})
    assert jax.tree.structure(frozen) == jax.tree.structure({"a": {"y": 0}, "b": 0})
    np.testing.assert_array_equal(trainable["a"]["x"], [0.0, 1.0])
    np.testing.assert_array_equal(frozen["a"]["y"], [10.0, 11.0, 12.0])
    np.testing.assert_array_equal(frozen["b"], np.full((2, 2), 7.0))
    # A changed trainable leaf comes back at its place, next to the untouched frozen ones.
    merged = params_lib.merge({"a": {"x": jnp.asarray([5.0, 6.0])}}, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_array_equal(merged["a"]["x"], [5.0, 6.0])
    np.testing.assert_array_equal(merged["a"]["y"], params["a"]["y"])
    np.testing.assert_array_equal(merged["b"], params["b"])


def test_label_smoothing_and_mask_match_torch() -> None:
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 5)).astype(np.float32), rng.integers(0, 5, 6)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=0.1
    )
    got = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=0.1)
    assert float(got) == pytest.approx(expected.item(), rel=1e-6)
    # Padding rows (mask False) do not count: the loss of the first 4 rows alone.
    mask = jnp.asarray([True] * 4 + [False] * 2)
    first4 = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:4]), torch.from_numpy(labels[:4])
    )
    masked = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask=mask)
    assert float(masked) == pytest.approx(first4.item(), rel=1e-6)


def test_remat_changes_memory_not_gradients() -> None:
    from adapter_plus_jax import peft
    from adapter_plus_jax.model import VisionTransformer, ViTConfig

    cfg = ViTConfig(
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        num_classes=3,
        drop_path_rate=0.2,
    )
    module = VisionTransformer(
        cfg, adapter=peft.AdapterSpec(dim=4, scaling="channel", drop_path=0.1)
    )
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    params = module.init(jax.random.key(0), x)["params"]

    def grads(m):
        def loss(p):
            out = m.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
            return train.cross_entropy(out, jnp.arange(4) % 3)

        return jax.jit(jax.grad(loss))(params)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads(module),
        grads(module.clone(remat=True)),
    )


@pytest.mark.parametrize("n, chunk", [(6, 2), (7, 2), (7, 4), (3, 4)])
def test_chunked_evaluation_matches_the_batched_forward(n: int, chunk: int) -> None:
    """The eval step in chunks (in sequence, a smaller last chunk for the remainder, or one
    batch when it has at most one full chunk) computes the batched logits, in order."""
    from adapter_plus_jax.model import VisionTransformer, ViTConfig
    from adapter_plus_jax.peft import AdapterSpec

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       mlp_dim=64, num_classes=5)  # fmt: skip
    module = VisionTransformer(config, adapter=AdapterSpec(dim=4))
    x = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
    params = module.init(jax.random.key(0), x)["params"]

    def apply(p, images):
        return module.apply({"params": p}, images)

    fast = backend.map_chunks(apply, chunk)
    assert backend.map_chunks(apply, None) is apply
    lowered = jax.jit(fast).lower(params, x).as_text()
    assert ("while" in lowered) == (n >= 2 * chunk)  # chunks run in a loop, not unrolled
    np.testing.assert_allclose(jax.jit(fast)(params, x), jax.jit(apply)(params, x), atol=1e-5,
                               rtol=0)  # fmt: skip
    labels = jnp.argmax(apply(params, x), -1)
    step = train.make_eval_step(module, plan=backend.Plan(chunk))
    correct, count = step(params, x, labels, jnp.ones(n, bool))
    assert (int(correct), int(count)) == (n, n)
    # Images in [0, 255] normalised inside the step (runner.py's loaders) count the same.
    raw = (x * 0.5 + 0.5) * 255.0  # normalize(raw, 0.5, 0.5) == x up to rounding
    step = train.make_eval_step(module, input_fn=lambda v: normalize(v, (0.5,) * 3, (0.5,) * 3),
                                plan=backend.Plan(chunk))  # fmt: skip
    correct, count = step(params, raw, labels, jnp.ones(n, bool))
    assert (int(correct), int(count)) == (n, n)


def _dropout_model():
    """A small ViT whose training forward draws dropout (projections, Adapter+'s) and drop-path
    masks at high rates, so that masks drawn differently change the gradients a lot."""
    from adapter_plus_jax.model import VisionTransformer, ViTConfig
    from adapter_plus_jax.peft import AdapterSpec

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       mlp_dim=64, num_classes=5, proj_drop_rate=0.3,
                       drop_path_rate=0.5)  # fmt: skip
    return VisionTransformer(config, adapter=AdapterSpec(dim=4, dropout=0.3, drop_path=0.5))


@pytest.mark.parametrize("n, chunk", [(6, 2), (7, 2), (7, 3)])
def test_chunked_train_step_matches_the_batched_step(n: int, chunk: int) -> None:
    """The train step in chunks (in sequence under a loop, gradients summed, a smaller last
    chunk for the remainder) computes the batched step's loss, accuracy and gradients, with the
    same dropout and drop-path masks (each example's come from its place in the batch), and a
    padded example counts in neither."""
    import optax

    from adapter_plus_jax.params import trainable_mask

    module = _dropout_model()
    x = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
    labels = jnp.arange(n) % 5
    mask = jnp.arange(n) < n - 1  # the last example is padding
    params = module.init(jax.random.key(0), x)["params"]
    trainable, frozen = params_lib.split(params, trainable_mask(params))
    tx = optax.sgd(1.0)  # new params = params - gradients
    state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))

    def run(size, images):
        step = jax.jit(train.make_train_step(module, tx, 0.1, plan=backend.Plan(size), jit=False))
        args = (state, frozen, images, labels, mask)
        return step(*args), step.lower(*args).as_text()

    (batched, metrics), text = run(None, x)
    (chunked, chunked_metrics), chunked_text = run(chunk, x)
    # The full chunks run in one more loop, not unrolled (random bits are drawn in loops too;
    # a remainder chunk has its own copy of them): unrolled, every chunk would have its own.
    loops = text.count("stablehlo.while")
    assert loops + 1 <= chunked_text.count("stablehlo.while") <= 2 * loops + 1
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(chunked_metrics[key], metrics[key], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 chunked.params, batched.params)  # fmt: skip
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), batched.params, trainable)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the gradients compared are not all zero
    (padded, _), _ = run(chunk, x.at[-1].set(100.0))  # padding changed: nothing else moves
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 padded.params, chunked.params)  # fmt: skip
    # Images in [0, 255] normalised inside the step (runner.py's loaders) train the same.
    norm = functools.partial(normalize, mean=(0.5,) * 3, std=(0.5,) * 3)
    step = train.make_train_step(module, tx, 0.1, input_fn=norm, plan=backend.Plan(chunk),
                                 jit=False)  # fmt: skip
    from_raw, _ = jax.jit(step)(state, frozen, (x * 0.5 + 0.5) * 255.0, labels, mask)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                 from_raw.params, chunked.params)  # fmt: skip


def test_examples_draw_their_own_masks() -> None:
    """`example_keys`: example i of a step draws its masks from fold_in(key, i), in a batch or
    a chunk that starts anywhere; two examples never share a mask."""
    module = _dropout_model()
    x = jnp.ones((6, 32, 32, 3))  # identical images: only the masks tell them apart
    params = module.init(jax.random.key(0), x)["params"]
    key = jax.random.key(3)

    @functools.partial(jax.jit, static_argnums=1)  # eager, the per-example masks cost ~25 s
    def logits(start, n):
        rngs = {"dropout": train.example_keys(key, start, n)}
        return module.apply({"params": params}, x[:n], train=True, rngs=rngs)

    whole = logits(0, 6)  # the same masks give the same logits, to float32 rounding
    np.testing.assert_allclose(jnp.concatenate([logits(0, 2), logits(2, 4)]), whole, atol=1e-6)
    assert len({tuple(np.round(np.asarray(row), 5)) for row in whole}) == 6
    np.testing.assert_allclose(logits(4, 1)[0], whole[4], atol=1e-6)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_example_keys_do_not_depend_on_the_batch(impl: str) -> None:
    """Example i's bits are the same in a batch of 6 and in a chunk from example 2, jitted or
    not, whatever the step key's PRNG implementation (rbg's draws depend on batching)."""
    key = jax.random.key(3, impl=impl)
    whole = np.asarray(jax.random.bits(train.example_keys(key, 0, 6), (6, 3)))
    chunk = jax.jit(lambda k, s: jax.random.bits(train.example_keys(k, s, 4), (4, 3)))(key, 2)
    np.testing.assert_array_equal(chunk, whole[2:])
    assert len({tuple(row) for row in whole}) == 6


def test_cpu_chunks_are_sized_by_activation_bytes() -> None:
    """On this CPU in float32: 8 ViT-B/16 images per chunk (their token activations), fewer for
    wider models, none for the demo's tiny model; 16-bit compute is never split."""
    from adapter_plus_jax.model import VisionTransformer, ViTConfig

    base = ViTConfig()  # ViT-B/16 at 224: 197 tokens x 768
    large = ViTConfig(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)
    demo = ViTConfig(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=2,
                     mlp_dim=512, class_token=False, global_pool="avg")  # fmt: skip
    assert backend.image_bytes(base) == 197 * 768 * 4

    def plan(config, dtype=jnp.float32):
        return backend.plan(VisionTransformer(config, dtype=dtype))

    assert plan(base).chunk_size(32) == 8 and plan(base).chunk_size(8) is None
    assert plan(large).chunk_size(32) == 6
    assert plan(demo).chunk_size(50) is None
    assert plan(base, jnp.bfloat16) == backend.Plan(None, None)
