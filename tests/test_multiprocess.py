"""Multi-process runs with real processes: JAX's CPU backend joins processes on this host
through its coordination service and gloo collectives, as hosts of a cluster would.

Each test starts `main.py --distributed` (or `apj suite run`) in 2 processes, with 1 or 2 CPU
devices each (XLA_FLAGS), and compares with one process that has as many devices.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from runs import ROOT, TINY, checkpoint_steps, final_state

from adapter_plus_jax import distributed
from adapter_plus_jax.workdir import read_metrics

EPOCHS, STEPS = 2, 25  # the demo's 1,000 training images in global batches of 40
TEST_EXAMPLES = 797  # the demo's test split: 399 + 398 examples in two processes
ARGS = ["--config.batch_size=40", "--config.eval_batch_size=100", *TINY]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from adapter_plus_jax.workdir import WorkdirLock
WorkdirLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    workdir: Path,
    devices: int,
    *args: str,
    process: tuple[int, int, int] | None = None,
    log: Path | None = None,
    script: tuple[str, ...] = ("main.py",),
) -> subprocess.Popen:
    """`script args` in a process with `devices` CPU devices; `process` (id, count, port): one
    process of a --distributed run. Output in `log` (default WORKDIR.<id>.log)."""
    # XLA's own CPU dots: programs with oneDNN's cannot be stored in the compilation cache,
    # and the runs here compile the same few programs again and again.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "ADAPTER_PLUS_JAX_CPU_DOTS": "xla",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}  # fmt: skip
    cmd = [sys.executable, *script, *args]
    if process is not None:
        i, n, port = process
        cmd += ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={n}", f"--process_id={i}"]  # fmt: skip
    log = log or workdir.with_name(f"{workdir.name}.{process[0] if process else 's'}.log")
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_ctrl_c_as_in_a_terminal)  # fmt: skip


def _ctrl_c_as_in_a_terminal() -> None:
    """The runs take SIGINT as a terminal's Ctrl-C, also where the suite itself was started in
    the background of a script (`pytest ... &`), whose children inherit SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def demo(workdir: Path, epochs: int, processes: int, devices: int) -> list[subprocess.Popen]:
    """The tiny demo in `processes` processes (1: without --distributed) of `devices` each."""
    args = [f"--config=configs/demo.py:epochs={epochs}", f"--workdir={workdir}", *ARGS]
    if processes == 1:
        return [start(workdir, devices, *args)]
    port = free_port()
    return [start(workdir, devices, *args, process=(i, processes, port)) for i in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def output(workdir: Path, which: int | str) -> str:
    return workdir.with_name(f"{workdir.name}.{which}.log").read_text()


def max_difference(a: Path, b: Path) -> float:
    sa, sb = final_state(a), final_state(b)
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x.astype(np.float64) - y), initial=0)),
                         sa, sb)  # fmt: skip
    return max(jax.tree.leaves(diffs))


def assert_written_once(workdir: Path, reference: Path, epochs: int) -> None:
    """The logged steps of the one-process run `reference`, once each, and one test accuracy in
    metrics.jsonl; results.json counts every test example once; the checkpoints of the last
    two epochs."""
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps == [r["step"] for r in read_metrics(reference) if "loss" in r]
    assert len(set(steps)) == len(steps) and steps[-1] == epochs * STEPS
    assert [r for r in read_metrics(workdir) if "test_accuracy" in r][0]["step"] == epochs * STEPS
    assert len([r for r in read_metrics(workdir) if "test_accuracy" in r]) == 1
    results = json.loads((workdir / "results.json").read_text())
    assert results["eval_examples"] == TEST_EXAMPLES
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert names == [str((epochs - 1) * STEPS), str(epochs * STEPS)]


def has_checkpoint(workdir: Path) -> bool:
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def kill_and_watch(
    procs: list[subprocess.Popen],
    workdir: Path,
    victim: int,
    ready: Callable[[], bool],
    sig: signal.Signals = signal.SIGKILL,
    within: float = 60,
) -> str:
    """Send `sig` to process `victim` of a 2-process run once `ready()`; the other must end with
    status 1 within `within` seconds, in exactly one error line (no traceback, no C++ stack):
    returned."""
    survivor = 1 - victim
    deadline = time.monotonic() + 240
    while not ready():
        assert time.monotonic() < deadline and procs[victim].poll() is None, output(workdir, victim)
        time.sleep(0.1)
    procs[victim].send_signal(sig)
    killed_at = time.monotonic()
    assert procs[survivor].wait(timeout=90) == 1
    assert time.monotonic() - killed_at < within
    text = output(workdir, survivor)
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in text and "@     0x" not in text, text
    procs[victim].wait()
    return errors[0]


# ----------------------------------------------------------------------------------------------
# 2. Two processes train as one.

FAULT_EPOCHS = 5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 2 processes with 1 CPU device each, FAULT_EPOCHS epochs."""
    workdir = tmp_path_factory.mktemp("two_processes") / "run"
    assert finish(demo(workdir, FAULT_EPOCHS, 2, 1)) == [0, 0], output(workdir, 0)
    return workdir


def test_two_processes_of_one_device_train_as_one_process_of_two(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """The same global batch and data order; the parameters bit-identical (a sum of two terms
    does not depend on their order)."""
    single = tmp_path / "single"
    assert finish(demo(single, FAULT_EPOCHS, 1, 2)) == [0], output(single, "s")
    assert max_difference(uninterrupted, single) == 0.0
    a, b = (json.loads((d / "results.json").read_text()) for d in (uninterrupted, single))
    assert a["test_accuracy"] == b["test_accuracy"] and a["devices"] == b["devices"] == 2
    assert_written_once(uninterrupted, single, FAULT_EPOCHS)
    assert (uninterrupted / "log.txt").is_file()
    assert (uninterrupted / "log.process1.txt").is_file()
    assert "Traceback" not in output(uninterrupted, 0) + output(uninterrupted, 1)


def test_two_processes_of_two_devices_train_as_one_process_of_four(tmp_path: Path) -> None:
    """Within 1e-6: the gradient all-reduce over gloo adds the four devices' terms in another
    order than XLA's in-process all-reduce. Predictions and the logged steps are the same."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert finish(demo(multi, EPOCHS, 2, 2)) == [0, 0], output(multi, 0) + output(multi, 1)
    assert finish(demo(single, EPOCHS, 1, 4)) == [0], output(single, "s")
    assert max_difference(multi, single) < 1e-6
    a, b = (json.loads((d / "results.json").read_text()) for d in (multi, single))
    assert a["test_accuracy"] == b["test_accuracy"] and a["devices"] == b["devices"] == 4
    assert_written_once(multi, single, EPOCHS)


# ----------------------------------------------------------------------------------------------
# 3. Faults across processes.


def test_a_killed_process_stops_the_other_and_the_run_resumes(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """SIGKILL the coordinator (process 0) mid-run: process 1 ends within 60 s with one line
    (from its watchdog, or from the parent when JAX's client ended it).
    A second 2-process run on the busy workdir is refused. Both rerun: the run resumes and ends
    bit-identical to the uninterrupted 2-process run; resumed by one process with both devices
    instead, it ends bit-identical too (the data order depends on the global batch only)."""
    epochs, killed = FAULT_EPOCHS, tmp_path / "killed"
    procs = demo(killed, epochs, 2, 1)
    line = kill_and_watch(procs, killed, 0, (killed / "checkpoints" / str(2 * STEPS)).is_dir)
    # Its watchdog or JAX's client, whichever notices first: one line either way.
    assert "coordinator" in line and "process 0" in line, line
    assert not (killed / "results.json").exists()
    other = tmp_path / "other"
    shutil.copytree(killed, other)

    # A second run on a busy workdir (its lock held as a running run holds it): refused by
    # both processes, in one line each.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(killed)], stdout=subprocess.PIPE, text=True
    )
    assert "locked\n" in iter(holder.stdout.readline, "")  # after "Taking over ..."
    busy, port = tmp_path / "busy", free_port()
    second = [start(busy, 1, f"--config=configs/demo.py:epochs={epochs}", f"--workdir={killed}",
                    *ARGS, process=(i, 2, port)) for i in range(2)]  # fmt: skip
    assert finish(second, 120) == [1, 1]
    for i in range(2):
        errors = [line for line in output(busy, i).splitlines() if "error" in line]
        assert len(errors) == 1 and "is in use by another run" in errors[0], output(busy, i)
    holder.kill()
    holder.wait()

    assert finish(demo(killed, epochs, 2, 1)) == [0, 0], output(killed, 0) + output(killed, 1)
    assert "Resumed from" in output(killed, 0)
    assert max_difference(uninterrupted, killed) == 0.0
    assert_written_once(killed, uninterrupted, epochs)

    assert finish(demo(other, epochs, 1, 2)) == [0], output(other, "s")
    assert "Resumed from" in output(other, "s")
    assert max_difference(uninterrupted, other) == 0.0


def test_the_other_process_stopping_ends_the_coordinator_in_one_line(tmp_path: Path) -> None:
    """SIGKILL process 1 while process 0 trains: process 0's watchdog misses its heartbeat
    and ends it within 60 s, in one line."""
    workdir = tmp_path / "run"
    procs = demo(workdir, 20, 2, 1)
    line = kill_and_watch(procs, workdir, 1, lambda: has_checkpoint(workdir))
    assert "process 1 of 2 stopped" in line, line


def test_process_0_interrupted_alone_tells_the_other_why(tmp_path: Path) -> None:
    """Ctrl-C on process 0 only, while the first checkpoint is being written: the checkpoint is
    completed, then process 0 ends with "interrupted." (status 130) and keeps the key-value
    store up until process 1 has read why; process 1 ends in one line naming the cause, long
    before a missed heartbeat (STALE_S) would have told it."""
    workdir = tmp_path / "run"
    procs = demo(workdir, 40, 2, 1)
    line = kill_and_watch(procs, workdir, 0, lambda: has_checkpoint(workdir), signal.SIGINT,
                          within=distributed.STALE_S)  # fmt: skip
    assert "process 0 of 2 failed: interrupted" in line, line
    assert procs[0].returncode == 130 and "interrupted." in output(workdir, 0)
    assert checkpoint_steps(workdir)[:1] == [STEPS]


# ----------------------------------------------------------------------------------------------
# 4. The suite as concurrent shard jobs on one workdir.


def test_suite_shards_run_as_concurrent_jobs_on_one_workdir(tmp_path: Path) -> None:
    """`suite run --shard 0/2` and `--shard 1/2` at once on one workdir (2 devices each): every
    (task, seed) is run once, and `suite report` writes what the report of the whole suite run
    by one job of 2 processes (`suite run --distributed`, 1 device each) says."""
    from test_pipeline import TINY_VIT, write_folder

    for task in ("t0", "t1"):
        write_folder(tmp_path / "tasks" / task)
    suite = ["-m", "adapter_plus_jax", "suite"]
    args = ["run", "--benchmark=folders", f"--root={tmp_path / 'tasks'}", "--seeds=18",
            "--config-args=epochs=2", *TINY_VIT, "--config.batch_size=6",
            "--config.eval_batch_size=4"]  # fmt: skip
    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    jobs = [start(sharded, 2, *args, f"--workdir={sharded}", f"--shard={i}/2", script=suite,
                  log=tmp_path / f"shard{i}.log") for i in range(2)]  # fmt: skip
    assert finish(jobs) == [0, 0], (tmp_path / "shard0.log").read_text()
    port = free_port()
    job = [start(whole, 1, *args, f"--workdir={whole}", script=suite, process=(i, 2, port))
           for i in range(2)]  # fmt: skip
    assert finish(job) == [0, 0], output(whole, 0) + output(whole, 1)
    logs = "".join((tmp_path / f"shard{i}.log").read_text() for i in range(2))
    for task in ("t0", "t1"):
        for seed in (18,):
            assert logs.count(f"] {task} seed {seed}: running in") == 1, logs
            for workdir in (sharded, whole):
                metrics = read_metrics(workdir / task / f"seed{seed}")
                assert len([r for r in metrics if "test_accuracy" in r]) == 1
    for workdir in (sharded, whole):
        report = start(workdir, 1, "report", f"--workdir={workdir}", script=suite,
                       log=workdir.with_suffix(".report.log"))  # fmt: skip
        assert finish([report]) == [0], workdir.with_suffix(".report.log").read_text()
    assert (sharded / "results.md").read_text() == (whole / "results.md").read_text()


# ----------------------------------------------------------------------------------------------
# 1. Where the processes find each other; values that cannot work.


def test_cluster_values_come_from_flags_then_the_environment() -> None:
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}  # fmt: skip
    assert distributed.Cluster.resolve(environ=env) == distributed.Cluster("10.0.0.1:1234", 4, 3)
    assert distributed.Cluster.resolve("h:1", 2, 0, environ=env) == distributed.Cluster("h:1", 2, 0)
    assert distributed.Cluster.resolve(environ={}) == distributed.Cluster()  # JAX detects
    assert distributed.init_timeout({}) == distributed.INIT_TIMEOUT_S <= 45
    assert distributed.init_timeout({distributed.INIT_TIMEOUT_ENV: "300"}) == 300


@pytest.mark.parametrize(
    "values, message",
    [
        (("h:1", 2, 2), "--process_id 2: expected 0..1"),
        ((None, 2, -1), "--process_id -1"),
        (("h:1", 0, None), "--num_processes 0"),
        (("h", 2, 0), "expected HOST:PORT"),
        (("h:port", 2, 0), "expected HOST:PORT"),
    ],
)
def test_values_that_cannot_work_are_refused(values, message) -> None:
    with pytest.raises(ValueError, match=message):
        distributed.Cluster.resolve(*values, environ={})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.Cluster.resolve(environ={"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="a number of seconds"):
        distributed.init_timeout({distributed.INIT_TIMEOUT_ENV: "soon"})


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (
            [
                "--distributed",
                "--coordinator_address=127.0.0.1:1",
                "--num_processes=2",
                "--process_id=2",
            ],
            {},
            "--process_id 2: expected 0..1",
        ),  # fmt: skip
        (["--num_processes=2"], {}, "need --distributed"),
        (["--distributed"], {}, "Give --coordinator_address, --num_processes and --process_id"),
        (
            ["--distributed", "--num_processes=2", "--process_id=1"],
            {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:PORT", distributed.INIT_TIMEOUT_ENV: "5"},
            "could not join the other processes within 5 s",
        ),  # fmt: skip
    ],
)
def test_bad_combinations_fail_in_one_line_within_a_minute(tmp_path, flags, env, message) -> None:
    """Before any work, nothing left behind; the last: a coordinator that never answers (a port
    nobody listens on), with a short $ADAPTER_PLUS_JAX_INIT_TIMEOUT (default INIT_TIMEOUT_S)."""
    env = {k: v.replace("PORT", str(free_port())) for k, v in env.items()}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_"))}
    began = time.monotonic()
    run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/demo.py:epochs=1", *ARGS,
         f"--workdir={tmp_path / 'run'}", *flags],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and time.monotonic() - began < 60
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert not (tmp_path / "run").exists()
