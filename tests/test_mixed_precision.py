"""bfloat16 compute: float32-accumulating products (precision.einsum_f32_acc), their gradients, the
form XLA:CPU compiles them to, and accuracy against torch's bf16 autocast."""

from __future__ import annotations

import re

import adapter_plus
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from reference import freeze_like_reference, reference_trains

from adapter_plus_jax import backend, from_timm, peft, train
from adapter_plus_jax.convert import to_adapter_plus
from adapter_plus_jax.layers import attend, fused_attention
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.params import split, trainable_mask
from adapter_plus_jax.precision import einsum_f32_acc

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


def _step(dtype):
    """A compiled Adapter+ train step of the tiny ViT, its state, frozen params and batch."""
    module = VisionTransformer(TINY, adapter=peft.AdapterSpec(dim=4), dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    y = jnp.arange(4) % 5
    params = module.init(jax.random.key(0), x)["params"]
    trainable, frozen = split(params, trainable_mask(params))
    tx = train.adamw(train.reference_lr(1e-3, 10), 1e-4)
    state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    compiled = (
        jax.jit(train.make_train_step(module, tx, jit=False))
        .lower(state, frozen, x, y)
        .compile()
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


def _default_bf16(module: VisionTransformer) -> VisionTransformer:
    """`module` in bfloat16 with the attention `create_model` takes by default here: XLA's
    einsums on CPUs, cuDNN's fused kernel on NVIDIA GPUs (so that these accuracy bounds hold
    for what users run on each)."""
    attention = backend.resolve_attention("auto", jnp.bfloat16, module.config)
    return module.clone(dtype=jnp.bfloat16, attention=attention)


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
    bf16 = _default_bf16(module)
    ours16 = np.asarray(jax.jit(bf16.apply)(variables, x))
    scale = 1 + np.abs(ref32).max()
    torch_err = np.abs(ref16 - ref32).max() / scale
    our_err = np.abs(ours16 - ref32).max() / scale
    print(f"\nViT-Ti/16, attention={bf16.attention}: logits {our_err / torch_err:.2f}x torch's "
          "bf16 error")  # fmt: skip
    assert 0 < torch_err < 0.05
    assert our_err <= 1.5 * torch_err, (our_err, torch_err)


# ViT-B width (768, 12 heads, MLP 3072) at 224x224, depth reduced to 2, with the paper's three
# methods. The reference: adapter-plus under torch's bf16 autocast; the truth: adapter-plus in
# float64. Measured (ours / torch error): logits 0.90 / 1.04 / 1.21 (Adapter+ / LoRA / VPT),
# worst gradient tensor 1.40 / 1.22 / 1.01. Hence the bounds of 1.5x (logits) and 2x (every
# gradient tensor) torch's own bf16 error. A trainable bias whose gradient is summed in
# bfloat16 costs 5.7x (block 0's adapter up-projection bias over 4 x 197 tokens).
BF16_METHODS = {
    "adapter_plus": dict(
        adapter_config=dict(
            config="post", dim=8, act_layer=True, norm_layer=False, bias=True, init="houlsby",
            scaling="channel", attn_adapter=False, dropout=0.0, drop_path=0.1,
        )
    ),
    "lora": dict(
        lora_config=dict(
            config="attention", location="qk", dim=8, act_layer=False, norm_layer=False,
            bias=False, init="houlsby", scaling=1.0, dropout=0.1, pre_dropout=True, drop_path=0.0,
        )
    ),
    "vpt": dict(prompt_config=dict(num_tokens=10, dropout=0.1)),
}  # fmt: skip


def _vit_b_width(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {k: OmegaConf.create(v) for k, v in BF16_METHODS[method].items()}
    model = adapter_plus.VisionTransformerAdapter(
        img_size=224, patch_size=16, embed_dim=768, depth=2, num_heads=12, num_classes=47,
        **kwargs,
    ).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT parameters and vectors off their trivial init
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("scaling"):
                p.copy_(1.0 + 0.5 * noise)
            elif reference_trains(name) and not name.startswith("head"):
                p.copy_(0.05 * noise)
            elif p.ndim == 1:
                p.add_(0.1 * noise)
    freeze_like_reference(model)
    return model


def _torch_logits_and_grads(model, x, labels, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    grads = {n: p.grad.double().numpy() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().double().numpy(), grads


@pytest.mark.parametrize("method", BF16_METHODS)
def test_bfloat16_peft_matches_torch_autocast(method: str) -> None:
    model = _vit_b_width(method)
    module, variables = from_timm(model)
    gen = torch.Generator().manual_seed(2)
    x, labels = torch.randn(4, 3, 224, 224, generator=gen), torch.tensor([0, 5, 10, 20])
    torch16 = _torch_logits_and_grads(model, x, labels, autocast=True)
    truth = _torch_logits_and_grads(model.double(), x.double(), labels, autocast=False)

    def loss(params):
        logits = bf16.apply({"params": params}, x_nhwc)
        return train.cross_entropy(logits, labels.numpy()), logits

    x_nhwc, bf16 = x.permute(0, 2, 3, 1).numpy(), _default_bf16(module)
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    grads = {k: v.double().numpy() for k, v in to_adapter_plus(grads).items()}
    ours16 = np.asarray(logits, np.float64), grads

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(a))))

    def errors(result) -> tuple[float, dict[str, float]]:
        """Relative RMS errors against float64 (a maximum over elements would compare two
        samples of rounding noise by their single largest draw)."""
        (logits, grads), (true_logits, true_grads) = result, truth
        floor = 1e-2 * max(rms(g) for g in true_grads.values())
        return rms(logits - true_logits) / rms(true_logits), {
            k: rms(grads[k] - g) / max(rms(g), floor) for k, g in true_grads.items()
        }

    (ours_logits, ours_grads), (torch_logits, torch_grads) = errors(ours16), errors(torch16)
    ratios = {k: ours_grads[k] / torch_grads[k] for k in torch_grads}
    worst = max(ratios, key=ratios.get)
    print(f"\n{method}, attention={bf16.attention}: logits {ours_logits / torch_logits:.2f}x "
          f"torch's bf16 error, worst gradient {ratios[worst]:.2f}x ({worst})")  # fmt: skip
    assert 0 < torch_logits < 0.05  # autocast did compute in bfloat16
    assert ours_logits <= 1.5 * torch_logits, (ours_logits, torch_logits)
    assert ratios[worst] <= 2.0, (worst, ours_grads[worst], torch_grads[worst])


def test_attend_computes_what_the_fused_attention_api_computes() -> None:
    """attention='cudnn' hands q, k, v to jax.nn.dot_product_attention as they are: the same
    layout ([batch, tokens, heads, head_dim]) and scale as our einsums, shown here on the API's
    XLA form (the cuDNN kernel itself needs a GPU: benchmarks/train_step.py compares it there)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32) for _ in range(3))
    ours = attend(q, k, v, lambda w, deterministic: w, False)
    api = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(ours, api, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [7, 8])
def test_fused_attention_pads_odd_token_counts_without_changing_the_result(tokens: int) -> None:
    """The cuDNN path pads an odd token count (197) by one masked token; run here on the API's
    XLA form: values and gradients equal the unpadded attention's."""
    rng = np.random.default_rng(1)
    qkv = [jnp.asarray(rng.standard_normal((2, tokens, 3, 8)), jnp.float32) for _ in range(3)]
    g = jnp.asarray(rng.standard_normal((2, tokens, 3, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * g)

    def ours(q, k, v):
        return attend(q, k, v, lambda w, deterministic: w, False)

    def fused(q, k, v):
        return fused_attention(q, k, v, "xla")

    np.testing.assert_allclose(fused(*qkv), ours(*qkv), rtol=1e-5, atol=1e-6)
    for a, b in zip(
        jax.grad(loss(fused), argnums=(0, 1, 2))(*qkv),
        jax.grad(loss(ours), argnums=(0, 1, 2))(*qkv),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_onednn_dots_compute_what_the_default_dots_compute() -> None:
    """The float32 forward of a small Adapter+ ViT compiled with oneDNN's dots equals XLA's
    default compilation to float32 rounding."""
    module = VisionTransformer(TINY, adapter=peft.AdapterSpec())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    forward = jax.jit(module.apply)
    onednn = jax.jit(module.apply, compiler_options=dict(backend.ONEDNN_DOTS))
    np.testing.assert_allclose(onednn(variables, x), forward(variables, x), rtol=1e-5, atol=1e-5)
