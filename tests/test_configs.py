"""Experiment configs against the paper's recipe, written out here as tables.

The tables are typed in from the recipe (the paper's configs: base settings, per-task adapter
ranks and prompt counts, class counts), not read from the code under test, so that a changed
value in configs/, config.py, peft.py, vtab.py or fgvc.py fails here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from adapter_plus_jax import config as cfglib
from adapter_plus_jax import peft
from adapter_plus_jax.data.fgvc import FGVC
from adapter_plus_jax.data.vtab import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The recipe's base settings, shared by every VTAB-1k and FGVC experiment.
BASE = {
    "model.name": "vit_base_patch16_224.orig_in21k",
    "model.pretrained": True,
    "model.drop_path_rate": 0.1,
    "model.dtype": "bfloat16",  # Lightning's bf16-mixed
    "batch_size": 64,
    "epochs": 100,
    "warmup_epochs": 10,
    "lr": 1e-3,
    "lr_start_factor": 100.0,
    "lr_min_factor": 1000.0,
    "weight_decay": 1e-4,
    "label_smoothing": 0.0,
    "grad_clip": None,
    "seed": 18,
    "train_mode": "peft",
}

# task -> (classes, r of dim1-4, r of dim1-8, r of dim1-32, VPT tokens)
VTAB = {
    "cifar100": (100, 1, 1, 1, 10),
    "caltech101": (102, 4, 4, 4, 10),
    "dtd": (47, 2, 2, 2, 10),
    "flowers102": (102, 1, 1, 1, 1),
    "pet": (37, 4, 8, 8, 1),
    "svhn": (10, 4, 8, 16, 50),
    "sun397": (397, 1, 1, 1, 5),
    "camelyon": (2, 4, 8, 16, 100),
    "eurosat": (10, 2, 2, 2, 100),
    "resisc45": (45, 4, 8, 32, 10),
    "retinopathy": (5, 2, 8, 32, 1),
    "clevr_count": (8, 4, 4, 4, 100),
    "clevr_distance": (6, 2, 8, 8, 200),
    "dmlab": (6, 4, 8, 8, 100),
    "kitti": (4, 4, 8, 8, 100),
    "dsprites_position": (16, 4, 8, 32, 100),
    "dsprites_orientation": (16, 4, 4, 4, 100),
    "smallnorb_azimuth": (18, 4, 8, 32, 200),
    "smallnorb_elevation": (9, 4, 8, 8, 200),
}

# dataset -> (classes, r of dim1-32, VPT tokens)
FGVC_TABLE = {
    "cub": (200, 2, 10),
    "nabirds": (555, 2, 50),
    "oxfordflower": (102, 1, 5),
    "stanfordcars": (196, 32, 200),
    "stanforddogs": (120, 1, 100),
}

# Adapter+ (the paper's adapter config), LoRA (its experiment: r=8 on q and k, dropout before
# the branch; its `init: lora` never reaches the branches, which get the houlsby init) and VPT.
ADAPTER_PLUS = dict(
    config="post", act_layer=True, norm_layer=False, bias=True, init="houlsby",
    scaling="channel", attn_adapter=False, dropout=0.0, drop_path=0.1,
)  # fmt: skip
LORA = dict(
    location=("q", "k"), dim=8, act_layer=False, norm_layer=False, bias=False, init="houlsby",
    scaling=1.0, dropout=0.1, pre_dropout=True, drop_path=0.0,
)  # fmt: skip
VPT = dict(dropout=0.1, deep=True)


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(c, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c


def _fields(spec, expected: dict) -> dict:
    return {k: getattr(spec, k) for k in expected}


def _check_method(c, method: str, dim: int, tokens: int) -> None:
    """The method's PEFT settings and learning rate, as the recipe gives them."""
    present = {k for k in ("adapter", "lora", "prompt") if c.get(k) is not None}
    if method == "adapter_plus":
        assert present == {"adapter"}
        spec = peft.AdapterSpec.from_config(c.adapter)
        assert _fields(spec, ADAPTER_PLUS) == ADAPTER_PLUS and spec.dim == dim
    elif method == "lora":
        assert present == {"lora"}
        assert _fields(peft.LoRASpec.from_config(c.lora), LORA) == LORA
    elif method == "vpt":
        assert present == {"prompt"}
        spec = peft.PromptSpec.from_config(c.prompt)
        assert _fields(spec, VPT) == VPT and spec.num_tokens == tokens
    else:
        assert present == set()
    expected_mode = {"linear": "linear", "finetune": "finetune"}.get(method, "peft")
    assert c.train_mode == expected_mode
    assert c.lr == (1e-4 if method == "finetune" else 1e-3)


@pytest.mark.parametrize("method", ["adapter_plus", "lora", "vpt", "linear", "finetune"])
def test_every_vtab_task_and_method(method: str) -> None:
    vtab = _module("vtab")
    assert set(TASKS) == set(VTAB)
    for task, (classes, _, _, r, tokens) in VTAB.items():
        assert TASKS[task].num_classes == classes, task
        c = vtab.get_config(f"{task},method={method}")
        assert (c.task, c.dataset, c.train_split, c.eval_split) == (
            task, "vtab", "train800val200", "test",
        )  # fmt: skip
        base = {k: v for k, v in BASE.items() if k not in ("lr", "train_mode")}
        assert {k: _get(c, k) for k in base} == base, task
        _check_method(c, method, r, tokens)


@pytest.mark.parametrize(("dims", "column"), [("dim1-4", 1), ("dim1-8", 2), ("dim1-32", 3)])
def test_vtab_per_task_ranks(dims: str, column: int) -> None:
    vtab = _module("vtab")
    for task, row in VTAB.items():
        assert vtab.get_config(f"{task},dims={dims}").adapter.dim == row[column], task


def test_base_recipe() -> None:
    c = cfglib.base_config()
    assert {k: _get(c, k) for k in BASE} == BASE
    assert (c.train_split, c.eval_split) == ("train800val200", "test")


def test_vtab_arguments() -> None:
    vtab = _module("vtab")
    assert vtab.get_config("svhn,dim=8").adapter.dim == 8
    assert vtab.get_config("svhn,seed=45").seed == 45
    assert vtab.get_config("svhn,method=vpt,tokens=7").prompt.num_tokens == 7
    with pytest.raises(ValueError, match="Unknown config argument 'depth'"):
        vtab.get_config("dtd,depth=3")
    with pytest.raises(ValueError, match="Unknown dims"):
        vtab.get_config("dtd,dims=dim1-64")


@pytest.mark.parametrize("method", ["adapter_plus", "lora", "vpt", "linear", "finetune"])
def test_every_fgvc_dataset_and_method(method: str) -> None:
    fgvc = _module("fgvc")
    assert set(FGVC) == set(FGVC_TABLE)
    for name, (classes, r, tokens) in FGVC_TABLE.items():
        assert FGVC[name].num_classes == classes, name
        c = fgvc.get_config(f"{name},method={method}")
        assert (c.task, c.dataset, c.train_split, c.eval_split) == (
            name, "fgvc", "trainval", "test",
        )  # fmt: skip
        base = {k: v for k, v in BASE.items() if k not in ("lr", "train_mode")}
        assert {k: _get(c, k) for k in base} == base, name
        _check_method(c, method, r, tokens)


def test_fgvc_and_demo_configs() -> None:
    with pytest.raises(ValueError, match="Unknown FGVC dataset"):
        _module("fgvc").get_config("flowers")
    demo = _module("demo").get_config()
    assert demo.dataset == "demo" and not demo.model.pretrained


@pytest.mark.parametrize("method", sorted(peft.METHODS))
def test_every_method_is_reachable_from_the_configs(method: str) -> None:
    """`configs/vtab.py:dtd,method=NAME` for every registered method (every adapter position
    of the reference among them); the ranks: dtd's r=2 for Adapter+, 8 for the others."""
    c = cfglib.load_config(f"configs/vtab.py:dtd,method={method}")
    expected = peft.METHODS[method].sized(dim=2 if method == "adapter_plus" else 8, num_tokens=10)
    assert (c.method, c.train_mode, c.lr) == (method, expected.train_mode, expected.lr)
    got = peft.Method(
        adapter=peft.AdapterSpec.from_config(c.adapter) if c.adapter else None,
        lora=peft.LoRASpec.from_config(c.lora) if c.lora else None,
        prompt=peft.PromptSpec.from_config(c.prompt) if c.prompt else None,
        train_mode=c.train_mode,
        lr=c.lr,
        tune=peft.TuneSpec.from_config(c.tune) if c.tune else None,
    )
    assert got == expected


def test_overrides_are_typed_by_what_they_replace() -> None:
    c = cfglib.load_config("vtab:dtd")
    cfglib.apply_overrides(
        c, ["lr=3e-3", "grad_clip=1.5", "model.remat=yes", "model.timm_kwargs.depth=3",
            "adapter.scaling=learned", "data_dir=/data"],
    )  # fmt: skip
    assert (c.lr, c.grad_clip, c.model.remat, c.model.timm_kwargs.depth) == (3e-3, 1.5, True, 3)
    assert (c.adapter.scaling, c.data_dir) == ("learned", "/data")
    for bad, message in [
        ("batch_size=abc", "expected int, got 'abc'"),
        ("model.remat=maybe", "expected true or false"),
        ("model.nope=1", "unknown key 'model.nope'"),
        ("modle.dtype=float32", "no 'modle'"),
        ("lr", "expected key=value"),
    ]:
        with pytest.raises(ValueError, match=message):
            cfglib.apply_overrides(c, [bad])


def test_packaged_configs_are_found_by_name() -> None:
    assert cfglib.load_config("fgvc.py:cub").task == "cub"
    assert cfglib.load_config("demo").dataset == "demo"
    names = r"\['demo', 'fgvc', 'folder', 'tfds', 'vtab'\]"
    with pytest.raises(ValueError, match=f"packaged configs are {names}"):
        cfglib.load_config("configs/imagenet.py:x")
