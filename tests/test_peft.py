"""Unit tests of peft.py: drop path statistics, trainable masks, config validation, merge_lora.

Parity with the reference package is in test_peft_parity.py.
"""

from __future__ import annotations

import math

import adapter_plus
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import FrozenDict, freeze
from omegaconf import OmegaConf

from adapter_plus_jax import peft
from adapter_plus_jax.config import spec_config
from adapter_plus_jax.convert import ConversionError, abstract_params, from_timm
from adapter_plus_jax.layers import DropPath
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.params import merge_lora, trainable_count, trainable_mask
from adapter_plus_jax.peft import Adapter, AdapterSpec, LoRASpec, PromptSpec


def adapter_config(**overrides) -> dict:
    """Adapter+ as a config with the reference's field names, with `overrides`."""
    return {**spec_config(AdapterSpec()).to_dict(), **overrides}


def lora_config(**overrides) -> dict:
    return {"config": "attention", **spec_config(LoRASpec()).to_dict(), **overrides}


def prompt_config(**overrides) -> dict:
    return {**spec_config(PromptSpec()).to_dict(), **overrides}


TINY = ViTConfig(
    img_size=(32, 32), patch_size=(8, 8), embed_dim=64, depth=2, num_heads=4, mlp_dim=128,
    num_classes=5,
)  # fmt: skip


def _true_paths(mask) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {"/".join(k.key for k in path) for path, on in flat if on}


def _all_paths(tree) -> set[str]:
    return {
        "/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _random_like(shapes, seed: int = 0) -> dict:
    """Random, non-zero values for every parameter of an abstract tree (numpy draws: cheaper
    than an eager init)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape_dtype):
        name, shape = path[-1].key, shape_dtype.shape
        noise = rng.normal(size=shape).astype(np.float32)
        if name in ("scale", "scaling"):
            return 1.0 + 0.3 * noise
        if len(shape) == 1:
            return 0.3 * noise
        return noise / np.float32(np.sqrt(np.prod(shape[:-1])))  # unit-variance outputs

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ----------------------------------------------------------------------------------------------
# Drop path.

N_SAMPLES = 20_000


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_path_statistics(rate: float) -> None:
    """Whole samples are dropped with probability `rate`; kept ones are scaled by 1/keep, so the
    mean is preserved. Bounds: 5 binomial standard deviations (a false alarm ~ 6e-7)."""
    keep = 1.0 - rate
    x = jnp.ones((N_SAMPLES, 3, 4))
    y = np.asarray(DropPath(rate).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
    per_sample = y.reshape(N_SAMPLES, -1)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1.0 / keep], rtol=1e-6)

    std_fraction = math.sqrt(rate * keep / N_SAMPLES)  # binomial std of the dropped fraction
    dropped = float((per_sample[:, 0] == 0).mean())
    assert abs(dropped - rate) <= 5 * std_fraction, dropped
    # mean = kept fraction / keep, so its std is std_fraction / keep
    assert abs(float(y.mean()) - 1.0) <= 5 * std_fraction / keep, y.mean()


def test_drop_path_is_identity_in_eval_and_at_rate_zero() -> None:
    x = jax.random.normal(jax.random.key(0), (8, 5, 4))
    rngs = {"dropout": jax.random.key(1)}
    np.testing.assert_array_equal(DropPath(0.5).apply({}, x, train=False), x)
    np.testing.assert_array_equal(DropPath(0.0).apply({}, x, train=True, rngs=rngs), x)


def test_adapter_drop_path_drops_the_branch_not_the_skip() -> None:
    spec = AdapterSpec(dim=4, drop_path=0.5, scaling="channel")
    adapter = Adapter(spec)
    x = jax.random.normal(jax.random.key(0), (64, 5, 16))
    skip = jax.random.normal(jax.random.key(1), x.shape)
    variables = _random_like(jax.eval_shape(adapter.init, jax.random.key(2), x, skip))
    branch = adapter.apply(variables, x)  # eval: the full branch, no skip
    y = adapter.apply(variables, x, skip, train=True, rngs={"dropout": jax.random.key(3)})
    dropped = np.isclose(y, skip, atol=1e-7).all(axis=(1, 2))
    kept = np.isclose(y, skip + 2.0 * branch, atol=1e-6).all(axis=(1, 2))
    assert (dropped ^ kept).all() and 0 < dropped.sum() < len(x)


# ----------------------------------------------------------------------------------------------
# Trainable masks.


def _full_model() -> VisionTransformer:
    """Every PEFT module and every optional backbone parameter, in one model."""
    config = TINY.replace(
        qk_norm=True, init_values=0.1, reg_tokens=2, pre_norm=True, global_pool="avg", fc_norm=True
    )
    return VisionTransformer(
        config,
        adapter=AdapterSpec(
            config="houlsby", attn_adapter=True, norm_layer=True, scaling="channel"
        ),
        lora=LoRASpec(location=("q", "k", "v", "o"), bias=True),
        prompt=PromptSpec(num_tokens=3),
    )


def _expected_full_model() -> dict[str, set[str]]:
    groups = {"peft": set(), "head": {"head/kernel", "head/bias"}, "norm": set(), "backbone": set()}
    groups["norm"] |= {"norm_pre/scale", "norm_pre/bias", "fc_norm/scale", "fc_norm/bias"}
    groups["backbone"] |= {"patch_embed/kernel", "patch_embed/bias", "cls_token", "reg_token"}
    groups["backbone"].add("pos_embed")
    for i in range(TINY.depth):
        b = f"blocks_{i}/"
        groups["peft"].add(b + "prompt")
        for branch in ("adapter", "adapter_attn", *(f"attn/lora_{x}" for x in "qkvo")):
            groups["peft"] |= {
                f"{b}{branch}/{m}/{p}" for m in ("down", "up") for p in ("kernel", "bias")
            }
            if not branch.startswith("attn/"):
                groups["peft"] |= {f"{b}{branch}/norm/scale", f"{b}{branch}/norm/bias"}
                groups["peft"].add(f"{b}{branch}/scaling")
        for norm in ("norm1", "norm2", "attn/q_norm", "attn/k_norm"):
            groups["norm"] |= {f"{b}{norm}/scale", f"{b}{norm}/bias"}
        for dense in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
            groups["backbone"] |= {f"{b}{dense}/kernel", f"{b}{dense}/bias"}
        groups["backbone"] |= {b + "ls1/gamma", b + "ls2/gamma"}
    return groups


@pytest.mark.parametrize(
    ("mode", "groups"),
    [
        ("linear", ["head"]),
        ("peft", ["head", "peft"]),
        ("train_ln", ["head", "peft", "norm"]),
        ("finetune", ["head", "peft", "norm", "backbone"]),
    ],
)
def test_trainable_mask_exact_paths(mode: str, groups: list[str]) -> None:
    params = abstract_params(_full_model())
    expected = _expected_full_model()
    assert _all_paths(params) == set().union(*expected.values())  # the table above is complete
    assert _true_paths(trainable_mask(params, mode)) == set().union(*(expected[g] for g in groups))


def test_trainable_mask_other_architectures() -> None:
    """'map' pooling (attention pool), ResPostBlock and no head: every parameter has a rule."""
    pooled = abstract_params(VisionTransformer(TINY.replace(global_pool="map", class_token=False)))
    assert _true_paths(trainable_mask(pooled, "linear")) == {"head/kernel", "head/bias"}
    assert _true_paths(trainable_mask(pooled, "train_ln")) == {
        "head/kernel", "head/bias", "attn_pool/norm/scale", "attn_pool/norm/bias",
        *(f"{n}/{p}" for n in ("norm", "blocks_0/norm1", "blocks_0/norm2", "blocks_1/norm1",
                               "blocks_1/norm2") for p in ("scale", "bias")),
    }  # fmt: skip
    adapter_plus_spec = AdapterSpec.from_config(adapter_config())
    post = VisionTransformer(
        TINY.replace(block="res_post", num_classes=0), adapter=adapter_plus_spec
    )
    masked = _true_paths(trainable_mask(abstract_params(post), "peft"))
    assert masked == {f"blocks_{i}/adapter/{p}" for i in range(2) for p in (
        "down/kernel", "down/bias", "up/kernel", "up/bias", "scaling")}  # fmt: skip


def test_trainable_mask_keeps_the_tree_structure() -> None:
    params = freeze(abstract_params(VisionTransformer(TINY)))
    mask = trainable_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert all(isinstance(m, bool) for m in jax.tree.leaves(mask))


def test_trainable_mask_rejects_unknown_params_and_modes() -> None:
    params = abstract_params(VisionTransformer(TINY))
    with pytest.raises(ValueError, match=r"32 parameter\(s\) match no rule.*'params/blocks_0/"):
        trainable_mask({"params": params})  # the whole variables, not the params
    with pytest.raises(ValueError, match=r"match no rule.*blocks_0/extra/kernel"):
        trainable_mask({**params, "blocks_0": {**params["blocks_0"], "extra": {"kernel": 0}}})
    with pytest.raises(ValueError, match="Unknown mode 'lora'"):
        trainable_mask(params, "lora")


def test_adapter_plus_trainable_count_formula() -> None:
    """Spec 8.5: 12 (1537 r + 1536) + 769 C on ViT-B/16."""
    vit_b = ViTConfig(num_classes=47)
    for r in (1, 8):
        module = VisionTransformer(vit_b, adapter=AdapterSpec.from_config(adapter_config(dim=r)))
        assert trainable_count(abstract_params(module)) == 12 * (1537 * r + 1536) + 769 * 47


# ----------------------------------------------------------------------------------------------
# Bad configurations fail when the specs (and so the model) are built, naming the field.


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: AdapterSpec.from_config(adapter_config(config="middle")), "'config'"),
        (lambda: AdapterSpec.from_config(adapter_config(scaling="per_token")), "'scaling'"),
        (lambda: AdapterSpec.from_config(adapter_config(scaling=True)), "'scaling'"),
        (lambda: AdapterSpec.from_config(adapter_config(init="xavier")), "'init'"),
        (lambda: AdapterSpec.from_config(adapter_config(dim=0)), "'dim'"),
        (lambda: AdapterSpec.from_config(adapter_config(dim=-4)), "'dim'"),
        (lambda: AdapterSpec.from_config(adapter_config(dim=2.5)), "'dim'"),
        (lambda: AdapterSpec.from_config(adapter_config(dropout=1.0)), "'dropout'"),
        (lambda: AdapterSpec.from_config(adapter_config(drop_path=-0.1)), "'drop_path'"),
        (lambda: AdapterSpec.from_config(adapter_config(config="houlsby")), "'attn_adapter'"),
        (lambda: AdapterSpec.from_config(adapter_config(attn_adapter=True)), "'attn_adapter'"),
        (lambda: AdapterSpec.from_config(adapter_config(bottleneck=8)), "'bottleneck'"),
        (lambda: LoRASpec.from_config(lora_config(location="qz")), "'location'"),
        (lambda: LoRASpec.from_config(lora_config(location="")), "'location'"),
        (lambda: LoRASpec.from_config(lora_config(location="qq")), "'location'"),
        (lambda: LoRASpec.from_config(lora_config(config="mlp")), "'lora.config'"),
        (lambda: LoRASpec.from_config(lora_config(init="kaiming")), "'init'"),
        (lambda: LoRASpec.from_config(lora_config(dim=0)), "'dim'"),
        (lambda: LoRASpec.from_config(lora_config(rank=8)), "'rank'"),
        (lambda: PromptSpec.from_config(prompt_config(num_tokens=0)), "'num_tokens'"),
        (lambda: PromptSpec.from_config(prompt_config(tokens=5)), "'tokens'"),
    ],
)
def test_bad_configs_name_the_field(build, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build()


def _reference(**kwargs):
    return adapter_plus.VisionTransformerAdapter(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5, **kwargs
    )


def _ref_adapter(**overrides) -> OmegaConf:
    return OmegaConf.create(adapter_config(**overrides))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        # the reference builds these and fails (or not) only when run
        ({"adapter_config": _ref_adapter(config="middle")}, "'config'"),
        ({"adapter_config": _ref_adapter(config="houlsby")}, "'attn_adapter'"),
        ({"adapter_config": _ref_adapter(scaling="per_token")}, "'scaling'"),
        ({"lora_config": OmegaConf.create(lora_config(location="qz"))}, "'location'"),
        (
            {"prompt_config": OmegaConf.create(prompt_config()), "class_token": False,
             "global_pool": "avg"},
            "prompt_config.*class_token=False",
        ),
    ],
)  # fmt: skip
def test_bad_reference_models_fail_in_from_timm(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        from_timm(_reference(**kwargs))
    if "prompt_config" in kwargs:
        assert isinstance(info.value, ConversionError)


# ----------------------------------------------------------------------------------------------
# merge_lora.


@pytest.mark.parametrize(
    ("location", "scaling", "bias", "qkv_bias"),
    [
        ("qkvo", "channel", True, True),
        ("qk", "learned", False, True),
        ("vo", 0.5, True, False),
        ("o", 1.0, True, True),
    ],
)
def test_merge_lora_keeps_the_outputs(location: str, scaling, bias: bool, qkv_bias: bool) -> None:
    lora = LoRASpec.from_config(lora_config(location=location, scaling=scaling, bias=bias))
    module = VisionTransformer(
        TINY.replace(qkv_bias=qkv_bias, qk_norm=True),
        adapter=AdapterSpec(),
        lora=lora,
        prompt=PromptSpec(num_tokens=2),
    )
    variables = {"params": _random_like(abstract_params(module))}
    before = jax.tree.map(np.array, variables)
    x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))

    merged_module, merged = merge_lora(module, variables)
    assert merged_module.lora is None and merged_module.adapter == module.adapter
    assert _all_paths(merged) == _all_paths({"params": abstract_params(merged_module)})
    ref = np.asarray(module.apply(variables, x))
    out = np.asarray(merged_module.apply(merged, x))
    assert np.abs(out - ref).max() <= 1e-5 * (1 + np.abs(ref).max())
    flat = traverse_util.flatten_dict(variables)
    unfolded = traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if "lora_" not in str(k)}
    )
    assert np.abs(merged_module.apply(unfolded, x) - ref).max() > 1e-3  # the branches matter
    jax.tree.map(np.testing.assert_array_equal, before, variables)  # input left untouched
    assert isinstance(merge_lora(module, freeze(variables))[1], FrozenDict)


def test_merge_lora_refuses_nonlinear_branches() -> None:
    for field in ("act_layer", "norm_layer"):
        module = VisionTransformer(TINY, lora=LoRASpec(**{field: True}))
        with pytest.raises(ValueError, match=f"{field}=True"):
            merge_lora(module, {"params": {}})


def test_merge_lora_without_lora_is_a_no_op() -> None:
    module, variables = VisionTransformer(TINY), {"params": {}}
    assert merge_lora(module, variables) == (module, variables)


@pytest.mark.parametrize("name", sorted(peft.METHODS))
def test_every_method_builds_a_model_that_runs(name: str) -> None:
    method = peft.METHODS[name]
    cfg = ViTConfig(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=128, num_classes=3
    )  # FacT needs mlp_dim = 4 x embed_dim
    module = VisionTransformer(cfg, adapter=method.adapter, lora=method.lora, prompt=method.prompt,
                               tune=method.tune)  # fmt: skip
    x = np.ones((2, 16, 16, 3), np.float32)
    variables = module.init(jax.random.key(0), x)
    assert module.apply(variables, x).shape == (2, 3)
    n_trained = trainable_count(variables["params"], method.train_mode)
    head = 3 * 32 + 3
    assert n_trained > head if method.train_mode == "peft" else n_trained >= head
