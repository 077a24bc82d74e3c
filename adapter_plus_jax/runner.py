"""The experiment loop behind `apj train`: build, train with checkpoints, evaluate, report.

One jitted train step runs data parallel over a 1-D 'data' mesh of every device (and host):
batches are global arrays sharded on their leading axis, parameters and optimizer state are
replicated. A rerun with the same workdir resumes from the last checkpoint.

    run = setup (check the input, build the model and the loaders)
          -> restore (the last checkpoint, if any) -> train (the step loop) -> evaluate
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adapter_plus_jax import backend, console, train
from adapter_plus_jax import config as cfglib
from adapter_plus_jax import params as params_lib
from adapter_plus_jax.checkpoint import CHECKPOINTS_DIR, Checkpointer, has_checkpoints
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.factory import create_model, weights_path
from adapter_plus_jax.images import normalize
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.pretrained import CONFIG_FILE
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

__all__ = ["SetupError", "build_model", "check_batch", "replicate", "run"]

RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, rng: jax.Array
) -> tuple[VisionTransformer, dict]:
    """(module with PEFT modules, initial params) for the configured backbone, through
    `create_model`. `model.pretrained=False` builds the timm architecture with random weights
    (no network): for demos and tests."""
    m = config.model
    module, variables = create_model(
        m.name,
        num_classes=num_classes,
        adapter=config.adapter,
        lora=config.lora,
        prompt=config.prompt,
        pretrained=m.pretrained,
        rng=rng,
        drop_path_rate=m.drop_path_rate,
        dtype=m.dtype,
        remat=m.remat,
        attention=m.get("attention", "xla"),
        weights_dir=m.weights_dir,
        **({} if m.pretrained else dict(m.timm_kwargs or {})),
    )
    return module, variables["params"]


def check_batch(batch_size: int, what: str = "batch_size") -> None:
    n = jax.device_count()
    if batch_size % n:
        raise SetupError(
            f"{what}={batch_size} is not divisible by the {n} devices; choose a multiple of {n}."
        )


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def lr_schedule(config: ml_collections.ConfigDict, steps: int):
    return train.reference_lr(
        config.lr,
        steps,
        warmup_epochs=config.warmup_epochs,
        epochs=config.epochs,
        start_factor=config.lr_start_factor,
        min_factor=config.lr_min_factor,
    )


@dataclasses.dataclass
class Experiment:
    """Everything a run is made of, once the input has been checked."""

    config: ml_collections.ConfigDict
    workdir: Path
    dataset: Any  # data.registry.Dataset
    module: VisionTransformer
    train_loader: Any
    eval_loader: Any
    schedule: Any  # optax.Schedule: the lr per step
    tx: Any
    state: train.TrainState
    frozen: Any
    n_trainable: int
    n_total: int
    rng: jax.Array
    num_classes: int  # the dataset's; the head may be wider (`params.head_width`)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # for results.json

    @property
    def steps_per_epoch(self) -> int:
        return self.train_loader.steps_per_epoch

    @property
    def class_count(self) -> np.int32 | None:
        """The train and eval steps' `num_classes` argument: the class count when the head is
        padded (a traced value: every class count runs one compiled step), else None."""
        width = self.module.config.num_classes
        return None if width == self.num_classes else np.int32(self.num_classes)


def setup(config: ml_collections.ConfigDict, workdir: Path) -> Experiment:
    """Check the input (before any compute), then build the model, loaders and optimizer."""
    name = config.model.name  # a timm name, or a directory written by `apj port`
    ported = [Path(name) / CONFIG_FILE, weights_path(name, config.model.weights_dir) / CONFIG_FILE]
    if not config.model.pretrained or not any(p.is_file() for p in ported):
        # timm (via torchvision -> triton) must be imported before TensorFlow: the two LLVMs
        # abort the process when loaded the other way round.
        import timm  # noqa: F401
    from adapter_plus_jax.data import registry
    from adapter_plus_jax.data.pipeline import LoaderOptions, data_mesh

    check_batch(config.batch_size)
    check_batch(config.eval_batch_size, "eval_batch_size")
    dataset = registry.get_dataset(config.dataset)
    num_classes = dataset.num_classes(config)
    mesh = data_mesh()
    rng = jax.random.key(config.seed)
    module, params = build_model(config, num_classes, rng)
    n_trainable = params_lib.trainable_count(params, config.train_mode)
    n_total = params_lib.param_count(params)
    try:
        width = params_lib.head_width(num_classes, config.model.head_width)
    except ValueError as e:
        raise SetupError(str(e)) from None
    if width != num_classes:  # zeros beyond the classes, masked out in the steps
        module = module.clone(config=module.config.replace(num_classes=width))
        params = params_lib.resize_head(params, width)
    # Images in [0, 255]: the jitted steps normalise them (`input_fn`).
    options = LoaderOptions(config.batch_size, config.eval_batch_size, config.seed,
                            module.config.img_size[0], mesh, backend.data_on_device())  # fmt: skip
    train_loader, eval_loader = dataset.loaders(config, options)

    schedule = lr_schedule(config, train_loader.steps_per_epoch)
    tx = train.adamw(schedule, config.weight_decay, config.grad_clip)
    state, frozen = train.init_state(params, tx, config.train_mode)
    return Experiment(
        config, workdir, dataset, module, train_loader, eval_loader, schedule, tx,
        replicate(state, mesh), replicate(frozen, mesh), n_trainable, n_total, rng, num_classes,
    )  # fmt: skip


def input_fn(module: Any) -> Callable[[jax.Array], jax.Array]:
    """The normalisation the model's weights expect, for the jitted steps: the loaders yield
    images in [0, 255]."""
    cfg = module.config
    return functools.partial(normalize, mean=tuple(cfg.mean), std=tuple(cfg.std))


def run_train_step(
    module: Any, tx: Any, label_smoothing: float, rng: jax.Array | None = None
) -> Callable:
    """The train step as runs use it: the backend's form (`train.make_train_step`), taking the
    loaders' images in [0, 255] (`input_fn`)."""
    return train.make_train_step(module, tx, label_smoothing, rng, input_fn=input_fn(module))


def run_eval_step(module: Any) -> Callable:
    """The eval step as runs use it: the backend's form, taking the loaders' images in [0, 255]."""
    return train.make_eval_step(module, input_fn=input_fn(module))


def restore_state(exp: Experiment, ckpt: Checkpointer, resume: Resume) -> None:
    """Load the checkpoint `resume` names into `exp.state` (its shapes and shardings)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), exp.state
    )
    try:
        exp.state, _ = ckpt.read(resume.step, abstract)
    except Exception as e:  # verified a moment ago: the tree no longer fits this model
        raise SetupError(
            f"The checkpoint of step {resume.step} in {ckpt.directory} does not fit this "
            f"model ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Use another --workdir."
        ) from e


def compile_step(step: Callable, *args: Any) -> tuple[Callable, float, float]:
    """(`step` compiled for `args`, the seconds spent tracing and lowering it, the seconds
    spent compiling it with XLA or reading it back from the persistent compilation cache)."""
    start = time.perf_counter()
    lowered = step.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    return compiled, traced - start, time.perf_counter() - traced


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
               dynamic_ncols=True) as bar:  # fmt: skip
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
    first = next(batches)
    compiled, trace_s, compile_s = compile_step(
        eval_step, params, first["image"], first["label"], first["mask"], exp.class_count
    )
    counted = time.perf_counter()
    accuracy = train.evaluate(
        lambda p, x, y, m: compiled(p, x, y, m, exp.class_count), params,
        itertools.chain([first], batches),
    )  # fmt: skip
    end = time.perf_counter()
    evaluated = len(exp.eval_loader) * exp.config.eval_batch_size  # padding included
    exp.timings.update(eval_trace_s=trace_s, eval_compile_s=compile_s,
                       eval_images_per_s=evaluated / (end - counted))  # fmt: skip
    return accuracy, end - start


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
    results.update(exp.dataset.describe(config))
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
    distributed: bool = False,
) -> dict:
    """Train (resuming from WORKDIR/checkpoints if present) and evaluate; returns the results
    also written to WORKDIR/results.json. With `eval_only`, evaluates the last checkpoint into
    WORKDIR/eval.json instead. `distributed`: this is one process of a multi-host run
    (`jax.distributed.initialize()`, after the config is checked).

    Bad config values, a workdir in use by another process, a checkpoint made with another
    config (unless `allow_config_change`) and missing data or weights raise SetupError before
    any compute; what this call added to the workdir is then removed again (the workdir too,
    if this call created it).
    """
    workdir = Path(workdir)
    cfglib.validate(config)
    if distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    backend.use_compilation_cache(config.compilation_cache)
    if eval_only and not has_checkpoints(workdir):
        raise SetupError(f"--eval-only: no checkpoint in {workdir / CHECKPOINTS_DIR}.")
    before = set(workdir.iterdir()) if workdir.is_dir() else None
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        if lock is not None:
            lock.acquire()
        console.log_to(workdir)
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
