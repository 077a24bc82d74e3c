"""Parity of the Flax Adapter / LoRA / VPT models with the reference package adapter-plus 0.1.0.

Reference models are built directly (`adapter_plus.VisionTransformerAdapter`), every adapter,
LoRA, prompt and head parameter is set to random non-zero values, and the model is converted
with `from_timm`. In eval mode (the configs keep non-zero dropout and drop path, so eval must
switch them off on both sides):

- logits: max |jax - torch| <= 1e-5 * (1 + max |torch|) (measured worst: 7e-7);
- gradients of the mean cross-entropy w.r.t. every trainable parameter (the reference's
  trainable set; ours from `trainable_mask`, keys mapped through `timm_key`):
  max |jax - torch| <= 1e-4 * max |torch|, per tensor, with max |torch| floored at 1e-2 of the
  largest gradient (see `_check`) (measured worst: 2e-5).

The reference runs in float64 on the same (float32) parameter values, so the errors are our
float32 rounding alone. In training mode both sides draw every dropout and drop-path mask from
the same fixed pattern, so that a dropout in another place (LoRA's before the down-projection,
the adapter's after the activation, the prompts' per example) changes the result. The
initialisations are compared by distribution with the reference's own (two-sample KS tests).

JAX runs op by op (no jit): each case has its own architecture, and compiling each one costs
far more than running it. Run with `-s` to print the worst errors per variant.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from unittest import mock

import adapter_plus
import jax
import numpy as np
import pytest
import scipy.stats
import timm
import torch
from flax import linen as nn
from omegaconf import OmegaConf
from reference import freeze_like_reference, reference_trains

from adapter_plus_jax.convert import abstract_params, from_timm, timm_key, to_adapter_plus
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.params import trainable_count, trainable_mask
from adapter_plus_jax.timm_arch import ConversionError, peft_specs_from_timm, vit_config_from_timm

LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
BLOCKS = {"block": adapter_plus.AdapterBlock, "res_post": adapter_plus.AdapterResPostBlock}

# Worst (logits, gradient) error per variant, printed at the end of the module.
_WORST: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print("\nworst relative errors per variant (logits, gradients):")
    for variant, (logits, grads) in sorted(_WORST.items()):
        print(f"  {variant:26s} logits {logits:.2e}  grads {grads:.2e}")


def _adapter_cfg(config: str = "post", **overrides) -> OmegaConf:
    cfg = dict(
        config=config,
        dim=4,
        act_layer=True,
        norm_layer=False,
        bias=True,
        init="houlsby",
        scaling="channel",
        attn_adapter=config == "houlsby",
        dropout=0.1,
        drop_path=0.1,
    )
    return OmegaConf.create({**cfg, **overrides})


def _lora_cfg(location: str = "qk", **overrides) -> OmegaConf:
    cfg = dict(
        config="attention",
        location=location,
        dim=4,
        act_layer=False,
        norm_layer=False,
        bias=False,
        init="lora",
        scaling=1.0,
        dropout=0.1,
        pre_dropout=True,
        drop_path=0.1,
    )
    return OmegaConf.create({**cfg, **overrides})


def _prompt_cfg(num_tokens: int) -> OmegaConf:
    return OmegaConf.create(dict(num_tokens=num_tokens, dropout=0.1))


def _reference(block: str = "block", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny adapter-plus model (eval mode) with random non-zero PEFT, head and norm params."""
    torch.manual_seed(seed)
    kwargs = {**TINY, "drop_path_rate": 0.1, "drop_rate": 0.1, **kwargs}
    model = adapter_plus.VisionTransformerAdapter(block_fn=BLOCKS[block], **kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("scaling"):
                p.copy_(1.0 + 0.5 * noise)
            elif reference_trains(name):
                p.copy_(0.2 * noise)
            elif p.ndim == 1:  # LayerNorm and bias vectors off their trivial init
                p.add_(0.1 * noise)
    return model


def _inputs(model: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen)
    return x, torch.randint(0, TINY["num_classes"], (batch,), generator=gen)


def _keep_mask(shape: tuple[int, ...], rate: float) -> np.ndarray:
    """A fixed keep mask (a fraction of about 1 - rate kept) that depends only on the shape:
    the golden-ratio sequence, thresholded."""
    u = (np.arange(1, math.prod(shape) + 1) * 0.6180339887498949) % 1.0
    return (u >= rate).reshape(shape)


@contextlib.contextmanager
def _fixed_dropout_torch() -> Iterator[None]:
    """The reference's dropout and drop path, with `_keep_mask` for the random masks."""

    def dropout(self, x):
        if not self.training or self.p == 0:
            return x
        return x * torch.from_numpy(_keep_mask(tuple(x.shape), self.p)).to(x.dtype) / (1 - self.p)

    def drop_path(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one decision per sample
        keep = torch.from_numpy(_keep_mask(shape, self.drop_prob)).to(x.dtype)
        return x * keep / (1 - self.drop_prob)

    with (
        mock.patch.object(torch.nn.Dropout, "forward", dropout),
        mock.patch.object(timm.layers.DropPath, "forward", drop_path),
    ):
        yield


def _fixed_dropout_flax(call, args, kwargs, context):
    """flax `nn.intercept_methods` interceptor: every nn.Dropout (our DropPath included, a
    Dropout broadcast over all but the batch axis) draws its mask from `_keep_mask`."""
    module = context.module
    if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
        return call(*args, **kwargs)
    x = args[0]
    if kwargs.get("deterministic", module.deterministic) or module.rate == 0:
        return x
    dims = {d % x.ndim for d in module.broadcast_dims}
    shape = tuple(1 if i in dims else n for i, n in enumerate(x.shape))
    return x * _keep_mask(shape, module.rate).astype(x.dtype) / (1 - module.rate)


def _check(model: torch.nn.Module, variant: str, train: bool = False) -> None:
    """Compare logits and cross-entropy gradients of the reference and the converted model, in
    eval mode or (`train`) in training mode with the same fixed dropout and drop-path masks on
    both sides, so that where each dropout sits is compared too."""
    x, labels = _inputs(model, batch=4 if train else 2)
    trainable = freeze_like_reference(model)
    # The reference runs in float64, so that only our float32 rounding counts against us.
    with _fixed_dropout_torch() if train else contextlib.nullcontext():
        logits_ref = model.train(train).double()(x.double())
    torch.nn.functional.cross_entropy(logits_ref, labels).backward()
    grads_ref = {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}
    logits_ref = logits_ref.detach().numpy()

    module, variables = from_timm(model)  # float32 parameters, the same values
    params = variables["params"]
    mask = trainable_mask(params)
    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    ours = {timm_key(tuple(k.key for k in path)) for path, on in flat_mask if on}
    assert ours == trainable

    def apply(p):
        rngs = {"dropout": jax.random.key(0)}  # unused: the interceptor supplies the masks
        return module.apply({"params": p}, x.permute(0, 2, 3, 1).numpy(), train=train, rngs=rngs)

    with nn.intercept_methods(_fixed_dropout_flax) if train else contextlib.nullcontext():
        logits, vjp = jax.vjp(apply, params)
        # d mean-CE / d logits = (softmax - onehot) / batch
        onehot = jax.nn.one_hot(labels.numpy(), logits.shape[-1])
        (grads,) = vjp((jax.nn.softmax(logits) - onehot) / len(x))
    grads = {k: v.numpy() for k, v in to_adapter_plus(grads).items()}

    logits_err = float(
        np.abs(np.asarray(logits) - logits_ref).max() / (1 + np.abs(logits_ref).max())
    )
    assert logits_err <= LOGITS_TOL, logits_err
    assert set(grads) == trainable
    # A gradient far below the largest one is a sum that cancels (a bias on k shifts all logits
    # of a query equally, which softmax ignores: zero up to rounding; a learned scalar scaling
    # sums over every token and channel), so float32 rounding is measured at 1e-2 of the largest.
    floor = 1e-2 * max(np.abs(g).max() for g in grads_ref.values())
    grad_errs = {
        k: float(np.abs(grads[k] - g).max() / max(np.abs(g).max(), floor))
        for k, g in grads_ref.items()
    }
    worst = max(grad_errs, key=grad_errs.get)
    assert grad_errs[worst] <= GRAD_TOL, (worst, grad_errs[worst])
    record = _WORST[variant + (" (train)" if train else "")]
    record[0], record[1] = max(record[0], logits_err), max(record[1], grad_errs[worst])


# ----------------------------------------------------------------------------------------------
# Adapters: every position x scaling x norm x bias (72 cases), each on a Block or a ResPostBlock
# model, alternating so that every position and every adapter variant runs on both block types
# half of the time. (Both blocks for every case would double the runtime for no new code path:
# the variants change only the Adapter, the block type only the wiring around it.)

POSITIONS = ("post", "pre", "parallel", "intermediate", "houlsby", "pfeiffer")
VARIANTS = list(itertools.product((0.5, "learned", "channel"), (False, True), (False, True)))
ADAPTER_CASES = [
    (position, list(BLOCKS)[(i + j) % 2], *variant)
    for i, position in enumerate(POSITIONS)
    for j, variant in enumerate(VARIANTS)
]


@pytest.mark.parametrize(
    ("position", "block", "scaling", "norm", "bias"),
    ADAPTER_CASES,
    ids=[f"{p}-{b}-{s}-norm{int(n)}-bias{int(c)}" for p, b, s, n, c in ADAPTER_CASES],
)
def test_adapter_parity(position: str, block: str, scaling, norm: bool, bias: bool) -> None:
    cfg = _adapter_cfg(position, scaling=scaling, norm_layer=norm, bias=bias)
    _check(_reference(block, adapter_config=cfg), position)


# ----------------------------------------------------------------------------------------------
# LoRA on several location sets; the settings rotate over the cases.

LORA_CASES = [
    # (location, block, scaling, bias, qkv_bias, act and norm in the branch)
    ("q", "block", 1.0, False, True, False),
    ("qk", "block", "learned", True, True, False),
    ("qkvo", "block", "channel", True, False, False),  # q/k/v branches drop their bias here
    ("v", "block", 0.5, True, True, True),
    ("o", "block", "channel", True, False, False),  # ... but the 'o' branch keeps it
    ("q", "res_post", "channel", True, True, True),
    ("qk", "res_post", 1.0, False, True, False),
    ("qkvo", "res_post", 0.5, True, True, True),
    ("v", "res_post", "learned", False, False, False),
    ("o", "res_post", 1.0, True, True, True),
]


@pytest.mark.parametrize(
    ("location", "block", "scaling", "bias", "qkv_bias", "nonlinear"),
    LORA_CASES,
    ids=[
        f"{c[0]}-{c[1]}-{c[2]}-bias{int(c[3])}-qkvbias{int(c[4])}-nl{int(c[5])}" for c in LORA_CASES
    ],
)
def test_lora_parity(
    location: str, block: str, scaling, bias: bool, qkv_bias: bool, nonlinear: bool
) -> None:
    cfg = _lora_cfg(location, scaling=scaling, bias=bias, act_layer=nonlinear, norm_layer=nonlinear)
    # qk_norm=True: the reference's LoRAAttention has no q/k norm whatever the flag says.
    model = _reference(block, lora_config=cfg, qkv_bias=qkv_bias, qk_norm=True)
    assert not hasattr(model.blocks[0].attn, "q_norm")
    _check(model, "lora")


# ----------------------------------------------------------------------------------------------
# VPT, and all three together.


# Image sizes that give every VPT case 1 + T + patches = 67 tokens: JAX compiles each op once
# per shape, so shared shapes save most of the compile time.
VPT_IMG_SIZE = {1: (40, 104), 10: (56, 64), 50: (32, 32)}


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("num_tokens", [1, 10, 50])
def test_vpt_parity(num_tokens: int, block: str) -> None:
    prompt = _prompt_cfg(num_tokens)
    _check(_reference(block, prompt_config=prompt, img_size=VPT_IMG_SIZE[num_tokens]), "vpt")


@pytest.mark.parametrize("global_pool", ["avg", "max"])
def test_vpt_pooling_parity(global_pool: str) -> None:
    """timm pools everything after the class token, so the reference pools the prompts too."""
    model = _reference(prompt_config=_prompt_cfg(50), global_pool=global_pool, fc_norm=True)
    _check(model, "vpt")


def test_vpt_with_register_tokens_parity() -> None:
    """The reference writes prompts between the class token and the registers, we after the
    registers; with class-token pooling that is the same model."""
    model = _reference(prompt_config=_prompt_cfg(10), reg_tokens=2, img_size=(56, 64))
    _check(model, "vpt")


def test_vpt_with_register_tokens_and_average_pool_is_refused() -> None:
    model = _reference(prompt_config=_prompt_cfg(10), reg_tokens=2, global_pool="avg")
    with pytest.raises(ConversionError, match="register tokens and global_pool='avg'"):
        from_timm(model)


def _combined(seed: int = 0, **kwargs) -> torch.nn.Module:
    return _reference(
        adapter_config=_adapter_cfg("houlsby", norm_layer=True),
        lora_config=_lora_cfg("qkvo", bias=True, scaling="channel"),
        prompt_config=_prompt_cfg(50),
        seed=seed,
        **kwargs,
    )


def test_adapter_lora_vpt_parity() -> None:
    _check(_combined(init_values=0.1), "combined")  # with LayerScale


def test_round_trip_through_to_adapter_plus() -> None:
    """adapter-plus -> from_timm -> to_adapter_plus -> a fresh reference model with the same
    backbone (strict=False) gives the identical model."""
    model = _combined(seed=0)
    _, variables = from_timm(model)
    exported = to_adapter_plus(variables["params"])
    assert set(exported) == freeze_like_reference(model)

    fresh = _combined(seed=3)
    backbone = {k: v for k, v in model.state_dict().items() if k not in exported}
    fresh.load_state_dict(backbone, strict=False)
    x, _ = _inputs(model)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))  # the PEFT params still differ
        result = fresh.load_state_dict(exported, strict=False)
        assert result.unexpected_keys == []
        assert set(result.missing_keys) == set(backbone)
        assert torch.equal(fresh(x), model(x))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


# ----------------------------------------------------------------------------------------------
# Training mode: dropout and drop path in the reference's places.

TRAIN_CASES = {
    "adapter_plus": dict(adapter_config=_adapter_cfg("post", drop_path=0.3)),
    "houlsby_norm_res_post": dict(
        block="res_post",
        adapter_config=_adapter_cfg("houlsby", norm_layer=True, drop_path=0.3),
    ),
    "lora_pre_dropout": dict(lora_config=_lora_cfg("qkvo", bias=True, drop_path=0.3)),
    "lora_post_dropout": dict(lora_config=_lora_cfg("qv", act_layer=True, pre_dropout=False)),
    "vpt": dict(prompt_config=_prompt_cfg(10), img_size=(56, 64)),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_training_mode_parity(case: str) -> None:
    kwargs = dict(TRAIN_CASES[case])
    block = kwargs.pop("block", "block")
    _check(_reference(block, drop_path_rate=0.4, **kwargs), case, train=True)


def test_combined_training_mode_parity() -> None:
    _check(_combined(drop_path_rate=0.4), "combined", train=True)


# ----------------------------------------------------------------------------------------------
# Initialisation: our fresh PEFT and head parameters against the reference's own, by
# distribution (different generators draw them). ViT-B width, so that each pooled tensor kind
# has 12k-150k values.

INIT_CASES = {
    "adapter_houlsby": dict(adapter_config=_adapter_cfg("post", dim=8, init="houlsby")),
    "adapter_lora": dict(adapter_config=_adapter_cfg("post", dim=8, init="lora")),
    "adapter_bert": dict(adapter_config=_adapter_cfg("houlsby", dim=8, init="bert")),
    # The reference's LoRA branches get the houlsby init whatever `init` says.
    "lora": dict(lora_config=_lora_cfg("qkvo", dim=8, bias=True, init="lora")),
    "vpt": dict(prompt_config=_prompt_cfg(50)),
}


@pytest.mark.parametrize("case", INIT_CASES)
def test_initialisation_matches_the_reference(case: str) -> None:
    torch.manual_seed(0)
    model = adapter_plus.VisionTransformerAdapter(
        img_size=32, patch_size=16, embed_dim=768, depth=2, num_heads=12, num_classes=100,
        **INIT_CASES[case],
    )  # fmt: skip
    module = VisionTransformer(vit_config_from_timm(model), *peft_specs_from_timm(model))
    images = np.zeros((1, 32, 32, 3), np.float32)
    fresh = to_adapter_plus(module.init(jax.random.key(0), images)["params"])
    reference = {n: p.detach() for n, p in model.named_parameters() if reference_trains(n)}
    assert fresh.keys() == reference.keys()

    def pooled(tree) -> dict[str, np.ndarray]:
        """Values of each tensor kind (the name without its block index), over all blocks."""
        kinds = defaultdict(list)
        for name, value in tree.items():
            kinds[re.sub(r"^blocks\.\d+\.", "", name)].append(np.ravel(value.numpy()))
        return {kind: np.concatenate(values) for kind, values in kinds.items()}

    ours, theirs = pooled(fresh), pooled(reference)
    for kind, ref in theirs.items():
        got = ours[kind]
        if np.all(ref == ref[0]):  # a constant init: zeros, ones
            np.testing.assert_array_equal(got, ref, err_msg=kind)
            continue
        ks = scipy.stats.ks_2samp(got, ref)
        print(f"\n{case} {kind}: {len(ref)} values, KS p={ks.pvalue:.2g}")
        assert ks.pvalue > 1e-4, (kind, ks)
        # The tails, where KS is weak (a normal cut at 3 std instead of 2 differs from it by
        # only 2% of the mass): with both samples from one distribution and of one size, about
        # one value of each lies beyond the other's largest |value|; 10 or more has odds < 1e-7.
        beyond = (np.abs(got) > np.abs(ref).max()).sum(), (np.abs(ref) > np.abs(got).max()).sum()
        assert max(beyond) <= 10, (kind, beyond)


# ----------------------------------------------------------------------------------------------
# Trainable parameter counts on ViT-B/16 with a 47-class head.


def _counts(monkeypatch: pytest.MonkeyPatch, **peft) -> tuple[int, int]:
    """(reference trainable count, trainable_mask count) for ViT-B/16 with 47 classes, without
    materializing either model's weights."""
    linspace = torch.linspace
    # timm reads its drop-path rates with .item(), which meta tensors cannot do.
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **k, device="cpu"))
    with torch.device("meta"):
        model = adapter_plus.VisionTransformerAdapter(num_classes=47, **peft)
    trainable = freeze_like_reference(model)
    n_ref = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    module = VisionTransformer(vit_config_from_timm(model), *peft_specs_from_timm(model))
    return n_ref, trainable_count(abstract_params(module))


@pytest.mark.parametrize(
    ("peft", "expected"),
    [
        # 12 (1537 r + 1536) + 769 C, docs/recipe.md section 8
        ({"adapter_config": _adapter_cfg(dim=8)}, 202_127),
        # 12 blocks x 2 branches x (768 * 8 * 2) + head
        ({"lora_config": _lora_cfg("qk", dim=8)}, 12 * 2 * 2 * 768 * 8 + 769 * 47),
        # 12 blocks x 10 x 768 + head
        ({"prompt_config": _prompt_cfg(10)}, 12 * 10 * 768 + 769 * 47),
    ],
    ids=["adapter_plus_r8", "lora_r8_qk", "vpt_10"],
)
def test_trainable_counts_vit_b16(
    peft: dict, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    n_ref, n_ours = _counts(monkeypatch, **peft)
    print(f"\ntrainable: reference {n_ref:,}, trainable_mask {n_ours:,}")
    assert n_ref == n_ours == expected
