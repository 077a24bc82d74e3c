"""The experiment loop behind `apj train`: build, train with checkpoints, evaluate, report.

One jitted train step runs data parallel over a 1-D 'data' mesh of every device (and host):
batches are global arrays sharded on their leading axis, parameters and optimizer state are
replicated. A rerun with the same workdir resumes from the last checkpoint.

    run = setup (check the input, build the model and the loaders)
          -> restore (the last checkpoint, if any) -> train (the step loop) -> evaluate
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from adapter_plus_jax import backend, console, distributed, train
from adapter_plus_jax import config as cfglib
from adapter_plus_jax import params as params_lib
from adapter_plus_jax.checkpoint import CHECKPOINTS_DIR, Checkpointer, has_checkpoints
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.experiment import (
    Experiment,
    compile_step,
    replicate,
    restore_state,
    run_eval_step,
    run_train_step,
    setup,
)
from adapter_plus_jax.workdir import (
    METRICS_FILE,
    Logger,
    Resume,
    WorkdirLock,
    check_resume,
    config_record,
    rewind_metrics,
    write_json_atomic,
)

__all__ = ["SetupError", "run"]

RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"


def train_epochs(
    exp: Experiment, ckpt: Checkpointer, logger: Logger, resume: Resume
) -> tuple[float, int]:
    """Train from `resume.epoch` to `config.epochs`, logging and checkpointing; returns the
    run's (seconds, images seen), counting those before the resume. This session's compile
    time, steady rate and time waiting for input go to `exp.timings`."""
    from tqdm import tqdm

    config, steps, epochs = exp.config, exp.steps_per_epoch, exp.config.epochs
    train_step = run_train_step(exp.module, exp.tx, config.label_smoothing)
    # The run's key is an argument, not a constant of the program: every seed (and every class
    # count, `class_count`) runs one compiled step.
    key = replicate(jax.random.fold_in(exp.rng, 2), exp.state.step.sharding.mesh)
    start, images_seen, waited = time.perf_counter(), 0, 0.0
    with tqdm(total=epochs * steps, initial=resume.epoch * steps, unit="step",
               dynamic_ncols=True, disable=jax.process_index() != 0) as bar:  # fmt: skip
        # One pipeline over all remaining epochs, so prefetching runs across epoch boundaries.
        left = epochs - resume.epoch  # 0: killed after the last checkpoint, before evaluating
        batches = exp.train_loader.epochs(resume.epoch, left) if left > 0 else iter(())
        # Steps are counted on the host, and the loop waits for the step before the one it has
        # just dispatched: the host prepares the next batch while the device computes, and no more
        # than two steps (and their batches) are in flight.
        previous, compiled, steady_start = None, None, None
        for step in range(resume.epoch * steps + 1, epochs * steps + 1):
            fetch = time.perf_counter()
            batch = next(batches)
            args = (exp.frozen, batch["image"], batch["label"], batch["mask"], exp.class_count, key)
            if compiled is None:
                compiled, *seconds = compile_step(train_step, exp.state, *args)
                exp.timings.update(train_trace_s=seconds[0], train_compile_s=seconds[1])
            elif steady_start is not None:
                waited += time.perf_counter() - fetch
            exp.state, metrics = compiled(exp.state, *args)
            jax.block_until_ready(previous)
            if previous is not None and steady_start is None:  # the first step is done
                steady_start, steady_images = time.perf_counter(), images_seen
            previous = metrics
            images_seen += config.batch_size
            epoch, end_of_epoch = (step - 1) // steps, step % steps == 0
            if step % config.log_every_steps == 0 or end_of_epoch:
                values = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"Loss is {values['loss']} at step {step} (epoch {epoch}); stopping. "
                        f"The last good checkpoint in {ckpt.directory} is kept "
                        "(lower the lr or enable grad_clip)."
                    )
                elapsed = time.perf_counter() - start
                values.update(lr=float(exp.schedule(step - 1)), images_per_s=images_seen / elapsed)
                logger.write(step, values)
                bar.set_postfix(epoch=epoch, loss=f"{values['loss']:.4f}",
                                acc=f"{values['accuracy']:.3f}", lr=f"{values['lr']:.2e}",
                                img_s=f"{values['images_per_s']:.0f}")  # fmt: skip
            bar.update(1)
            last = epoch + 1 == epochs
            if end_of_epoch and ((epoch + 1) % config.checkpoint_every_epochs == 0 or last):
                meta = {
                    "epoch": epoch + 1,
                    "config": config_record(config),
                    "num_classes": exp.num_classes,
                    "train_time_s": resume.train_time_s + time.perf_counter() - start,
                    "images_seen": resume.images_seen + images_seen,
                }
                ckpt.save(step, exp.state, meta)
        jax.block_until_ready(exp.state)
    if steady_start is not None and images_seen > steady_images:
        steady = time.perf_counter() - steady_start
        exp.timings["steady_images_per_s"] = (images_seen - steady_images) / steady
        exp.timings["input_wait_fraction"] = waited / steady
    return resume.train_time_s + time.perf_counter() - start, resume.images_seen + images_seen


def evaluate(exp: Experiment) -> tuple[float, float]:
    """(accuracy on the eval split, seconds, compilation included); the compile time and the
    rate after it go to `exp.timings`."""
    eval_step = run_eval_step(exp.module)
    start = time.perf_counter()
    params = params_lib.merge(exp.state.params, exp.frozen)
    batches = iter(exp.eval_loader)
    first = next(batches, None)
    if first is None:
        raise SetupError(f"{exp.config.eval_split}: no examples to evaluate.")
    compiled, trace_s, compile_s = compile_step(
        eval_step, params, first["image"], first["label"], first["mask"], exp.class_count
    )
    counted = time.perf_counter()
    correct, exp.eval_examples = train.evaluate_counts(
        lambda p, x, y, m: compiled(p, x, y, m, exp.class_count), params,
        itertools.chain([first], batches),
    )  # fmt: skip
    end = time.perf_counter()
    evaluated = len(exp.eval_loader) * exp.config.eval_batch_size  # padding included
    exp.timings.update(eval_trace_s=trace_s, eval_compile_s=compile_s,
                       eval_images_per_s=evaluated / (end - counted))  # fmt: skip
    return correct / max(exp.eval_examples, 1), end - start


def _summary_line(exp: Experiment) -> str:
    config = exp.config
    return (
        f"{config.model.name} {config.method} on {config.dataset}/{config.task}: "
        f"{exp.n_trainable:,} trainable of {exp.n_total:,} parameters, "
        f"{exp.steps_per_epoch} steps/epoch, {jax.device_count()} devices"
    )


def _print_complete(workdir: Path, results: dict[str, Any], epochs: int) -> None:
    print(f"{workdir}: this run is complete ({epochs}/{epochs} epochs). test accuracy "
          f"{results['test_accuracy']:.4f} ({results['task']}), trained in "
          f"{results['train_time_s']:.0f} s; results in {workdir / RESULTS_FILE}. "
          "--eval-only evaluates it again.", flush=True)  # fmt: skip


def run_in(
    config: ml_collections.ConfigDict,
    workdir: Path,
    eval_only: bool = False,
    allow_config_change: bool = False,
) -> dict:
    """`run`'s work, in a workdir that this process has locked."""
    ckpt = Checkpointer(workdir)
    try:
        resume = check_resume(ckpt, config, allow_config_change)
        if jax.process_count() > 1:
            _resume_together(ckpt, resume)
        if eval_only and resume is None:
            raise SetupError(f"--eval-only: no checkpoint in {ckpt.directory}.")
        results_path = workdir / RESULTS_FILE
        if not eval_only and resume and resume.epoch >= config.epochs and results_path.is_file():
            results = json.loads(results_path.read_text())
            _print_complete(workdir, results, config.epochs)
            return results
        exp = setup(config, workdir)
        if resume is not None:
            restore_state(exp, ckpt, resume)
        if eval_only:
            return _evaluate_only(exp, resume)
        print(_summary_line(exp), flush=True)
        if resume is not None:
            print(f"Resumed from {ckpt.directory} at epoch {resume.epoch} (step {resume.step}).",
                  flush=True)  # fmt: skip
            if jax.process_index() == 0:
                rewind_metrics(workdir, resume.step)
        resume = resume or Resume(0, 0, 0.0, 0)
        logger = Logger(workdir)
        try:
            train_time, images_seen = train_epochs(exp, ckpt, logger, resume)
            accuracy, eval_time = evaluate(exp)
            logger.write(int(exp.state.step), {"test_accuracy": accuracy})
        finally:
            logger.close()
    finally:
        ckpt.close()
    results = {
        "task": config.task,
        "dataset": config.dataset,
        "method": config.method,
        "seed": config.seed,
        "test_accuracy": accuracy,
        "eval_examples": exp.eval_examples,
        "trainable_params": exp.n_trainable,
        "total_params": exp.n_total,
        "epochs": config.epochs,
        "train_time_s": train_time,
        "train_images_per_s": images_seen / train_time if train_time else None,
        "eval_time_s": eval_time,
        "devices": jax.device_count(),
        "num_classes": exp.num_classes,
        "head_width": exp.module.config.num_classes,
        "compile_s": exp.timings.get("train_compile_s", 0.0) + exp.timings["eval_compile_s"],
        **exp.timings,
    }
    results.update(exp.dataset.describe(config, exp.module.config.img_size[0]))
    if jax.process_index() == 0:
        write_json_atomic(results_path, results)
    print(f"test accuracy {accuracy:.4f} ({config.task}); results in {results_path}", flush=True)
    return results


def _evaluate_only(exp: Experiment, resume: Resume) -> dict:
    """Evaluate the restored checkpoint into WORKDIR/eval.json; the training record (results.
    json, metrics.jsonl) is left as it is."""
    print(f"Evaluating the checkpoint of epoch {resume.epoch} (step {resume.step}) in "
          f"{exp.workdir / CHECKPOINTS_DIR}.", flush=True)  # fmt: skip
    accuracy, eval_time = evaluate(exp)
    config = exp.config
    results = {
        "task": config.task,
        "dataset": config.dataset,
        "eval_split": config.eval_split,
        "method": config.method,
        "seed": config.seed,
        "test_accuracy": accuracy,
        "eval_examples": exp.eval_examples,
        "checkpoint_step": resume.step,
        "checkpoint_epoch": resume.epoch,
        "eval_time_s": eval_time,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "devices": jax.device_count(),
    }
    path = exp.workdir / EVAL_FILE
    if jax.process_index() == 0:
        write_json_atomic(path, results)
    print(f"test accuracy {accuracy:.4f} ({config.task}); written to {path}", flush=True)
    return results


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    eval_only: bool = False,
    allow_config_change: bool = False,
    cluster: distributed.Cluster | None = None,
) -> dict:
    """Train (resuming from WORKDIR/checkpoints if present) and evaluate; returns the results
    also written to WORKDIR/results.json. With `eval_only`, evaluates the last checkpoint into
    WORKDIR/eval.json instead. `cluster`: this is one process of a multi-process run, which
    joins the others (`distributed.initialize`) after the config is checked; every process
    calls `run` with the same arguments, and process 0 writes the workdir's files.

    Bad config values, a workdir in use by another run, a checkpoint made with another config
    (unless `allow_config_change`) and missing data or weights raise SetupError before any
    compute, in every process; what this call added to the workdir is then removed again (the
    workdir too, if this call created it).
    """
    workdir = Path(workdir)
    cfglib.validate(config)
    if cluster is not None:
        distributed.initialize(cluster)
    backend.use_compilation_cache(config.compilation_cache)
    if eval_only and not has_checkpoints(workdir):
        raise SetupError(f"--eval-only: no checkpoint in {workdir / CHECKPOINTS_DIR}.")
    before = set(workdir.iterdir()) if workdir.is_dir() else None
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        _lock_together(lock, workdir)
        console.log_to(workdir, jax.process_index())
        return run_in(config, workdir, eval_only, allow_config_change)
    except SetupError:
        # A run that holds the workdir and failed before it trained: nothing of it is kept.
        untouched = not has_checkpoints(workdir) and not (workdir / METRICS_FILE).exists()
        if untouched and lock is not None and lock.held:
            console.close()
            _remove_added(workdir, before)
        raise
    finally:
        note = console.summary()
        console.close()
        if note:
            print(note, flush=True)
        if lock is not None:
            lock.release()


def _resume_together(ckpt: Checkpointer, resume: Resume | None) -> None:
    """Every process resumes from process 0's choice of checkpoint (which may have moved
    damaged ones aside): SetupError where another process sees the checkpoints otherwise."""
    mine = str(resume.step) if resume else "none"
    chosen = distributed.from_process_zero("the checkpoint to resume from", mine)
    ckpt.reload()
    if chosen != mine:
        raise SetupError(
            f"Process {jax.process_index()} would resume from checkpoint {mine} of "
            f"{ckpt.directory}, process 0 from {chosen}: every host must see the same workdir "
            "(a shared filesystem, the same path)."
        )


def _lock_together(lock: WorkdirLock | None, workdir: Path) -> None:
    """Process 0 takes the workdir's lock (`lock`; None in the other processes), and every
    process of the run raises the same SetupError when it is held by another run."""
    refusal = ""
    if lock is not None:
        try:
            lock.acquire()
        except SetupError as e:
            refusal = str(e)
    refusal = distributed.from_process_zero("the workdir's lock", refusal)
    if refusal:
        raise SetupError(refusal)


def _remove_added(workdir: Path, before: set[Path] | None) -> None:
    """Remove what a failed start added to `workdir` (the workdir itself if it was not there:
    `before` None), leaving what was there."""
    if before is None:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for path in set(workdir.iterdir()) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
