"""The optimizer pieces against torch: the per-epoch schedule and AdamW with the decay rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adapter_plus_jax import train

# ../shared/vtab1k-spec.md section 8.2 (b = 1e-3, W = 10, E = 100), as printed there.
SPEC_TABLE = {
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


def _reference_lrs(base_lr: float, epochs: int = 100, warmup: int = 10) -> list[float]:
    """The lr of each epoch as the reference's loop produces it: construct, then at the end of
    every epoch call the closed form f(epoch) (pl_bolts' `_get_closed_form_lr`)."""
    s, m = base_lr / 100, base_lr / 1000

    def f(j):
        if j < warmup:
            return s + j * (base_lr - s) / (warmup - 1)
        return m + 0.5 * (base_lr - m) * (1 + np.cos(np.pi * (j - warmup) / (epochs - warmup)))

    return [s] + [f(e) for e in range(epochs - 1)]


def test_schedule_matches_the_spec_table_and_closed_form() -> None:
    steps_per_epoch = 15
    schedule = train.reference_lr(1e-3, steps_per_epoch)
    expected = _reference_lrs(1e-3)
    for epoch in range(100):
        for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):
            assert float(schedule(step)) == pytest.approx(expected[epoch], rel=1e-5)
    for epoch, lr in SPEC_TABLE.items():
        assert float(schedule(epoch * steps_per_epoch)) == pytest.approx(lr, rel=2e-2)


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
    params = {"a": {"x": jnp.ones(2), "y": jnp.zeros(3)}, "b": jnp.ones((2, 2))}
    mask = {"a": {"x": True, "y": False}, "b": False}
    trainable, frozen = train.split(params, mask)
    assert trainable == {"a": {"x": params["a"]["x"]}}
    assert jax.tree.structure(train.merge(trainable, frozen)) == jax.tree.structure(params)
