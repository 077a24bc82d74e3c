"""The experiment loop behind main.py: build, train with checkpoints, evaluate, report.

One jitted train step runs data parallel over a 1-D 'data' mesh of every device (and host):
batches are global arrays sharded on their leading axis, parameters and optimizer state are
replicated. A rerun with the same workdir resumes from the last checkpoint.

    run = setup (check the input, build the model and the loaders)
          -> restore (the last checkpoint, if any) -> train (the step loop) -> evaluate
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adapter_plus_jax import params as params_lib
from adapter_plus_jax import precision, train
from adapter_plus_jax.checkpoint import Checkpointer
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.factory import create_model, weights_path
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.pretrained import CONFIG_FILE

__all__ = ["SetupError", "build_model", "check_batch", "replicate", "run"]


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


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def lr_schedule(config: ml_collections.ConfigDict, steps: int):
    return train.reference_lr(
        config.lr,
        steps,
        warmup_epochs=config.warmup_epochs,
        epochs=config.epochs,
        start_factor=config.lr_start_factor,
        min_factor=config.lr_min_factor,
    )


class Logger:
    """metrics.jsonl and TensorBoard summaries (process 0 only)."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from flax.metrics import tensorboard

            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
            self._tb = tensorboard.SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


@dataclasses.dataclass
class Experiment:
    """Everything a run is made of, once the input has been checked."""

    config: ml_collections.ConfigDict
    workdir: Path
    module: VisionTransformer
    train_loader: Any
    eval_loader: Any
    tx: Any
    state: train.TrainState
    frozen: Any
    n_trainable: int
    n_total: int
    rng: jax.Array

    @property
    def steps_per_epoch(self) -> int:
        return self.train_loader.steps_per_epoch


def setup(config: ml_collections.ConfigDict, workdir: Path) -> Experiment:
    """Check the input (before any compute), then build the model, loaders and optimizer."""
    ported = weights_path(config.model.name, config.model.weights_dir) / CONFIG_FILE
    if not config.model.pretrained or not ported.is_file():
        # timm (via torchvision -> triton) must be imported before TensorFlow: the two LLVMs
        # abort the process when loaded the other way round.
        import timm  # noqa: F401
    from adapter_plus_jax.data import registry
    check_batch(config.batch_size)
    check_batch(config.eval_batch_size, "eval_batch_size")
    dataset = registry.get_dataset(config.dataset)
    num_classes = dataset.num_classes(config)
    from adapter_plus_jax.data.pipeline import data_mesh

    mesh = data_mesh()
    rng = jax.random.key(config.seed)
    module, params = build_model(config, num_classes, rng)
    cfg = module.config
    args = registry.LoaderArgs(cfg.img_size[0], cfg.mean, cfg.std, mesh)
    train_loader, eval_loader = dataset.loaders(config, args)

    mask = params_lib.trainable_mask(params, config.train_mode)
    trainable, frozen = train.split(params, mask)
    tx = train.adamw(
        lr_schedule(config, train_loader.steps_per_epoch), config.weight_decay, config.grad_clip
    )
    state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    return Experiment(
        config,
        workdir,
        module,
        train_loader,
        eval_loader,
        tx,
        replicate(state, mesh),
        replicate(frozen, mesh),
        params_lib.param_count(trainable),
        params_lib.param_count(params),
        rng,
    )


def restore(exp: Experiment, ckpt: Checkpointer, eval_only: bool) -> int:
    """Restore the last checkpoint into `exp.state`; returns the epoch to start at."""
    step = ckpt.latest_step()
    if step is None:
        if eval_only:
            raise SetupError(f"--eval_only: no checkpoint in {exp.workdir / 'checkpoints'}.")
        return 0
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), exp.state
    )
    exp.state, meta = ckpt.restore(step, abstract)
    start_epoch = int(meta["epoch"])
    print(f"Resumed from {exp.workdir / 'checkpoints'} at epoch {start_epoch}.", flush=True)
    return start_epoch


def train_epochs(
    exp: Experiment, ckpt: Checkpointer, logger: Logger, start_epoch: int, epochs: int
) -> tuple[float, int]:
    """Train from `start_epoch` to `epochs`, logging and checkpointing; returns (seconds,
    images seen)."""
    from tqdm import tqdm

    config, steps = exp.config, exp.steps_per_epoch
    schedule = lr_schedule(config, steps)
    train_step = jax.jit(
        train.make_train_step(
            exp.module, exp.tx, config.label_smoothing, jax.random.fold_in(exp.rng, 2)
        ),
        donate_argnums=0,
        compiler_options=precision.compiler_options(exp.module.dtype),
    )
    start, images_seen = time.perf_counter(), 0
    bar = tqdm(total=epochs * steps, initial=start_epoch * steps, disable=epochs == 0,
               unit="step", dynamic_ncols=True)  # fmt: skip
    # One pipeline over all remaining epochs, so prefetching runs across epoch boundaries.
    batches = exp.train_loader.epochs(start_epoch, epochs - start_epoch) if epochs else iter(())
    # Steps are counted on the host, and the loop waits for the step before the one it has
    # just dispatched: the host prepares the next batch while the device computes, and no more
    # than two steps (and their batches) are in flight.
    previous = None
    for step, batch in enumerate(batches, start=start_epoch * steps + 1):
        exp.state, metrics = train_step(
            exp.state, exp.frozen, batch["image"], batch["label"], batch["mask"]
        )
        jax.block_until_ready(previous)
        previous = metrics
        images_seen += config.batch_size
        epoch, end_of_epoch = (step - 1) // steps, step % steps == 0
        if step % config.log_every_steps == 0 or end_of_epoch:
            values = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"Loss is {values['loss']} at step {step} (epoch {epoch}); stopping. "
                    f"The last good checkpoint in {exp.workdir / 'checkpoints'} is kept "
                    "(lower the lr or enable grad_clip)."
                )
            elapsed = time.perf_counter() - start
            values.update(lr=float(schedule(step - 1)), images_per_s=images_seen / elapsed)
            logger.write(step, values)
            bar.set_postfix(epoch=epoch, loss=f"{values['loss']:.4f}",
                            acc=f"{values['accuracy']:.3f}", lr=f"{values['lr']:.2e}",
                            img_s=f"{values['images_per_s']:.0f}")  # fmt: skip
        bar.update(1)
        last = epoch + 1 == epochs
        if end_of_epoch and ((epoch + 1) % config.checkpoint_every_epochs == 0 or last):
            meta = {"epoch": epoch + 1, "config": config.to_dict()}
            ckpt.save(step, exp.state, json.loads(json.dumps(meta, default=str)))
    jax.block_until_ready(exp.state)
    bar.close()
    return time.perf_counter() - start, images_seen


def run(config: ml_collections.ConfigDict, workdir: str | Path, eval_only: bool = False) -> dict:
    """Train (resuming from WORKDIR/checkpoints if present) and evaluate; returns the results
    also written to WORKDIR/results.json."""
    workdir = Path(workdir)
    exp = setup(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(str(workdir))
    start_epoch = restore(exp, ckpt, eval_only)
    print(
        f"{config.model.name} {config.method} on {config.dataset}/{config.task}: "
        f"{exp.n_trainable:,} trainable of {exp.n_total:,} parameters, "
        f"{exp.steps_per_epoch} steps/epoch, {jax.device_count()} devices",
        flush=True,
    )
    logger = Logger(workdir)
    epochs = 0 if eval_only else config.epochs
    train_time, images_seen = train_epochs(exp, ckpt, logger, start_epoch, epochs)

    eval_step = jax.jit(
        train.make_eval_step(exp.module),
        compiler_options=precision.compiler_options(exp.module.dtype),
    )
    eval_start = time.perf_counter()
    accuracy = train.evaluate(eval_step, train.merge(exp.state.params, exp.frozen),
                              exp.eval_loader)  # fmt: skip
    results = {
        "task": config.task,
        "dataset": config.dataset,
        "method": config.method,
        "seed": config.seed,
        "test_accuracy": accuracy,
        "trainable_params": exp.n_trainable,
        "total_params": exp.n_total,
        "epochs": epochs,
        "train_time_s": train_time,
        "train_images_per_s": images_seen / train_time if images_seen else None,
        "eval_time_s": time.perf_counter() - eval_start,
        "devices": jax.device_count(),
    }
    logger.write(int(exp.state.step), {"test_accuracy": accuracy})
    logger.close()
    ckpt.close()
    if jax.process_index() == 0:
        write_json_atomic(workdir / "results.json", results)
    print(f"test accuracy {accuracy:.4f} ({config.task}); results in {workdir / 'results.json'}")
    return results
