"""port_weights.py and adapter_plus_jax.pretrained: round trips timm -> checkpoint file -> ported
directory -> Flax, and one clear error (with nothing left on disk) per bad input.

Random weights only, no network. Tolerance: max |jax - torch| <= 1e-4 * (1 + max |torch|).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from adapter_plus_jax import port as port_weights
from adapter_plus_jax.pretrained import PretrainedError, load_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
NAME = "vit_tiny_patch16_224"
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------
# Helpers and fixtures.


def random_vit(num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """A timm ViT whose every parameter is perturbed, so that zero biases and unit norms cannot
    hide a wrong mapping."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=num_classes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# Jitted with the module static, so that tests with the same model share one compilation.
forward = jax.jit(lambda module, variables, x: module.apply(variables, x), static_argnums=0)


def images(size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def assert_close_to_torch(out_dir: Path, torch_model: torch.nn.Module, **load_kwargs) -> None:
    module, variables, cfg = load_pretrained(out_dir, **load_kwargs)
    x = images(module.config.img_size)
    with torch.no_grad():
        want = torch_model(x).numpy()
    got = np.asarray(forward(module, variables, x.permute(0, 2, 3, 1).numpy()))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())
    assert cfg["input_size"] == [3, *module.config.img_size]


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = port_weights.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_failed_cleanly(code: int, err: str, out_dir: Path, *expected: str) -> None:
    """Exit status 1, one message naming the problem, no traceback and nothing on disk."""
    assert code == 1
    assert err.startswith("apj port: error: ")
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert_nothing_left(out_dir)


def assert_nothing_left(out_dir: Path) -> None:
    assert not out_dir.exists()
    leftovers = [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_vit()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def ported(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ported") / "vit"
    assert port_weights.main(["--model", NAME, "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    return out


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    # Offline, with empty caches, so that nothing is downloaded or found by accident.
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "torch"),
    }


# ----------------------------------------------------------------------------------------------
# Round trips.


def test_cli_subprocess_round_trip(model, ckpt, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "port_weights.py", "--model", NAME, "--checkpoint", ckpt, "--out", out]
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "done in" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors"]
    assert_close_to_torch(out, model)
    saved = json.loads((out / "config.json").read_text())
    pretrained_cfg = saved["pretrained_cfg"]
    assert saved["model"]["num_classes"] == NUM_CLASSES
    assert pretrained_cfg["timm_name"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert pretrained_cfg["num_classes"] == NUM_CLASSES
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct"):
        assert key in pretrained_cfg


def test_round_trip_pth(model, tmp_path, capsys):
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    out = tmp_path / "out"
    code, stdout, err = run_main(["--model", NAME, "--checkpoint", path, "--out", out], capsys)
    assert code == 0, err
    assert "done in" in stdout
    assert_close_to_torch(out, model)


def test_reads_training_checkpoint(model, tmp_path):
    # A DistributedDataParallel training checkpoint: wrapped, with 'module.' key prefixes.
    state = model.state_dict()
    path = tmp_path / "train.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    read = port_weights.read_state_dict(path)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], v) for k, v in state.items())


def google_npz(path: Path, num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
    """A random ViT-Ti/16 checkpoint in the layout of Google's ViT .npz files (the names and
    shapes of google-research/vision_transformer's Flax model), written without timm."""
    rng = np.random.default_rng(seed)
    d, heads, mlp, depth, tokens = 192, 3, 768, 12, 197

    def w(*shape) -> np.ndarray:
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    def scale(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    arrays = {
        "embedding/kernel": w(16, 16, 3, d),
        "embedding/bias": w(d),
        "cls": w(1, 1, d),
        "Transformer/posembed_input/pos_embedding": w(1, tokens, d),
        "Transformer/encoder_norm/scale": scale(d),
        "Transformer/encoder_norm/bias": w(d),
        "head/kernel": w(d, num_classes),
        "head/bias": w(num_classes),
    }
    for i in range(depth):
        block = f"Transformer/encoderblock_{i}/"
        mha = block + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            arrays[f"{mha}{name}/kernel"] = w(d, heads, d // heads)
            arrays[f"{mha}{name}/bias"] = w(heads, d // heads)
        arrays[mha + "out/kernel"] = w(heads, d // heads, d)
        arrays[mha + "out/bias"] = w(d)
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}{norm}/scale"] = scale(d)
            arrays[f"{block}{norm}/bias"] = w(d)
        arrays[f"{block}MlpBlock_3/Dense_0/kernel"] = w(d, mlp)
        arrays[f"{block}MlpBlock_3/Dense_0/bias"] = w(mlp)
        arrays[f"{block}MlpBlock_3/Dense_1/kernel"] = w(mlp, d)
        arrays[f"{block}MlpBlock_3/Dense_1/bias"] = w(d)
    np.savez(path, **arrays)


def test_round_trip_npz(tmp_path, capsys):
    """A Google .npz checkpoint ported by port_weights.py computes what timm's own npz loader
    (`_load_weights`, through pretrained_cfg's `file`) makes of the same file."""
    path = tmp_path / "vit.npz"
    google_npz(path)
    out = tmp_path / "out"
    code, _, err = run_main(["--model", NAME, "--checkpoint", path, "--out", out], capsys)
    assert code == 0, err
    overlay = dict(file=str(path), num_classes=NUM_CLASSES)
    timm_model = timm.create_model(
        NAME, pretrained=True, num_classes=NUM_CLASSES, pretrained_cfg_overlay=overlay
    ).eval()
    head = np.load(path)["head/bias"]
    np.testing.assert_array_equal(timm_model.head.bias.detach().numpy(), head)  # timm read it
    assert_close_to_torch(out, timm_model)


def timm_at_size(ckpt: Path, img_size: int | tuple[int, int]) -> torch.nn.Module:
    """timm's own answer: the checkpoint loaded into a model built for `img_size`."""
    overlay = dict(file=str(ckpt), custom_load=False, num_classes=NUM_CLASSES)
    return timm.create_model(
        NAME,
        pretrained=True,
        img_size=img_size,
        num_classes=NUM_CLASSES,
        pretrained_cfg_overlay=overlay,
    ).eval()


@pytest.mark.parametrize("img_size", [160, (224, 160)])
def test_load_pretrained_resamples_pos_embed_like_timm(ckpt, ported, img_size):
    assert_close_to_torch(ported, timm_at_size(ckpt, img_size), img_size=img_size)


def test_cli_img_size(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_main(
        ["--model", NAME, "--checkpoint", ckpt, "--out", out, "--img-size", 160], capsys
    )
    assert code == 0, err
    assert "resampling pos_embed" in stdout
    assert_close_to_torch(out, timm_at_size(ckpt, 160))


def test_load_pretrained_new_head(tmp_path, capsys):
    # The paper's backbone (orig_in21k) has no head: port one without, then add 47 classes.
    headless = random_vit(num_classes=0)
    path = tmp_path / "in21k.safetensors"
    save_file(headless.state_dict(), str(path))
    out = tmp_path / "out"
    code, _, err = run_main(["--model", NAME, "--checkpoint", path, "--out", out], capsys)
    assert code == 0, err
    assert_close_to_torch(out, headless)  # pre-logit features

    module, variables, cfg = load_pretrained(out, num_classes=47, rng=jax.random.key(3))
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    assert kernel.shape == (192, 47) and cfg["num_classes"] == 47
    assert np.all(np.asarray(variables["params"]["head"]["bias"]) == 0)
    assert abs(kernel.mean()) < 2e-3 and 0.018 < kernel.std() < 0.022
    _, again, _ = load_pretrained(out, num_classes=47, rng=jax.random.key(3))
    assert np.array_equal(kernel, np.asarray(again["params"]["head"]["kernel"]))
    x = images().permute(0, 2, 3, 1).numpy()
    assert jax.eval_shape(module.apply, variables, x).shape == (2, 47)
    with pytest.raises(ValueError, match="rng"):
        load_pretrained(out, num_classes=47)


def test_load_pretrained_drops_head(model, ported):
    headless = copy.deepcopy(model)
    headless.reset_classifier(0)  # timm then returns the pre-logit features
    assert_close_to_torch(ported, headless, num_classes=0)


# ----------------------------------------------------------------------------------------------
# Bad inputs: a clear message, exit status 1, and no output or temporary directory left.


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vit_tiny_patch16_225", ["Unknown timm model", "vit_tiny_patch16_224"]),
        ("not_a_model.some_tag", ["Unknown timm model", "timm.list_models("]),
        ("vit_tiny_patch16_224.bogus", ["no pretrained tag 'bogus'", "augreg_in21k"]),
    ],
)
def test_unknown_model(tmp_path, capsys, name, expected):
    out = tmp_path / "out"
    code, _, err = run_main(["--model", name, "--out", out], capsys)
    assert_failed_cleanly(code, err, out, *expected)


def test_unsupported_architecture(tmp_path, capsys):
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False)
    path = tmp_path / "eva.safetensors"
    save_file(eva.state_dict(), str(path))
    out = tmp_path / "out"
    code, _, err = run_main(
        ["--model", "eva02_tiny_patch14_224", "--checkpoint", path, "--out", out], capsys
    )
    assert_failed_cleanly(code, err, out, "Unsupported architecture", "Eva")


def _bad_state_dict(model: torch.nn.Module, problem: str) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if problem == "missing":
        del state["blocks.1.attn.qkv.weight"]
    elif problem == "extra":
        state["blocks.1.attn.extra.weight"] = torch.zeros(3)
    else:
        state["blocks.1.mlp.fc1.bias"] = torch.zeros(5)
    return state


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing", ["missing keys (1)", "blocks.1.attn.qkv.weight"]),
        ("extra", ["unexpected keys (1)", "blocks.1.attn.extra.weight"]),
        ("shape", ["wrong shapes (1)", "blocks.1.mlp.fc1.bias (5,) (model: (768,))"]),
    ],
)
def test_checkpoint_keys_do_not_match(model, tmp_path, capsys, problem, expected):
    path = tmp_path / "bad.safetensors"
    save_file(_bad_state_dict(model, problem), str(path))
    out = tmp_path / "out"
    code, _, err = run_main(["--model", NAME, "--checkpoint", path, "--out", out], capsys)
    assert_failed_cleanly(code, err, out, "Checkpoint does not match the model", *expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
def test_truncated_checkpoint(model, tmp_path, capsys, suffix):
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    elif suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        google_npz(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, _, err = run_main(["--model", NAME, "--checkpoint", path, "--out", out], capsys)
    assert_failed_cleanly(code, err, out, f"Cannot read checkpoint {path}", "truncated")


def test_checkpoint_not_found(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.safetensors"
    code, _, err = run_main(["--model", NAME, "--checkpoint", missing, "--out", out], capsys)
    assert_failed_cleanly(code, err, out, f"Checkpoint {missing} does not exist")


def test_offline_without_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "port_weights.py", "--model", NAME, "--out", str(out)],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Could not get the pretrained weights of vit_tiny_patch16_224" in proc.stderr
    assert "--checkpoint FILE" in proc.stderr
    # Offline proper, or (timm 1.0.12 with huggingface_hub 2.x) a hub that timm cannot import.
    assert "No network" in proc.stderr or "cannot import it" in proc.stderr
    assert_nothing_left(out)


def test_refuses_non_empty_out_dir(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_main(["--model", NAME, "--checkpoint", ckpt, "--out", out], capsys)
    assert code == 1 and "--overwrite" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# save_pretrained / load_pretrained on their own.


def test_save_pretrained_overwrite_and_atomicity(ported, tmp_path, monkeypatch):
    module, variables, cfg = load_pretrained(ported)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(out, module.config, variables["params"], cfg)
    save_pretrained(out, module.config, variables["params"], cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    # A failure while writing leaves neither a new directory nor a temporary one.
    import safetensors.numpy

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    new = tmp_path / "new"
    with pytest.raises(OSError, match="No space"):
        save_pretrained(new, module.config, variables["params"], cfg)
    assert_nothing_left(new)

    with pytest.raises(ValueError, match="params do not fit the config"):
        save_pretrained(new, module.config.replace(depth=11), variables["params"], cfg)
    assert_nothing_left(new)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize(
    "damage, error, expected",
    [
        ("no_dir", FileNotFoundError, "No saved model directory"),
        ("no_params", FileNotFoundError, "params.safetensors is missing"),
        ("truncated", PretrainedError, "truncated or corrupt"),
        ("bad_json", PretrainedError, "Cannot parse"),
        ("bad_field", PretrainedError, "Unknown ViTConfig field"),
        ("wrong_depth", PretrainedError, "does not match"),
    ],
)
def test_load_pretrained_errors(ported, tmp_path, damage, error, expected):
    path = tmp_path / "missing" if damage == "no_dir" else _copy(ported, tmp_path / "copy")
    params, config = path / "params.safetensors", path / "config.json"
    if damage == "no_params":
        params.unlink()
    elif damage == "truncated":
        params.write_bytes(params.read_bytes()[:1000])
    elif damage == "bad_json":
        config.write_text('{"model": ')
    elif damage in ("bad_field", "wrong_depth"):
        doc = json.loads(config.read_text())
        doc["model"].update({"colour": 1} if damage == "bad_field" else {"depth": 11})
        config.write_text(json.dumps(doc))
    with pytest.raises(error, match=expected):
        load_pretrained(path)
