"""The library as users meet it: the README's "Use Adapter+ in your own JAX project" block run as
written, the root API without torch or TensorFlow, an installed copy outside the repository,
and `create_model`'s defaults and errors against the reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict
from reference import ADAPTER_PLUS, LORA, VPT, freeze_like_reference, reference_vit

import adapter_plus_jax as apj
from adapter_plus_jax.config import spec_config

ROOT = Path(__file__).resolve().parents[1]
# A small stand-in for the paper's backbone: ViT-Ti/16 at 64x64, 2 blocks, no head.
TINY = dict(img_size=64, depth=2)

# Run first in a subprocess: any import of torch, TensorFlow or timm fails.
BLOCK_TORCH_AND_TF = textwrap.dedent(
    """
    import sys
    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "tensorflow", "timm"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _Blocked())
    """
)


@pytest.fixture(scope="module")
def ported(tmp_path_factory) -> Path:
    """A random ViT-Ti/16 ported like port_weights.py does, as ported/vit_b16_in21k."""
    root = tmp_path_factory.mktemp("project")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    module, variables = apj.from_timm(model)
    path = root / "ported" / "vit_b16_in21k"
    apj.save_pretrained(path, module.config, variables["params"], model.pretrained_cfg)
    return path


def _run_blocked(code: str, cwd: Path) -> str:
    """Run `code` with torch, TensorFlow and timm blocked, in `cwd`, the package importable (as
    if installed: this checkout is not installed in the test environment)."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH_AND_TF + code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _readme_blocks() -> list[str]:
    """The Python blocks of the README's section "Use Adapter+ in your own JAX project"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use Adapter+ in your own JAX project", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_linen_block_trains_with_root_exports_only(ported) -> None:
    """The README's Linen loop, as written, in a project directory with torch and TensorFlow
    blocked: it trains, and trains exactly the parameters adapter-plus would."""
    out = _run_blocked(_readme_blocks()[0], cwd=ported.parents[1])
    reference = reference_vit(
        adapter=ADAPTER_PLUS, patch_size=16, embed_dim=192, num_heads=3, num_classes=10, **TINY
    )
    n_reference = sum(
        p.numel() for n, p in reference.named_parameters() if n in freeze_like_reference(reference)
    )
    assert f"{n_reference:,} trainable parameters" in out, out
    losses = [float(x) for x in re.findall(r"step \d: loss ([\d.]+)", out)]
    assert len(losses) == 3 and all(np.isfinite(losses)), out


def test_readme_nnx_block_trains_and_predicts(ported) -> None:
    """The README's NNX loop, as written, with torch and TensorFlow blocked."""
    out = _run_blocked(_readme_blocks()[1], cwd=ported.parents[1])
    losses = [float(x) for x in re.findall(r"step \d: loss ([\d.]+)", out)]
    assert len(losses) == 3 and all(np.isfinite(losses)), out
    assert out.strip().splitlines()[-1] == "(8, 10)", out


def test_core_needs_neither_torch_nor_tensorflow(ported) -> None:
    """Loading a ported directory, create_model (LoRA), the library's train step and
    merge_lora, with torch, TensorFlow and timm unimportable."""
    code = f"""
import jax, jax.numpy as jnp, numpy as np
import adapter_plus_jax as apj
from adapter_plus_jax import train
from adapter_plus_jax.params import merge, split
module, variables, cfg = apj.load_pretrained({str(ported)!r})
module, variables = apj.create_model({str(ported)!r}, num_classes=5, lora=apj.LoRASpec(),
                                     rng=jax.random.key(0))
params = variables["params"]
trainable, frozen = split(params, apj.trainable_mask(params))
tx = train.adamw(train.reference_lr(1e-2, 2, warmup_epochs=2, epochs=3))
state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
x = apj.normalize(np.full((4, 64, 64, 3), 100, np.uint8), module.config.mean, module.config.std)
state, metrics = train.make_train_step(module, tx)(state, frozen, x, jnp.arange(4))
trained = {{"params": merge(state.params, frozen)}}
merged_module, merged = apj.merge_lora(module, trained)
a, b = module.apply(trained, x), merged_module.apply(merged, x)
assert np.abs(a - b).max() <= 1e-5 * (1 + np.abs(a).max()), np.abs(a - b).max()
import sys
assert not {{m.split(".")[0] for m in sys.modules}} & {{"torch", "tensorflow", "timm"}}
print("ok", float(metrics["loss"]))
"""
    assert _run_blocked(code, cwd=ported.parent).startswith("ok")


def test_installed_copy_works_outside_the_repository(tmp_path) -> None:
    """`pip install .` (here: into a target directory, without dependencies) gives the `apj`
    command and a package that imports from anywhere and finds its configs and its porter, with
    the repository off sys.path."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    code = """
import sys
import adapter_plus_jax, adapter_plus_jax.port, adapter_plus_jax.suite
from adapter_plus_jax.config import load_config
assert adapter_plus_jax.__file__.startswith(sys.argv[1]), adapter_plus_jax.__file__
print(load_config("configs/vtab.py:dtd,method=pfeiffer").adapter.config,
      load_config("fgvc:cub").task)
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pfeiffer", "cub"]
    apj = subprocess.run(
        [str(site / "bin" / "apj"), "--help"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(site)}, timeout=300,
    )  # fmt: skip
    assert apj.returncode == 0, apj.stderr
    assert "usage: apj <command>" in apj.stdout and "\n  train " in apj.stdout


def test_default_specs_are_the_papers() -> None:
    """AdapterSpec() is Adapter+ as the reference configures it, LoRASpec() the paper's LoRA
    (whose branches get the houlsby init whatever its `init` says), PromptSpec() VPT-deep."""
    assert spec_config(apj.AdapterSpec()).to_dict() == {**ADAPTER_PLUS, "pre_dropout": False}
    lora = {k: v for k, v in LORA.items() if k not in ("config", "init")}
    assert {**lora, "init": "houlsby"} == spec_config(apj.LoRASpec()).to_dict()
    assert {**VPT, "deep": True} == spec_config(apj.PromptSpec()).to_dict()


def test_create_model_random_init_is_timms() -> None:
    """pretrained=False: timm's architecture and random init (seeded from rng), fresh PEFT."""
    module, variables = apj.create_model(
        "vit_tiny_patch16_224", num_classes=3, adapter=True, pretrained=False,
        rng=jax.random.key(7), drop_path_rate=0.2, **TINY,
    )  # fmt: skip
    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY)
    _, expected = apj.from_timm(model)
    got = flatten_dict(variables["params"], sep="/")
    expected = flatten_dict(expected["params"], sep="/")
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert sorted(set(got) - set(expected)) == [
        f"blocks_{i}/adapter/{p}" for i in range(2)
        for p in ("down/bias", "down/kernel", "scaling", "up/bias", "up/kernel")
    ]  # fmt: skip
    assert module.adapter == apj.AdapterSpec() and module.config.drop_path_rate == 0.2


def test_create_model_from_a_ported_directory(ported) -> None:
    module, variables = apj.create_model(
        ported, num_classes=7, prompt=dict(num_tokens=3), rng=0, dtype="bfloat16"
    )
    assert module.prompt == apj.PromptSpec(num_tokens=3)
    assert variables["params"]["head"]["kernel"].shape == (192, 7)
    assert module.dtype == np.dtype("bfloat16") and module.config.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(depth=2), ValueError, "only apply with pretrained=False"),
        (dict(adapter="yes"), TypeError, "Expected AdapterSpec"),
        (dict(adapter=dict(config="middle")), ValueError, "'config'"),
    ],
)
def test_create_model_rejects_bad_arguments(ported, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        apj.create_model(ported, num_classes=2, rng=0, **kwargs)


def test_create_model_without_weights_offline_says_how_to_port(tmp_path, hf_offline) -> None:
    with pytest.raises(apj.SetupError, match="apj port --model vit_tiny_patch16_224"):
        apj.create_model("vit_tiny_patch16_224", num_classes=2, rng=0, weights_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
