"""Experiment configs: every task x method builds valid PEFT specs with the paper's settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from adapter_plus_jax import config as cfglib
from adapter_plus_jax import peft
from adapter_plus_jax.vtab import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", cfglib.METHODS)
def test_every_vtab_task_and_method(method: str) -> None:
    vtab = _module("vtab")
    assert set(vtab.TASK_SETTINGS) == set(TASKS)
    for task in TASKS:
        c = vtab.get_config(f"{task},method={method}")
        assert (c.task, c.dataset, c.train_split, c.eval_split) == (
            task,
            "vtab",
            "train800val200",
            "test",
        )
        if method == "adapter_plus":
            assert peft.AdapterSpec.from_config(c.adapter).dim == vtab.TASK_SETTINGS[task][2]
        if method == "vpt":
            assert peft.PromptSpec.from_config(c.prompt).num_tokens == vtab.TASK_SETTINGS[task][3]
        if method == "lora":
            assert peft.LoRASpec.from_config(c.lora).location == ("q", "k")
        assert c.lr == (1e-4 if method == "finetune" else 1e-3)


def test_vtab_arguments() -> None:
    vtab = _module("vtab")
    assert vtab.get_config("svhn,dims=dim1-4").adapter.dim == 4
    assert vtab.get_config("svhn,dim=8").adapter.dim == 8
    assert vtab.get_config("svhn,seed=45").seed == 45
    assert vtab.get_config("dtd").adapter.drop_path == 0.1  # Adapter+ defaults
    with pytest.raises(ValueError, match="Unknown config argument 'depth'"):
        vtab.get_config("dtd,depth=3")
    with pytest.raises(ValueError, match="Unknown dims"):
        vtab.get_config("dtd,dims=dim1-64")


def test_fgvc_and_demo_configs() -> None:
    fgvc = _module("fgvc")
    assert fgvc.get_config("stanfordcars").adapter.dim == 32
    assert fgvc.get_config("nabirds,method=vpt").prompt.num_tokens == 50
    with pytest.raises(ValueError, match="Unknown FGVC dataset"):
        fgvc.get_config("flowers")
    demo = _module("demo").get_config()
    assert demo.dataset == "demo" and not demo.model.pretrained
