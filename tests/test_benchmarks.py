"""The prepared GPU check runs end to end: `benchmarks/gpu.sh --tiny` on this CPU, the same
parts as on a GPU (train step ours vs the reference, evaluation, the bfloat16 product forms,
input pipeline) at toy sizes."""

from __future__ import annotations

import os
import re
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
    assert "what runs get now" in summary  # the input pipeline's table
    assert "| qkv 96->288 | float32 result + float32 bias, rounded once (ours) |" in summary
    assert (out / "train_step_b4" / "train_step_tiny_bfloat16.json").is_file()
    # The accuracy test with this machine's default attention, an XLA option as a peer, our
    # step's optimized HLO and the kernel profile.
    assert re.search(r"ViT-Ti/16, attention=(xla|cudnn): logits", summary), summary
    assert "1 passed" in summary
    assert "| ours + fast_min_max |" in summary and "| ours + fast_min_max | skipped" not in summary
    assert (out / "hlo" / "ours_jax.hlo.txt.gz").stat().st_size > 10_000
    assert "| kernel family | ours | torch eager |" in summary
    assert "Ours by op class" in summary


NO_TF = 'raise ImportError("TensorFlow is not installed here (blocked by the test)")\n'


def test_gpu_e2e_script_tiny_mode_runs_without_tensorflow(tmp_path: Path) -> None:
    """`benchmarks/gpu_e2e.sh --tiny`: the folders, the run, the suite of 3 tasks, the isolated
    step and the summary with the projected VTAB-1k time, where tensorflow cannot be imported;
    --wheels with an empty folder installs nothing on this complete environment."""
    blocked, wheels, out = tmp_path / "no_tf", tmp_path / "wheels", tmp_path / "e2e"
    for name in ("tensorflow", "tensorflow_datasets"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(NO_TF)
    wheels.mkdir()
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(blocked), JAX_PLATFORMS="cpu")
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_e2e.sh"), "--tiny", "--wheels", str(wheels),
         str(out)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "nothing missing" in run.stdout
    summary = (out / "summary.md").read_text()
    assert summary in run.stdout
    assert "# benchmarks/gpu_e2e.sh --tiny" in summary
    assert "| steady images/s over the isolated step's (target >= 0.9) | n/a |" not in summary
    for line in ("| steady images/s over the isolated step's", "| input-wait fraction",
                 "| evaluation images/s |", "**Projected VTAB-1k suite time: "):  # fmt: skip
        assert line in summary, line
    assert (out / "run" / "results.json").is_file()
    runs = sorted(p.parent.parent.name for p in (out / "suite").glob("*/seed18/results.json"))
    assert runs == ["task0", "task1", "task2"]
    assert (out / "suite" / "results.md").is_file()
    for step in ("train_step", "eval_step"):  # the run's steps, for the suite to load
        assert list((out / "xla_cache").glob(f"jit_{step}-*")), step


def test_gpu_profile_reads_the_gpu_streams_of_a_trace(monkeypatch) -> None:
    """benchmarks/gpu_profile.py on a trace as jax writes one on a GPU: kernels on the device's
    process, each carrying its HLO instruction; the host's events of the same instruction are
    not device time, and kernels fall into families by name."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_profile

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 701, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "loop_convert_fusion", "dur": 10,
         "args": {"hlo_op": "add.3"}},
        {"ph": "X", "pid": 1, "name": "nvjet_hsh_256x128_2cta", "dur": 30,
         "args": {"hlo_op": "custom-call.7"}},
        {"ph": "X", "pid": 1, "name": "cudnn_generated_fort_native_sdpa_sm90", "dur": 20,
         "args": {"hlo_op": "custom-call.9"}},
        {"ph": "X", "pid": 701, "name": "add.3", "dur": 500},  # the host's launch of add.3
    ]  # fmt: skip
    op_names = {"add.3": "jit(train_step)/jvp(VisionTransformer)/blocks_0/add"}
    found = gpu_profile.our_device_events(events, op_names)
    assert [(name, hlo) for name, hlo, _ in found] == [
        ("loop_convert_fusion", "add.3"), ("nvjet_hsh_256x128_2cta", "custom-call.7"),
        ("cudnn_generated_fort_native_sdpa_sm90", "custom-call.9"),
    ]  # fmt: skip
    summary = gpu_profile.summarise([(n, us) for n, _, us in found], steps=2)
    assert summary["busy_ms"] == 0.03
    assert summary["families"] == {
        "element-wise and reductions": 0.005,
        "GEMM (cuBLAS, CUTLASS, Triton GEMM)": 0.015,
        "fused attention": 0.01,
    }
    assert summary["top"][0] == {"kernel": "nvjet_hsh_256x128_2cta", "ms": 0.015, "per_step": 0.5}

