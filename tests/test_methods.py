"""The paper's baselines and other PEFT methods (`tuning.py`, `params.TRAINABLE_GROUPS`), each
against code that no one here wrote or against the paper's equations written in torch here.

- LoRA on any linear layer, DoRA, (IA)³ and VeRA: HF peft wraps a tiny timm ViT, every peft
  parameter is set to random non-zero values, and `from_timm` converts it. Logits and the
  gradients of the trainable parameters are compared as in tests/test_peft_parity.py (the same
  tolerances, the reference in float64, and in training mode the same dropout masks on both
  sides); `hf_peft.to_peft` writes our parameters back into the peft model.
- SSF (no package to compare with): Lian et al.'s scale and shift, written below as forward
  hooks on the timm model. BitFit and LN-tune: which parameters train, and their gradients,
  against the plain timm model's.
- Trainable-parameter counts on ViT-B/16 against closed forms, and against the numbers the
  papers state (SSF, BitFit, FacT; LN-tune as published results count it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import timm
import torch
from flax import linen as nn
from flax import traverse_util
from test_peft_parity import GRAD_TOL, LOGITS_TOL, _fixed_dropout_flax, _fixed_dropout_torch

from adapter_plus_jax import config as cfglib
from adapter_plus_jax import fact, tuning
from adapter_plus_jax.convert import abstract_params, from_timm, timm_key
from adapter_plus_jax.hf_peft import PeftConversionError, to_peft, unwrap
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.params import trainable_count, trainable_mask
from adapter_plus_jax.peft import METHODS
from adapter_plus_jax.timm_arch import vit_config_from_timm
from adapter_plus_jax.tuning import TuneSpec

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
BLOCK_LAYERS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=BLOCK_LAYERS, lora_dropout=0.1
    ),  # fmt: skip
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["qkv", "fc2"], use_dora=True, lora_dropout=0.1
    ),  # fmt: skip
    "ia3": lambda: peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["qkv", "fc1"], vera_dropout=0.1),
}


def tiny_timm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)


def peft_model(kind: str) -> torch.nn.Module:
    model = peft.get_peft_model(tiny_timm(), PEFT_CONFIGS[kind]())
    with torch.no_grad():  # away from the inits (B = 0, l = 1, lambda_b = 0)
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g)


def compare(reference: torch.nn.Module, module: VisionTransformer, params: dict,
            names: dict[str, str], train: bool) -> None:  # fmt: skip
    """Logits and mean cross-entropy gradients of `reference` (float64) and our model: `names`
    maps each trainable torch parameter's name to our '/'-joined path."""
    x, labels = inputs(4 if train else 2)
    reference = reference.double().train(train)
    with _fixed_dropout_torch() if train else contextlib.nullcontext():
        logits_ref = reference(x.double())
    torch.nn.functional.cross_entropy(logits_ref, labels).backward()
    grads_ref = {n: p.grad.numpy() for n, p in reference.named_parameters() if p.requires_grad}
    assert set(grads_ref) == set(names)

    def apply(p):
        images = x.permute(0, 2, 3, 1).numpy()
        return module.apply({"params": p}, images, train=train, rngs={"dropout": jax.random.key(0)})

    with nn.intercept_methods(_fixed_dropout_flax) if train else contextlib.nullcontext():
        logits, vjp = jax.vjp(apply, params)
        onehot = jax.nn.one_hot(labels.numpy(), logits.shape[-1])
        (grads,) = vjp((jax.nn.softmax(logits) - onehot) / len(x))
    logits_ref = logits_ref.detach().numpy()
    err = np.abs(np.asarray(logits) - logits_ref).max() / (1 + np.abs(logits_ref).max())
    assert err <= LOGITS_TOL, err
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(grads).items()}
    floor = 1e-2 * max(np.abs(g).max() for g in grads_ref.values())
    for name, g in grads_ref.items():
        ours = flat[names[name]]
        ours = ours.T if ours.ndim == 2 and ours.shape != g.shape else ours.reshape(g.shape)
        rel = np.abs(ours - g).max() / max(np.abs(g).max(), floor)
        assert rel <= GRAD_TOL, (name, rel)


def our_name(torch_name: str) -> str:
    """Our path of a peft parameter of a converted model (the inverse of `hf_peft`'s names)."""
    name = torch_name.removeprefix("base_model.model.")
    block, layer, rest = name.split(".")[1], ".".join(name.split(".")[2:4]), name.split(".")[4]
    ours = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "dora_m",
            "ia3_l": "ia3", "vera_lambda_b": "vera_lambda_b",
            "vera_lambda_d": "vera_lambda_d"}[rest]  # fmt: skip
    return f"blocks_{block}/{layer.replace('.', '/')}/{ours}"


# ----------------------------------------------------------------------------------------------
# LoRA on any linear layer, DoRA, (IA)³, VeRA against HF peft.


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_a_peft_model_converts_and_computes_what_peft_computes(kind: str, train: bool) -> None:
    reference = peft_model(kind)
    module, variables = from_timm(reference)
    assert module.tune.kind == kind
    params = variables["params"]
    mask = traverse_util.flatten_dict(trainable_mask(params))
    trained = {"/".join(k) for k, on in mask.items() if on and k[0] != "head"}
    names = {n: our_name(n) for n, p in reference.named_parameters() if p.requires_grad}
    assert trained == set(names.values())  # peft's trainable set is ours (bar the head)
    compare(reference, module, params, names, train)


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_our_parameters_export_back_into_the_peft_model(kind: str) -> None:
    reference = peft_model(kind).eval()
    module, variables = from_timm(reference)
    flat = traverse_util.flatten_dict(variables["params"])
    key = jax.random.key(3)
    for path in flat:
        if trainable_mask_of(path):
            key, sub = jax.random.split(key)
            flat[path] = flat[path] + 0.1 * jax.random.normal(sub, flat[path].shape)
    params = traverse_util.unflatten_dict(flat)
    missing, unexpected = reference.load_state_dict(to_peft(params, reference), strict=False)
    assert not unexpected
    x, _ = inputs(2)
    ours = module.apply({"params": params}, x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(reference(x).detach().numpy(), ours, atol=2e-5)


def test_a_trained_head_in_modules_to_save_converts_and_vera_matrices_must_match() -> None:
    """peft's modules_to_save=["head"] (its usual classification setup) converts with the
    trained copy of the head; parameters whose VeRA matrices are not the peft model's are
    refused by `to_peft` (they would silently compute something else)."""
    config = peft.VeraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"])
    reference = peft.get_peft_model(tiny_timm(), config).eval()
    with torch.no_grad():
        reference.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    module, variables = from_timm(reference)
    x, _ = inputs(2)
    ours = module.apply(variables, x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(reference(x).detach().numpy(), ours, atol=2e-5)
    flat = traverse_util.flatten_dict(variables["params"])
    flat[("blocks_0", "attn", "qkv", "vera_a")] = flat[("blocks_0", "attn", "qkv", "vera_a")] + 1
    with pytest.raises(PeftConversionError, match="VeRA's fixed random matrices differ"):
        to_peft(traverse_util.unflatten_dict(flat), reference)


def trainable_mask_of(path: tuple[str, ...]) -> bool:
    return path[-1] in ("lora_a", "lora_b", "dora_m", "ia3", "vera_lambda_b", "vera_lambda_d")


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda: peft.LoraConfig(r=4, target_modules=["qkv", "proj"]), "patch_embed.proj"),
        (
            lambda: peft.LoraConfig(r=4, target_modules=r"blocks\.0\.attn\.qkv"),
            "the same layers in every block",
        ),  # fmt: skip
        (
            lambda: peft.LoraConfig(r=4, target_modules=["qkv"], rank_pattern={"blocks.1": 2}),
            "rank_pattern",
        ),  # fmt: skip
        (lambda: peft.LoraConfig(r=4, target_modules=["qkv"], bias="lora_only"), "bias='none'"),
    ],
)
def test_peft_models_that_do_not_convert_are_refused_naming_why(config, message) -> None:
    with pytest.raises(PeftConversionError, match=message):
        unwrap(peft.get_peft_model(tiny_timm(), config()))


# ----------------------------------------------------------------------------------------------
# SSF, BitFit, LN-tune against the equations, written in torch here.


def ssf_reference(model: torch.nn.Module, params: dict) -> list[torch.nn.Parameter]:
    """Lian et al.'s SSF on a timm ViT: y * gamma + beta after the patch embedding, every
    LayerNorm and every linear layer of the blocks, with our (converted) values."""
    hooked = ["patch_embed"] + [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in
                                ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                 "mlp.fc2")] + ["norm"]  # fmt: skip
    made = []
    for name in hooked:
        path = name.replace("blocks.", "blocks_").replace(".", "/")
        if name in ("patch_embed", "norm") or name.endswith(("norm1", "norm2")):
            scale, shift = params[f"{path}_ssf/scale"], params[f"{path}_ssf/shift"]
        else:
            scale, shift = params[f"{path}/ssf_scale"], params[f"{path}/ssf_shift"]
        gamma = torch.nn.Parameter(torch.from_numpy(np.array(scale, np.float64)))
        beta = torch.nn.Parameter(torch.from_numpy(np.array(shift, np.float64)))
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, y, g=gamma, b=beta: y * g + b
        )
        made += [gamma, beta]
    return made


def test_ssf_is_a_scale_and_shift_after_each_operation() -> None:
    reference = tiny_timm()
    module, variables = from_timm(tiny_timm())
    module = module.clone(tune=TuneSpec("ssf"))
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    flat = traverse_util.flatten_dict(params)
    flat.update(traverse_util.flatten_dict(variables["params"]))  # the backbone's weights
    params = traverse_util.unflatten_dict(flat)
    joined = {"/".join(k): v for k, v in flat.items()}
    made = ssf_reference(reference, joined)
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.head.weight.requires_grad_(True)
    reference.head.bias.requires_grad_(True)
    for p in made:
        p.requires_grad_(True)
    names = {n: "/".join(k) for k, n in ssf_names(flat, reference, made).items()}
    mask = traverse_util.flatten_dict(trainable_mask(params))
    assert {"/".join(k) for k, on in mask.items() if on} == set(names.values())
    compare(Hooked(reference, made), module, params, names, train=False)


class Hooked(torch.nn.Module):
    """A hooked timm model with the hooks' parameters as its own (named ssf.<i>)."""

    def __init__(self, model: torch.nn.Module, made: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.model, self.ssf = model, torch.nn.ParameterList(made)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def ssf_names(flat: dict, model: torch.nn.Module, made: list) -> dict:
    """Our path -> the Hooked model's parameter name, for the head and every SSF parameter."""
    ours = [k for k in flat if k[-1] in ("scale", "shift", "ssf_scale", "ssf_shift")
            and (k[-2].endswith("_ssf") or k[-1].startswith("ssf_"))]  # fmt: skip
    order = {  # ssf_reference's order of hooks, scale before shift
        "/".join(k): i for i, k in enumerate(ssf_order(model))
    }
    ours.sort(key=lambda k: order["/".join(k)])
    names = {k: f"ssf.{i}" for i, k in enumerate(ours)}
    names[("head", "kernel")], names[("head", "bias")] = "model.head.weight", "model.head.bias"
    assert len(ours) == len(made)
    return names


def ssf_order(model: torch.nn.Module) -> list[tuple[str, ...]]:
    out = [("patch_embed_ssf", "scale"), ("patch_embed_ssf", "shift")]
    for i in range(len(model.blocks)):
        b = f"blocks_{i}"
        out += [(b, "norm1_ssf", "scale"), (b, "norm1_ssf", "shift")]
        for layer in (("attn", "qkv"), ("attn", "proj")):
            out += [(b, *layer, "ssf_scale"), (b, *layer, "ssf_shift")]
        out += [(b, "norm2_ssf", "scale"), (b, "norm2_ssf", "shift")]
        for layer in (("mlp", "fc1"), ("mlp", "fc2")):
            out += [(b, *layer, "ssf_scale"), (b, *layer, "ssf_shift")]
    return out + [("norm_ssf", "scale"), ("norm_ssf", "shift")]


def fact_reference(model: torch.nn.Module, kind: str, params: dict, scale: float) -> list:
    """FacT (Jie & Deng 2023) as its code computes it, as forward hooks that add each layer's
    update to its output: U x through the layer's core, dropout, V, times s; fc1's output and
    fc2's input in 4 chunks; TK's cores are C times 12 columns of P per block, q, k, v, proj
    first, then fc1's 4 and fc2's 4 (laid out as its code lays them out). Our values, in our
    layouts (inputs x outputs: its Linear weights transposed)."""

    def tensor(value) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.from_numpy(np.array(value, np.float64)))

    u, v = tensor(params["fact/u"]), tensor(params["fact/v"])
    model.fact_dropout = torch.nn.Dropout(0.1)  # a submodule: it follows train() and eval()
    made, dp, r = [u, v], model.fact_dropout, params["fact/u"].shape[1]
    layers = ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")
    if kind == "fact_tk":
        c, p = tensor(params["fact/core"]), tensor(params["fact/factors"])
        made += [c, p]
    else:  # each layer's own cores
        tt = [{n: tensor(params[f"blocks_{i}/{n}/fact_core"]) for n in layers}
              for i in range(len(model.blocks))]  # fmt: skip
        made += [w for block in tt for w in block.values()]

    def cores(i: int) -> dict[str, torch.Tensor]:
        """Block i's cores, each applied as x @ core: q, k, v, o, fc1, fc2."""
        if kind == "fact_tt":
            w = tt[i]
            q, k, vv = w["attn/qkv"]
            return dict(q=q, k=k, v=vv, o=w["attn/proj"], fc1=w["mlp/fc1"], fc2=w["mlp/fc2"])
        attn, mlp = c @ p[:, 12 * i : 12 * i + 4], c @ p[:, 12 * i + 4 : 12 * i + 12]
        return dict(q=attn[:, :, 0], k=attn[:, :, 1], v=attn[:, :, 2], o=attn[:, :, 3],
                    fc1=mlp[:, :, :4].reshape(r, 4 * r),
                    fc2=mlp[:, :, 4:].reshape(r, 4 * r).t())  # fmt: skip

    def qkv_hook(i, _m, inputs, y):
        w, ux = cores(i), inputs[0] @ u
        return y + torch.cat([dp(ux @ w[n]) @ v for n in ("q", "k", "v")], dim=-1) * scale

    def proj_hook(i, _m, inputs, y):
        return y + dp(inputs[0] @ u @ cores(i)["o"]) @ v * scale

    def fc1_hook(i, _m, inputs, y):
        b, n, _ = inputs[0].shape
        h = dp(inputs[0] @ u @ cores(i)["fc1"]).reshape(b, n, 4, r)
        return y + (h @ v).reshape(b, n, -1) * scale

    def fc2_hook(i, _m, inputs, y):
        b, n, c4 = inputs[0].shape
        ux = (inputs[0].reshape(b, n, 4, c4 // 4) @ u).reshape(b, n, 4 * r)
        return y + dp(ux @ cores(i)["fc2"]) @ v * scale

    for i, block in enumerate(model.blocks):
        block.attn.qkv.register_forward_hook(functools.partial(qkv_hook, i))
        block.attn.proj.register_forward_hook(functools.partial(proj_hook, i))
        block.mlp.fc1.register_forward_hook(functools.partial(fc1_hook, i))
        block.mlp.fc2.register_forward_hook(functools.partial(fc2_hook, i))
    return made


@pytest.mark.parametrize("kind", ["fact_tt", "fact_tk"])
def test_fact_computes_what_its_papers_code_computes(kind: str, train: bool = True) -> None:
    """In training mode, with the same dropout masks on both sides (the other methods' tests
    cover eval mode's switch)."""
    spec = TuneSpec(kind, dim=4, dropout=0.1, fact_scale=0.7)
    module, variables = from_timm(tiny_timm())
    module = module.clone(tune=spec)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    flat = traverse_util.flatten_dict(params)
    key = jax.random.key(2)
    for path in [k for k in flat if k[0] == "fact" or k[-1] == "fact_core"]:  # V starts at 0
        key, sub = jax.random.split(key)
        flat[path] = flat[path] + 0.2 * jax.random.normal(sub, flat[path].shape)
    flat.update(traverse_util.flatten_dict(variables["params"]))
    params = traverse_util.unflatten_dict(flat)
    joined = {"/".join(k): np.asarray(v) for k, v in flat.items()}
    reference = tiny_timm()
    made = fact_reference(reference, kind, joined, 0.7)
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.head.weight.requires_grad_(True)
    reference.head.bias.requires_grad_(True)
    ours = ["fact/u", "fact/v"] + (["fact/core", "fact/factors"] if kind == "fact_tk" else [
        f"blocks_{i}/{n}/fact_core" for i in range(2)
        for n in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")])  # fmt: skip
    names = {f"ssf.{i}": name for i, name in enumerate(ours)}
    names.update({"model.head.weight": "head/kernel", "model.head.bias": "head/bias"})
    mask = traverse_util.flatten_dict(trainable_mask(params))
    assert {"/".join(k) for k, on in mask.items() if on} == set(names.values())
    compare(Hooked(reference, made), module, params, names, train)


@pytest.mark.parametrize("mode", ["bitfit", "ln_tune"], ids=["biases", "norms"])
def test_bitfit_and_ln_tune_train_what_their_papers_train(mode: str) -> None:
    """BitFit (Ben Zaken et al. 2022): every bias, the LayerNorms' included; LN-tune: every
    LayerNorm's scale and bias; both with the head. Against timm's own parameter names."""
    reference = tiny_timm()
    module, variables = from_timm(reference)
    for name, p in reference.named_parameters():
        is_norm = re.search(r"(^|\.)norm\d?\.", name) is not None
        trains = name.startswith("head.") or (
            name.endswith(".bias") if mode == "bitfit" else is_norm
        )
        p.requires_grad_(trains)
    params = variables["params"]
    mask = traverse_util.flatten_dict(trainable_mask(params, mode))
    names = {timm_key(k): "/".join(k) for k, on in mask.items() if on}
    compare(reference, module, params, names, train=False)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "vera", "ssf", "fact_tt", "fact_tk"])
def test_merging_folds_each_linear_method_into_a_plain_vit(kind: str) -> None:
    """`tuning.merge`: the plain ViT with the folded weights computes what the tuned model
    computes (eval), for random values of every parameter of the method."""
    spec = TuneSpec(kind, ("qkv", "proj", "fc1", "fc2"), dim=4, alpha=6.0, fact_scale=0.5)
    module, variables = from_timm(tiny_timm())
    module = module.clone(tune=spec)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    flat = traverse_util.flatten_dict(params)
    key = jax.random.key(1)
    for path in sorted(flat):
        key, sub = jax.random.split(key)
        flat[path] = flat[path] + 0.1 * jax.random.normal(sub, flat[path].shape)
    params = traverse_util.unflatten_dict(flat)
    x = np.asarray(inputs(3)[0].permute(0, 2, 3, 1))
    merged = module.clone(tune=None).apply({"params": tuning.merge(spec, params)}, x)
    np.testing.assert_allclose(merged, module.apply({"params": params}, x), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Counts, configs.

VIT_B = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)


@functools.cache
def vit_b16() -> ViTConfig:
    return vit_config_from_timm(timm.create_model("vit_base_patch16_224", pretrained=False))


@functools.cache
def vit_b_count(method: str, classes: int, dim: int | None = None) -> int:
    m = METHODS[method]
    tune = m.tune if dim is None else dataclasses.replace(m.tune, dim=dim)
    module = VisionTransformer(vit_b16().replace(num_classes=classes), tune=tune)
    return trainable_count(abstract_params(module), m.train_mode)


def test_trainable_counts_on_vit_b16() -> None:
    """Closed forms on ViT-B/16 (12 blocks of width 768, MLP 3072) for DTD's 47 classes (head:
    769 * 47)."""
    head = 769 * 47
    biases = 768 + 12 * (2304 + 768 + 3072 + 768)  # patch embedding, qkv, proj, fc1, fc2
    norms = 25 * 768  # 2 per block and the final norm
    expected = {
        "bitfit": biases + norms + head,
        "ln_tune": 2 * norms + head,
        "ssf": 2 * (768 + 12 * (768 + 2304 + 768 + 768 + 3072 + 768) + 768) + head,
        "ia3": 12 * (2304 + 3072) + head,
        "lora_linear": 12 * 8 * (768 + 2304) + head,
        "dora": 12 * (8 * (768 + 2304) + 2304) + head,
        "vera": 12 * ((8 + 2304) + (8 + 3072)) + head,
        # FacT, r=8: U and V, 768 x 8 each; TT: per block q, k, v, proj 8 x 8, fc1 and fc2
        # 8 x 32; TK: a core tensor 8 x 8 x 8 and P, 8 x 144.
        "fact_tt": 2 * 768 * 8 + 12 * (4 * 64 + 2 * 256) + head,
        "fact_tk": 2 * 768 * 8 + 8**3 + 8 * 144 + head,
    }
    counts = {name: vit_b_count(name, 47) for name in expected}
    assert counts == expected


def test_trainable_counts_are_the_numbers_the_papers_state() -> None:
    """ViT-B/16 on VTAB-1k (sources in docs/recipe.md section 11):
    - SSF: 0.24 M with the head's mean over the 19 tasks (Lian et al. 2022, its VTAB-1k table);
    - BitFit: 0.103 M without the head (Jie & Deng 2023, Table 1);
    - FacT without the head (Jie & Deng 2023, Table 1): TT r=4 0.008 M, TK r=8 0.014 M, and
      with the ranks its code sets per task, averaged per group and over the 3 groups,
      TT<=16 0.037 M and TK<=32 0.069 M;
    - LN-tune: 38,400 without the head, as Mai et al.'s released VTAB-1k results count it."""
    head = 769 * 47
    vtab_classes = [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
    ssf_mean = vit_b_count("ssf", 47) - head + 769 * np.mean(vtab_classes)
    assert round(ssf_mean / 1e6, 2) == 0.24
    assert round((vit_b_count("bitfit", 47) - head) / 1e6, 3) == 0.103
    assert vit_b_count("ln_tune", 47) - head == 38_400

    def fact(kind: str, rank: int) -> float:
        return (vit_b_count(kind, 47, rank) - head) / 1e6

    assert round(fact("fact_tt", 4), 3) == 0.008 and round(fact("fact_tk", 8), 3) == 0.014
    # FacT's configs (JieShibo/PETL-ViT, FacT/configs/{tt,tk}), VTAB-1k's order; groups of
    # 7, 4 and 8 tasks.
    ranks = {
        "fact_tt": [8, 16, 8, 16, 8, 16, 8, 8, 8, 8, 8, 16, 4, 16, 16, 16, 16, 16, 8],
        "fact_tk": [32, 32, 16, 32, 16, 32, 16, 32, 32, 32, 16, 32, 16, 32, 32, 32, 32, 32, 16],
    }
    for kind, stated in (("fact_tt", 0.037), ("fact_tk", 0.069)):
        counts = [fact(kind, r) for r in ranks[kind]]
        groups = [counts[:7], counts[7:11], counts[11:]]
        assert round(np.mean([np.mean(g) for g in groups]), 3) == stated, kind


@pytest.mark.parametrize("method", ["bitfit", "ln_tune", "ssf", "ia3", "lora_linear", "dora",
                                    "vera", "fact_tt", "fact_tk"])  # fmt: skip
def test_every_method_is_a_config_argument(method: str) -> None:
    """configs/vtab.py, fgvc.py, tfds.py and folder.py take each method as method=NAME, with
    the rank from dim=; the config checks and builds its spec."""
    for arg in (f"configs/vtab.py:dtd,method={method},dim=4",
                f"configs/fgvc.py:cub,method={method},dim=4",
                f"configs/tfds.py:cifar10,method={method},dim=4",
                f"configs/folder.py:/tmp/x,method={method},dim=4"):  # fmt: skip
        config = cfglib.load_config(arg)
        cfglib.validate(config)
        assert config.method == method and config.train_mode == METHODS[method].train_mode
        if METHODS[method].tune is not None:
            spec = TuneSpec.from_config(config.tune)
            assert spec.kind == METHODS[method].tune.kind
            assert spec.dim == (4 if spec.kind in ("lora", "dora", "vera", *fact.KINDS) else 8)


def test_runs_of_the_new_methods_export_predict_and_serve(tmp_path, capsys) -> None:
    """The demo trained with DoRA and with BitFit (1 epoch): each exported task, served in one
    TaskSet, has its run's test accuracy, and so has the DoRA run exported merged (a plain
    ViT). Three groups: DoRA changes the backbone's layers, the merged task has whole weight
    matrices of its own, and BitFit's biases share no forward with those."""
    from runs import tiny_demo
    from test_export import _test_split

    from adapter_plus_jax import export, predict, runner
    from adapter_plus_jax.data import demo
    from adapter_plus_jax.serving import TaskSet
    from adapter_plus_jax.task import load_backbone, read_task

    tasks, accuracies = [], []
    for method in ("dora", "bitfit"):
        results = runner.run(tiny_demo(1, f"method={method},dim=4"), tmp_path / method)
        export.export_run(tmp_path / method, tmp_path / f"{method}_task")
        tasks.append(read_task(tmp_path / f"{method}_task"))
        accuracies.append(results["test_accuracy"])
    assert tasks[0].tune.kind == "dora"
    assert any(k[-1] == "bias" for k in traverse_util.flatten_dict(tasks[1].params))
    export.export_run(tmp_path / "dora", tmp_path / "dora_merged", merge=True)
    tasks.append(read_task(tmp_path / "dora_merged"))
    accuracies.append(accuracies[0])
    assert tasks[-1].merged and tasks[-1].tune is None
    images, labels = _test_split()
    serving = TaskSet(tasks, load_backbone(tasks[0].backbone), batch_size=100)
    assert [g.members for g in serving.groups] == [[0], [1], [2]]
    for i, accuracy in enumerate(accuracies):
        logits = serving.logits(images, [i] * len(labels))
        assert np.mean(np.argmax(np.stack(logits), -1) == labels) == pytest.approx(accuracy)
    # apj predict with the three tasks at once, on image files.
    demo.write_test_images(tmp_path / "images", 4)
    capsys.readouterr()  # the runs' own lines
    tasks_args = [a for name in ("dora_task", "bitfit_task", "dora_merged")
                  for a in ("--task", str(tmp_path / name))]  # fmt: skip
    assert predict.main([*tasks_args, "--json", str(tmp_path / "images")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 4 * 3 and all("predictions" in r for r in records)
