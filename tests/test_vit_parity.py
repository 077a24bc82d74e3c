"""Parity of the Flax ViT with timm's VisionTransformer: random weights, float32, eval mode.

timm runs in float64 on the same (float32) weights, so that the error is our float32 rounding
alone. Tolerance: max |jax - timm| <= 4e-6 * max |timm|, for logits and for the pre-logit
features. Measured worst case: 1.2e-6 (dinov2_registers), a 3.3x margin. The input images are
N(0, 0.25^2): with the residual stream's variance nearer to LayerNorm's eps, the planted bugs of
tests/mutants.py cost at least 2.5e-5 in every case they touch (LayerNorm eps 10x too large in
the blocks, least in clip_quickgelu; tanh-GELU for erf-GELU 4.2e-5, in no_pool_all_tokens). At
unit-scale inputs the eps bug cost only 3.6e-6 in no_class_token_avg.
"""

from __future__ import annotations

import adapter_plus
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import linen as nn
from omegaconf import OmegaConf
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from adapter_plus_jax import AdapterSpec, ConversionError, from_timm
from adapter_plus_jax.config import spec_config
from adapter_plus_jax.layers import DropPath

# (id, timm name, create_model kwargs): together they cover every option of ViTConfig.
MATRIX = [
    ("tiny", "vit_tiny_patch16_224", {}),
    ("small_p32", "vit_small_patch32_224", {}),
    ("deit3_layerscale_no_embed_class", "deit3_small_patch16_224", {}),
    ("clip_pre_norm", "vit_base_patch32_clip_224", {}),
    ("clip_quickgelu", "vit_base_patch32_clip_quickgelu_224", {}),
    ("dinov2_registers", "vit_small_patch14_reg4_dinov2", {"img_size": 126}),
    ("gap_fc_norm", "vit_medium_patch16_gap_256", {}),
    ("siglip_map_pool", "vit_base_patch16_siglip_224", {"depth": 4}),
    ("no_class_token_avg", "vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    ("qk_norm_avgmax", "vit_tiny_patch16_224", {"qk_norm": True, "global_pool": "avgmax"}),
    ("max_pool_no_qkv_bias", "vit_tiny_patch16_224", {"global_pool": "max", "qkv_bias": False}),
    ("no_pool_all_tokens", "vit_tiny_patch16_224", {"global_pool": "", "depth": 2}),
    ("other_img_size", "vit_tiny_patch16_224", {"img_size": 160}),
    (
        "rect_img_tanh_gelu",
        "vit_tiny_patch16_224",
        {"img_size": (96, 64), "act_layer": "gelu_tanh"},
    ),
]


def _randomize_vectors(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb LayerNorm/LayerScale/bias vectors so that none sits at its trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


TOL = 4e-6


def _compare(model: torch.nn.Module, module, variables, batch: int = 2) -> tuple[float, float]:
    """Relative errors max |jax - timm| / max |timm| of logits and pre-logit features, timm in
    float64 (the model is converted to float64 and back)."""
    h, w = module.config.img_size
    x = 0.25 * torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.double()
        ref_logits = model(x.double()).numpy()
        feats64 = model.forward_features(x.double())
        ref_feats = model.forward_head(feats64, pre_logits=True).numpy()
        model.float()
    x_nhwc = x.permute(0, 2, 3, 1).numpy()
    logits = np.asarray(module.apply(variables, x_nhwc))
    feats = np.asarray(module.apply(variables, x_nhwc, pre_logits=True))
    assert logits.shape == ref_logits.shape and feats.shape == ref_feats.shape

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    return rel(logits, ref_logits), rel(feats, ref_feats)


@pytest.mark.parametrize(("name", "kwargs"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_matches_timm(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    _randomize_vectors(model)
    module, variables = from_timm(model)
    err_logits, err_feats = _compare(model, module, variables)
    print(f"\n{name} {kwargs}: logits {err_logits:.1e}, features {err_feats:.1e}")
    assert err_logits <= TOL, err_logits
    assert err_feats <= TOL, err_feats


def test_res_post_block_model() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=64,
        patch_size=16,
        embed_dim=96,
        depth=3,
        num_heads=3,
        num_classes=7,
        block_fn=ResPostBlock,
        init_values=0.5,
    ).eval()
    _randomize_vectors(model)
    module, variables = from_timm(model)
    assert module.config.block == "res_post"
    assert max(_compare(model, module, variables)) <= TOL


def test_headless_backbone_with_new_head() -> None:
    """The shape of the paper's backbone (orig_in21k: num_classes=0), then a new 47-class head."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    _randomize_vectors(model)
    module, variables = from_timm(model)
    assert module.config.num_classes == 0 and "head" not in variables["params"]
    assert max(_compare(model, module, variables, batch=1)) <= TOL

    model.reset_classifier(47)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    torch.nn.init.normal_(model.head.bias, std=0.02)
    module = module.clone(config=module.config.replace(num_classes=47))
    head = {
        "kernel": model.head.weight.detach().numpy().T,
        "bias": model.head.bias.detach().numpy(),
    }
    variables = {"params": {**variables["params"], "head": head}}
    assert max(_compare(model, module, variables, batch=1)) <= TOL


def test_parameter_count_matches_timm() -> None:
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=70)
    _, variables = from_timm(model)
    n_jax = sum(x.size for x in jax.tree.leaves(variables))
    assert n_jax == sum(p.numel() for p in model.parameters())


def _tiny(**kwargs) -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5, **kwargs
    )


def test_stochastic_depth_and_dropout_only_in_training() -> None:
    module, variables = from_timm(_tiny(drop_path_rate=0.5, drop_rate=0.3, proj_drop_rate=0.1))
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    eval_out = module.apply(variables, x)
    np.testing.assert_array_equal(eval_out, module.apply(variables, x, train=False))

    def train(seed: int):
        return module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(train(1), train(1))  # reproducible from the rng
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), eval_out)
    with pytest.raises(Exception, match="dropout"):
        module.apply(variables, x, train=True)  # no rng given


def _drop_path_rates(module, variables, images) -> dict[str, float]:
    """The rate of every DropPath our model runs in training mode, by module path."""
    rates = {}

    def spy(call, args, kwargs, context):
        if isinstance(context.module, DropPath) and context.method_name == "__call__":
            rates["/".join(context.module.path)] = context.module.rate
        return call(*args, **kwargs)

    with nn.intercept_methods(spy):
        module.apply(variables, images, train=True, rngs={"dropout": jax.random.key(0)})
    return rates


def test_stochastic_depth_is_linear_over_depth() -> None:
    """Our per-block drop-path rates equal timm's (rising linearly to drop_path_rate over the
    depth), and the adapters' drop path is the same constant in every block, as in adapter-plus.
    """
    adapter = OmegaConf.create(spec_config(AdapterSpec(dim=4, drop_path=0.1)).to_dict())
    model = adapter_plus.VisionTransformerAdapter(
        img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=5,
        drop_path_rate=0.2, adapter_config=adapter,
    )  # fmt: skip
    module, variables = from_timm(model)
    rates = _drop_path_rates(module, variables, np.zeros((2, 32, 32, 3), np.float32))

    def torch_rate(m: torch.nn.Module) -> float:
        return getattr(m, "drop_prob", 0.0)  # timm uses Identity for a zero rate

    expected = {}
    for i, block in enumerate(model.blocks):
        expected[f"blocks_{i}/DropPath_0"] = torch_rate(block.drop_path1)
        expected[f"blocks_{i}/DropPath_1"] = torch_rate(block.drop_path2)
        expected[f"blocks_{i}/adapter/DropPath_0"] = torch_rate(block.adapter.drop_path_a)
    assert rates.keys() == expected.keys()
    np.testing.assert_allclose([rates[k] for k in expected], list(expected.values()), atol=1e-7)
    np.testing.assert_allclose(
        [rates[f"blocks_{i}/DropPath_0"] for i in range(6)], np.linspace(0, 0.2, 6), atol=1e-7
    )


def test_bfloat16_compute_keeps_float32_params() -> None:
    torch.manual_seed(0)
    model = _tiny().eval()
    module, variables = from_timm(model)
    bf16 = module.clone(dtype=jnp.bfloat16)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    out32 = np.asarray(module.apply(variables, x))
    out16 = np.asarray(bf16.apply(variables, x))
    assert out16.dtype == np.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    # bfloat16 has an 8-bit mantissa: agreement to a few percent of the logit scale.
    assert np.abs(out16 - out32).max() <= 0.05 * (1 + np.abs(out32).max())


def test_wrong_input_shape_is_a_clear_error() -> None:
    module, variables = from_timm(_tiny())
    with pytest.raises(ValueError, match=r"Expected images of shape \[batch, 32, 32, 3\]"):
        module.apply(variables, np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("eva02_tiny_patch14_224", {}, "Eva"),
        ("vit_small_r26_s32_224", {}, "HybridEmbed"),
        ("vit_relpos_small_patch16_224", {}, "VisionTransformerRelPos"),
        ("vit_small_patch16_18x2_224", {}, "ParallelThingsBlock"),
        ("vit_tiny_patch16_224", {"dynamic_img_size": True}, "dynamic_img_size"),
    ],
)
def test_unsupported_architectures_name_the_part(name: str, kwargs: dict, match: str) -> None:
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(ConversionError, match=match):
        from_timm(model)


def test_converted_parameters_do_not_follow_later_torch_updates() -> None:
    """JAX may alias numpy buffers on CPU; an in-place torch update must not leak through."""
    model = _tiny()
    _, variables = from_timm(model)
    before = np.array(variables["params"]["head"]["bias"])
    with torch.no_grad():
        model.head.bias.add_(1.0)
    np.testing.assert_array_equal(variables["params"]["head"]["bias"], before)
