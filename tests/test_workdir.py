"""What a run's working directory survives: reruns of finished runs, --eval_only, changed
configs, damaged checkpoints, a second process, a full disk, kills at random points; and what
the console shows.

In-process runs share one finished 3-epoch run (`finished`), copied per test; subprocess runs go
through main.py as a user's would.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from runs import ROOT, TINY, checkpoint_steps, final_state, main_process, tiny_demo

from adapter_plus_jax import runner
from adapter_plus_jax.checkpoint import DAMAGED_DIR
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.workdir import WorkdirLock, read_metrics

EPOCHS, STEPS = 3, 20  # the shared run: 3 epochs of 20 steps, a checkpoint after each


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run (checkpoints of steps 40 and 60 kept, results.json written)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    runner.run(tiny_demo(EPOCHS), workdir)
    assert checkpoint_steps(workdir) == [40, 60]
    return workdir


def copy_of(finished: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    return workdir


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert int(sa["step"]) == int(sb["step"])
    jax.tree.map(np.testing.assert_array_equal, sa, sb)


def snapshot(workdir: Path) -> dict[str, bytes]:
    return {n: (workdir / n).read_bytes() for n in ("results.json", "metrics.jsonl")}


# ----------------------------------------------------------------------------------------------
# 0. Finished runs, --eval_only, bad values, the console.


def test_rerunning_a_finished_run_prints_its_results(finished, tmp_path, capsys) -> None:
    workdir = copy_of(finished, tmp_path)
    before = snapshot(workdir)
    results = runner.run(tiny_demo(EPOCHS), workdir)
    assert "this run is complete (3/3 epochs)" in capsys.readouterr().out
    assert results == json.loads(before["results.json"])
    assert snapshot(workdir) == before


def test_eval_only_writes_beside_the_training_record(finished, tmp_path) -> None:
    workdir = copy_of(finished, tmp_path)
    before = snapshot(workdir)
    evaluated = runner.run(tiny_demo(EPOCHS), workdir, eval_only=True)
    assert snapshot(workdir) == before  # results.json and metrics.jsonl untouched
    written = json.loads((workdir / "eval.json").read_text())
    assert written == evaluated
    assert written["checkpoint_step"] == 60 and written["checkpoint_epoch"] == EPOCHS
    assert written["test_accuracy"] == json.loads(before["results.json"])["test_accuracy"]


def test_a_killed_evaluation_is_finished_by_the_rerun(finished, tmp_path) -> None:
    workdir = copy_of(finished, tmp_path)
    expected = json.loads((workdir / "results.json").read_text())
    (workdir / "results.json").unlink()  # killed after the last checkpoint, before results
    results = runner.run(tiny_demo(EPOCHS), workdir)
    assert results["test_accuracy"] == expected["test_accuracy"]
    # The time recorded with the last checkpoint: all but that save and the evaluation.
    assert 0 < results["train_time_s"] <= expected["train_time_s"]
    assert checkpoint_steps(workdir) == [40, 60]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eval_only"], "--eval-only: no checkpoint in"),  # the old spelling still works
        (["--config.batch_size=-3"], "batch_size=-3 (expected a positive integer)"),
        (["--config.lr=0"], "lr=0.0 (expected a positive number)"),
        (["--config.adapter.dim=0"], "adapter: Bad PEFT config field 'dim'"),
        (
            ["--config.model.dtype=bfloat16", "--config.model.attention=cudnn"],
            "attention='cudnn' needs an NVIDIA GPU; JAX computes on cpu here",
        ),
    ],
    ids=["eval_only_empty", "batch_size", "lr", "adapter_dim", "cudnn_on_cpu"],
)
def test_bad_input_fails_in_one_line_and_leaves_nothing(tmp_path, args, message) -> None:
    (tmp_path / "empty").mkdir()
    for workdir in (tmp_path / "new", tmp_path / "empty"):
        out, _ = main_process(workdir, "--config=configs/demo.py", *args).communicate(timeout=120)
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("main.py: error: "), out
        assert message in out
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# 1. A changed config.


def test_a_changed_config_is_refused_before_any_compute(finished, tmp_path, monkeypatch) -> None:
    workdir = copy_of(finished, tmp_path)
    config = tiny_demo(EPOCHS + 1)
    config.lr, config.adapter.dim = 0.02, 4
    monkeypatch.setattr(runner, "setup", lambda *a: pytest.fail("setup ran"))
    with pytest.raises(SetupError) as e:
        runner.run(config, workdir)
    message = str(e.value)
    for change in ("adapter.dim: 8 -> 4", "epochs: 3 -> 4", "lr: 0.01 -> 0.02"):
        assert change in message
    assert "another --workdir" in message and "--allow-config-change" in message
    assert checkpoint_steps(workdir) == [40, 60]


def test_fields_that_may_change_on_resume(finished, tmp_path) -> None:
    workdir = copy_of(finished, tmp_path)
    config = tiny_demo(EPOCHS)
    config.log_every_steps, config.eval_batch_size, config.model.remat = 7, 50, True
    assert runner.run(config, workdir)["test_accuracy"] is not None  # complete, not refused


def test_a_changed_config_continues_on_purpose(finished, tmp_path, capsys) -> None:
    workdir = copy_of(finished, tmp_path)
    results = runner.run(tiny_demo(EPOCHS + 1), workdir, allow_config_change=True)
    out = capsys.readouterr().out
    assert "continuing with changed config: epochs: 3 -> 4" in out and "at epoch 3" in out
    assert checkpoint_steps(workdir) == [60, 80] and results["epochs"] == EPOCHS + 1


def test_a_checkpoint_from_before_padded_heads_resumes_unpadded(finished, tmp_path) -> None:
    """A checkpoint whose config has no model.head_width (made before heads were padded) and
    no tune (made before the tuning methods) continues as it was made, unpadded, without a
    config-change refusal."""
    import copy

    from adapter_plus_jax.workdir import check_resume, config_record

    saved = copy.deepcopy(config_record(tiny_demo(EPOCHS)))
    del saved["model"]["head_width"]
    del saved["tune"]  # added later too: an older checkpoint has no such field

    class Old:
        directory = tmp_path / "checkpoints"

        def find_good(self):
            return 60, {"epoch": EPOCHS, "config": saved}

    config = tiny_demo(EPOCHS)
    assert config.model.head_width == 0
    resume = check_resume(Old(), config, allow_config_change=False)
    assert (resume.step, resume.epoch, config.model.head_width) == (60, EPOCHS, -1)
    saved["model"]["head_width"] = 0  # a checkpoint of today: a changed width is refused
    config.model.head_width = 7
    with pytest.raises(SetupError, match="head_width: 0 -> 7"):
        check_resume(Old(), config, allow_config_change=False)


# ----------------------------------------------------------------------------------------------
# 2. Damaged checkpoints; 5. a full disk.


def _damage(step_dir: Path, how: str) -> None:
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file())
    data = [p for p in files if p.parent.name == "d"]  # the arrays' chunks
    if how == "deleted":
        for p in data:
            p.unlink()
    elif how == "zeroed":
        for p in data:
            p.write_bytes(bytes(p.stat().st_size))
    elif how == "half_copied":
        for p in files[len(files) // 2 :]:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        shutil.rmtree(step_dir / "meta")


@pytest.mark.parametrize("how", ["deleted", "zeroed", "half_copied"])
def test_a_damaged_checkpoint_falls_back_to_the_last_good_one(
    finished, tmp_path, capsys, how
) -> None:
    workdir = copy_of(finished, tmp_path)
    (workdir / "results.json").unlink()
    _damage(workdir / "checkpoints" / "60", how)
    runner.run(tiny_demo(EPOCHS), workdir)
    out = capsys.readouterr().out
    assert "checkpoint" in out and "60 is damaged" in out.replace(os.sep, " ")
    assert "Falling back to the checkpoint of step 40" in out and "at epoch 2" in out
    assert [p.name.split("-")[0] for p in (workdir / DAMAGED_DIR).iterdir()] == ["60"]
    assert_same_state(workdir, finished)  # epoch 3 trained again, to the same parameters
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert len(steps) == len(set(steps)) and max(steps) == 60


def test_no_checkpoint_left_stops_with_a_message(finished, tmp_path) -> None:
    workdir = copy_of(finished, tmp_path)
    for step in (40, 60):
        _damage(workdir / "checkpoints" / str(step), "zeroed")
    with pytest.raises(SetupError, match=r"No checkpoint in .* can be restored \(steps 60, 40"):
        runner.run(tiny_demo(EPOCHS), workdir)
    assert checkpoint_steps(workdir) == [40, 60]  # nothing moved or deleted


def test_a_full_disk_keeps_the_previous_checkpoint(finished, tmp_path, monkeypatch) -> None:
    workdir = tmp_path / "run"
    handler = ocp.handlers.JsonCheckpointHandler
    original, calls = handler._save_fn, []

    async def full_on_second_save(self, x, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, x, directory)

    monkeypatch.setattr(handler, "_save_fn", full_on_second_save)
    with pytest.raises(runner.SetupError) as e:
        runner.run(tiny_demo(EPOCHS), workdir)
    assert "No space left on device" in str(e.value) and "(step 20) is kept" in str(e.value)
    assert checkpoint_steps(workdir) == [20]
    monkeypatch.setattr(handler, "_save_fn", original)
    runner.run(tiny_demo(EPOCHS), workdir)  # resumes from step 20
    assert_same_state(workdir, finished)


def test_ctrl_c_during_a_save_stops_after_it(tmp_path, monkeypatch) -> None:
    """Ctrl-C while Orbax writes a checkpoint (sent from its writer thread) raises
    KeyboardInterrupt once the checkpoint is complete; without the deferral the step was left
    unwritten."""
    from adapter_plus_jax.checkpoint import Checkpointer

    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn

    async def interrupted_save(self, x, directory):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the main thread is waiting for this thread when the signal lands
        return await original(self, x, directory)

    monkeypatch.setattr(handler, "_save_fn", interrupted_save)
    state = {"w": np.arange(6, dtype=np.float32)}
    # Ctrl-C as in a terminal, also where pytest was started with SIGINT ignored (`pytest &`).
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            Checkpointer(tmp_path).save(7, state, {"epoch": 1})
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)
    monkeypatch.setattr(handler, "_save_fn", original)
    restored, meta = Checkpointer(tmp_path, read_only=True).read(7)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta["epoch"] == 1


# ----------------------------------------------------------------------------------------------
# 3. One run per workdir.


def test_a_second_run_is_refused_naming_the_holder(tmp_path) -> None:
    tmp_path.mkdir(exist_ok=True)
    holder = WorkdirLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(SetupError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            WorkdirLock(tmp_path).acquire()
        with pytest.raises(SetupError, match="in use by another run"):
            runner.run(tiny_demo(EPOCHS), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]
    finally:
        holder.release()
    other = WorkdirLock(tmp_path)
    other.acquire()  # free again
    other.release()


def test_the_other_processes_of_a_multi_host_run_do_not_lock(finished, tmp_path, monkeypatch):
    workdir = copy_of(finished, tmp_path)
    holder = WorkdirLock(workdir)  # process 0 of the run
    holder.acquire()
    try:
        monkeypatch.setattr(runner.jax, "process_index", lambda: 1)
        assert runner.run(tiny_demo(EPOCHS), workdir)["test_accuracy"] is not None
    finally:
        holder.release()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from adapter_plus_jax.workdir import WorkdirLock
        WorkdirLock(Path({str(tmp_path)!r})).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(SetupError, match=f"pid {holder.pid} "):
        WorkdirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    lock.release()
    assert f"its last holder (pid {holder.pid} on host" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# 4, 7. Kills at random points: bit-identical, each step logged once; the console.

KILLER = """
import os, signal, sys
kind, n = os.environ["KILL_AT"].split(":")
import timm  # noqa: F401  (before TensorFlow)
import orbax.checkpoint as ocp
from adapter_plus_jax import workdir

def kill_on_call(owner, name, count):
    original, calls = getattr(owner, name), [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            if kind == "step":  # after the step's record is written
                original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)

if kind == "step":
    kill_on_call(workdir.Logger, "write", int(n))
else:  # in the middle of a save: the state written into the temporary directory, not the meta
    kill_on_call(ocp.handlers.JsonCheckpointHandler, "_save_fn", int(n))
sys.argv = ["main.py", *sys.argv[1:]]
exec(compile(open(os.environ["MAIN"]).read(), "main.py", "exec"))
"""


def _tensorboard_steps(workdir: Path, tag: str) -> list[int]:
    import tensorflow as tf

    steps = []
    for path in sorted((workdir / "tensorboard").glob("events.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_killed_at_random_points_ends_bit_identical(tmp_path) -> None:
    epochs = 6
    args = [f"--config=configs/demo.py:epochs={epochs}", *TINY, "--config.warmup_epochs=1",
            "--config.log_every_steps=1"]  # fmt: skip
    uninterrupted = main_process(tmp_path / "a", *args, "--verbose")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    rng = np.random.default_rng(0)
    points = [("step", int(rng.integers(1, 2 * STEPS))) if i % 2 == 0
              else ("save", int(rng.integers(1, 3))) for i in range(5)]  # fmt: skip
    for kind, n in points:
        env = {"KILL_AT": f"{kind}:{n}", "MAIN": str(ROOT / "main.py"), "PYTHONPATH": str(ROOT)}
        killed = main_process(tmp_path / "b", *args, env_extra=env, script=script)
        out, _ = killed.communicate(timeout=300)
        assert killed.returncode == -signal.SIGKILL, f"{kind}:{n} did not kill: {out}"
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = main_process(tmp_path / "b", *args)
    out_resumed, _ = resumed.communicate(timeout=300)
    out_full, _ = uninterrupted.communicate(timeout=300)
    assert resumed.returncode == 0 and uninterrupted.returncode == 0, out_resumed + out_full
    assert "Resumed from" in out_resumed

    assert_same_state(tmp_path / "a", tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a["test_accuracy"] == b["test_accuracy"] and b["epochs"] == epochs
    # Each step logged once, with the uninterrupted run's values; TensorBoard one curve.
    full, rerun = ({r["step"]: r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r}
                   for d in "ab")  # fmt: skip
    steps_b = [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert len(steps_b) == len(set(steps_b)) == epochs * STEPS and rerun == full
    tb = _tensorboard_steps(tmp_path / "b", "loss")
    assert sorted(tb) == sorted(set(tb)) == sorted(steps_b)

    # The console: the run's own lines; other libraries' logs in log.txt (or with --verbose).
    # Orbax logs through absl on every platform (JAX's backend probes may be off: JAX_PLATFORMS).
    assert "INFO" not in out_resumed and "absl" not in out_resumed, out_resumed
    assert "test accuracy" in out_resumed and "Resumed from" in out_resumed
    log = (tmp_path / "b" / "log.txt").read_text()
    assert " INFO absl: " in log
    assert "INFO:absl:" in out_full  # --verbose shows them
