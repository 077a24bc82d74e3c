"""The prepared GPU check runs end to end: `benchmarks/gpu.sh --tiny` on this CPU, the same
parts as on a GPU (train step ours vs the reference, evaluation, the bfloat16 product forms,
input pipeline) at toy sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_tiny_mode_writes_every_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", str(out)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "# benchmarks/gpu.sh --tiny" in summary
    for table in ("| Train step | images/s |", "| Evaluation forward | images/s |"):
        assert table in summary
    assert "| reference (torch, " in summary and "| ours (jax) |" in summary
    assert "as runner.py gets them" in summary  # the input pipeline's table
    assert "| qkv 96->288 | float32 result + float32 bias, rounded once (ours) |" in summary
    assert (out / "train_step_b4" / "train_step_tiny_bfloat16.json").is_file()
