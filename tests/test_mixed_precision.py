"""bfloat16 compute: float32-accumulating products (model.einsum_f32_acc), their gradients, the
form XLA:CPU compiles them to, accuracy against torch's bf16 autocast, and the CPU compiler
options of train.compiler_options."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from adapter_plus_jax import from_timm, peft, train
from adapter_plus_jax.model import VisionTransformer, ViTConfig, einsum_f32_acc

TINY = ViTConfig(
    img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_dim=128, num_classes=5
)


@pytest.mark.parametrize(
    ("spec", "shape_a", "shape_b"),
    [
        ("bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 6, 3, 4)),  # attention logits
        ("bhqk,bkhd->bqhd", (2, 3, 5, 6), (2, 6, 3, 4)),  # attention output
        ("mk,kn->mn", (10, 7), (7, 3)),  # dense layers
    ],
)
def test_einsum_f32_acc_equals_einsum_with_gradients(spec, shape_a, shape_b) -> None:
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape_a, shape_b))

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), (0, 1)))

    ours = loss(lambda a, b: einsum_f32_acc(spec, a, b))(a, b)
    ref = loss(lambda a, b: jnp.einsum(spec, a, b, precision="highest"))(a, b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ours, ref)


def _step(dtype, options=None):
    """A compiled Adapter+ train step of the tiny ViT, its state, frozen params and batch."""
    module = VisionTransformer(TINY, adapter=peft.AdapterSpec(dim=4), dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    y = jnp.arange(4) % 5
    params = module.init(jax.random.key(0), x)["params"]
    trainable, frozen = train.split(params, peft.trainable_mask(params))
    tx = train.adamw(train.reference_lr(1e-3, 10), 1e-4)
    state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    compiled = (
        jax.jit(train.make_train_step(module, tx))
        .lower(state, frozen, x, y)
        .compile(compiler_options=options)
    )
    return compiled, (state, frozen, x, y)


def _dot_types(hlo: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every dot in compiled HLO text."""
    types, dots = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
        if not m:
            continue
        types[m.group(1)] = m.group(2)
        operands = re.match(r".* dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if operands:
            dots.append((types[operands.group(1)], types[operands.group(2)], m.group(2)))
    return dots


def test_bfloat16_dots_accumulate_in_float32_and_run() -> None:
    compiled, args = _step(jnp.bfloat16)
    dots = _dot_types(compiled.as_text())
    # The blocks' 6 products (qkv, q@k, a@v, proj, fc1, fc2) forward, and their input gradients
    # in every block but the first (no trainable parameter before its adapter), in bfloat16 with
    # a float32 result; XLA:CPU upcasts bf16 dots with a bf16 result to float32 x float32.
    assert dots.count(("bf16", "bf16", "f32")) >= (2 * TINY.depth - 1) * 6, dots
    assert not any(result == "bf16" for *_, result in dots)
    # Running it is the test too: XLA:CPU rejects bf16 x bf16 -> f32 dots off its fast path.
    _, metrics = compiled(*args)
    assert np.isfinite(float(metrics["loss"]))


def test_bfloat16_gradients_follow_float32() -> None:
    (c32, a32), (c16, a16) = _step(jnp.float32), _step(jnp.bfloat16)
    s32, m32 = c32(*a32)
    s16, m16 = c16(*a16)
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    # One AdamW step moves every parameter by about lr * sign(grad): compare the directions.
    start = a32[0].params
    for p32, p16, p0 in zip(
        jax.tree.leaves(s32.params),
        jax.tree.leaves(s16.params),
        jax.tree.leaves(start),
        strict=True,
    ):
        d32, d16 = np.ravel(p32 - p0), np.ravel(p16 - p0)
        cos = d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16) + 1e-30)
        assert cos > 0.9, cos


def test_bfloat16_as_accurate_as_torch_autocast() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    module, variables = from_timm(model)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        ref32 = model(tx).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = model(tx).float().numpy()
    ours16 = np.asarray(jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x))
    scale = 1 + np.abs(ref32).max()
    torch_err = np.abs(ref16 - ref32).max() / scale
    our_err = np.abs(ours16 - ref32).max() / scale
    assert 0 < torch_err < 0.05
    assert our_err <= 1.5 * torch_err, (our_err, torch_err)


def test_cpu_compiler_options_change_speed_not_results() -> None:
    assert jax.default_backend() == "cpu"
    options = train.compiler_options(jnp.float32)
    assert options == train.CPU_FLOAT32_OPTIONS
    assert train.compiler_options(jnp.bfloat16) is None
    (plain, args), (tuned, _) = _step(jnp.float32), _step(jnp.float32, options)
    assert "ynn" in plain.as_text()  # the options are applied: fewer YNNPACK fusions
    assert tuned.as_text().count("__ynn_fusion") < plain.as_text().count("__ynn_fusion")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        plain(*args),
        tuned(*args),
    )
