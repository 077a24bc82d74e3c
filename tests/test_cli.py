"""The `apj` command: its commands, one flag style, one way to set config fields, and the thin
wrappers main.py and port_weights.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_plus_jax import cli
from adapter_plus_jax.config import dashed, split_overrides

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "suite", "port", "export", "predict", "data")


def _apj(*args: str) -> subprocess.CompletedProcess:
    """`python -m adapter_plus_jax ARGS` (what the `apj` script runs) from outside the clone."""
    return subprocess.run(
        [sys.executable, "-m", "adapter_plus_jax", *args], cwd="/", capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_help_lists_every_command() -> None:
    done = _apj("--help")
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert f"\n  {name} " in done.stdout, done.stdout
    assert "--config.KEY=VALUE" in done.stdout
    assert tuple(cli.COMMANDS) == COMMANDS


def test_no_or_an_unknown_command_fails_in_one_line() -> None:
    done = _apj()
    assert done.returncode == 2 and done.stderr.startswith("usage: ")
    done = _apj("trian")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "python -m adapter_plus_jax: error: unknown command 'trian'; expected one of train, "
        "suite, port, export, predict, data (`python -m adapter_plus_jax --help`)."
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_dashed_flags(command: str, capsys) -> None:
    argv = {"suite": ["run", "--help"], "data": ["prepare", "--help"]}.get(command, ["--help"])
    with pytest.raises(SystemExit) as done:
        cli.main([command, *argv])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: apj {command}")
    flags = [w.strip("[],") for w in text.split() if w.startswith(("--", "[--"))]
    flags = [f for f in flags if not f.startswith("--config.")]  # config keys keep their names
    assert flags and not [f for f in flags if "_" in f.split("=")[0]], flags


def test_train_and_suite_take_config_fields_the_same_way(capsys) -> None:
    for argv in (["train", "--help"], ["suite", "run", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "--config.KEY=VALUE" in capsys.readouterr().out


def test_config_fields_in_both_forms_and_old_flag_spellings() -> None:
    overrides, rest = split_overrides(
        ["--config", "vtab.py:dtd", "--config.lr=3e-3", "--config.model.dtype", "float32",
         "--eval_only", "--config-args", "dim=2", "--workdir=runs/a_b"]
    )  # fmt: skip
    assert overrides == ["lr=3e-3", "model.dtype=float32"]
    assert dashed(rest) == [
        "--config", "vtab.py:dtd", "--eval-only", "--config-args", "dim=2", "--workdir=runs/a_b",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--config.lr needs a value"):
        split_overrides(["--config.lr"])


@pytest.mark.parametrize(
    "script, command", [("main.py", "train"), ("port_weights.py", "port")]
)
def test_root_scripts_are_the_commands(script: str, command: str, capsys) -> None:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    # The command's options, under the script's name.
    expected = capsys.readouterr().out
    assert done.stdout.startswith(f"usage: {script} ")
    assert done.stdout.split("options:")[1].split() == expected.split("options:")[1].split()
