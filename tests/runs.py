"""Helpers for tests that run main.py or runner.run on the offline demo (configs/demo.py:
scikit-learn digits as a local TFDS dataset, a random-init timm backbone), shrunk so that an
epoch (20 steps) takes well under a second."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.timm_kwargs.depth=1",
    "--config.model.timm_kwargs.patch_size=8",
    "--config.checkpoint_every_epochs=1",
]


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_demo(epochs: int = 3, arg: str = "") -> ml_collections.ConfigDict:
    """The demo config (with the config argument `arg`, e.g. 'method=lora') and TINY's values:
    1 block, checkpoints every epoch, warmup 1 epoch."""
    config = load_config("demo", f"epochs={epochs}" + (f",{arg}" if arg else ""))
    config.model.timm_kwargs.depth = 1
    config.model.timm_kwargs.patch_size = 8
    config.checkpoint_every_epochs = 1
    config.warmup_epochs = 1
    return config


def main_process(
    workdir: Path, *args: str, env_extra: dict | None = None, script: Path | None = None
) -> subprocess.Popen:
    """main.py (or `script`, which takes the same arguments) in a subprocess; output in .stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    cmd = [sys.executable, str(script or ROOT / "main.py"), f"--workdir={workdir}", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def final_state(workdir: Path) -> dict:
    """The newest checkpoint's state as numpy arrays, read with Orbax directly (not through our
    code), whatever devices and processes saved it."""
    path = workdir / "checkpoints" / str(checkpoint_steps(workdir)[-1]) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
