"""The experiment loop behind main.py: build, train with checkpoints, evaluate, report.

One jitted train step runs data parallel over a 1-D 'data' mesh of every device (and host):
batches are global arrays sharded on their leading axis, parameters and optimizer state are
replicated. A rerun with the same workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adapter_plus_jax import peft, train
from adapter_plus_jax.checkpoint import Checkpointer
from adapter_plus_jax.convert import from_timm
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.pretrained import load_pretrained


class SetupError(ValueError):
    """Bad input found before any compute; the message says what to do."""


def weights_path(config: ml_collections.ConfigDict) -> Path:
    return Path(os.path.expanduser(config.model.weights_dir)) / config.model.name


def ensure_weights(config: ml_collections.ConfigDict) -> Path:
    """The ported backbone's directory; ports it with port_weights.py on first use (online)."""
    path = weights_path(config)
    if (path / "config.json").is_file():
        return path
    import port_weights  # the CLI module at the repository root

    print(f"No ported weights at {path}; porting {config.model.name} from timm ...", flush=True)
    if port_weights.main(["--model", config.model.name, "--out", str(path)]) != 0:
        raise SetupError(
            f"Missing ported weights for {config.model.name} at {path}, and porting them failed "
            "(see above). When offline, port a downloaded checkpoint first: python "
            f"port_weights.py --model {config.model.name} --checkpoint FILE --out {path}"
        )
    return path


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, rng: jax.Array
) -> tuple[VisionTransformer, dict, dict]:
    """(module with PEFT modules, initial params, pretrained_cfg) for the configured backbone.

    `model.pretrained=False` builds the timm architecture with random weights (no network):
    for demos and tests.
    """
    if config.model.pretrained:
        backbone, variables, pretrained_cfg = load_pretrained(
            ensure_weights(config), num_classes=num_classes, rng=jax.random.fold_in(rng, 1)
        )
    else:
        import timm
        import torch

        torch.manual_seed(config.seed)
        kwargs = dict(config.model.timm_kwargs or {})
        timm_model = timm.create_model(
            config.model.name, pretrained=False, num_classes=num_classes, **kwargs
        )
        backbone, variables = from_timm(timm_model.eval())
        pretrained_cfg = dict(timm_model.pretrained_cfg)
    specs = dict(
        adapter=peft.AdapterSpec.from_config(config.adapter) if config.adapter else None,
        lora=peft.LoRASpec.from_config(config.lora) if config.lora else None,
        prompt=peft.PromptSpec.from_config(config.prompt) if config.prompt else None,
    )
    vit_config = backbone.config.replace(drop_path_rate=config.model.drop_path_rate)
    module = VisionTransformer(
        vit_config, dtype=jnp.dtype(config.model.dtype), remat=config.model.remat, **specs
    )
    return module, init_params(module, variables["params"], rng), pretrained_cfg


def init_params(module: VisionTransformer, pretrained: dict, rng: jax.Array) -> dict:
    """Fresh params for the PEFT modules; every backbone and head parameter from `pretrained`."""
    cfg = module.config
    images = jnp.zeros((1, *cfg.img_size, cfg.in_chans), jnp.float32)
    fresh = traverse_util.flatten_dict(jax.jit(module.init)(rng, images)["params"])
    given = traverse_util.flatten_dict(pretrained)
    unknown = sorted("/".join(k) for k in set(given) - set(fresh))
    if unknown:
        raise SetupError(f"Pretrained parameters the model does not have: {unknown}")
    fresh.update(given)
    return traverse_util.unflatten_dict(fresh)


def check_batch(batch_size: int, what: str = "batch_size") -> None:
    n = jax.device_count()
    if batch_size % n:
        raise SetupError(
            f"{what}={batch_size} is not divisible by the {n} devices; choose a multiple of {n}."
        )


def make_eval_step(module: VisionTransformer):
    """eval_step(params, images, labels, mask) -> (number correct, number counted)."""

    def eval_step(params, images, labels, mask):
        logits = module.apply({"params": params}, images, train=False)
        correct = (jnp.argmax(logits, -1) == labels) & mask
        return jnp.sum(correct), jnp.sum(mask)

    return eval_step


def evaluate(eval_step, params, batches) -> float:
    """Top-1 accuracy over padded, masked batches: every example counts exactly once."""
    correct = count = 0
    for batch in batches:
        c, n = eval_step(params, batch["image"], batch["label"], batch["mask"])
        correct, count = correct + int(c), count + int(n)
    return correct / max(count, 1)


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


def make_loaders(config: ml_collections.ConfigDict, image_size: int, mean, std, mesh):
    """(train loader, eval loader) of the configured dataset."""
    from adapter_plus_jax import data

    common = dict(mean=mean, std=std, mesh=mesh)
    train_args = dict(seed=config.seed, global_batch=config.batch_size)
    if config.dataset == "fgvc":
        from adapter_plus_jax import fgvc

        fgvc_args = dict(common, data_dir=config.data_dir, root=config.fgvc_root)
        return (
            fgvc.fgvc_train_loader(config.task, config.train_split, **train_args, **fgvc_args),
            fgvc.fgvc_eval_loader(
                config.task, config.eval_split, global_batch=config.eval_batch_size, **fgvc_args
            ),
        )
    common["image_size"] = image_size
    if config.dataset == "vtab":
        vtab_args = dict(common, data_dir=config.data_dir)
        return (
            data.vtab_train_loader(config.task, config.train_split, **train_args, **vtab_args),
            data.vtab_eval_loader(
                config.task, config.eval_split, global_batch=config.eval_batch_size, **vtab_args
            ),
        )
    # 'tfds' / 'demo': a TFDS dataset with 'image' and 'label', resized like VTAB.
    import tensorflow_datasets as tfds

    builder = tfds.builder(config.tfds_name, data_dir=config.data_dir)
    fields = (lambda ex: ex["image"], lambda ex: ex["label"])
    return (
        data.tfds_train_loader(
            builder, config.train_split, *fields, cache=True, **train_args, **common
        ),
        data.tfds_eval_loader(
            builder,
            config.eval_split,
            *fields,
            cache=False,
            global_batch=config.eval_batch_size,
            **common,
        ),
    )


def num_classes_of(config: ml_collections.ConfigDict) -> int:
    """The class count of the configured task; fails early for an unknown dataset or task,
    or for a dataset that is not prepared in the data directory."""
    if config.dataset == "vtab":
        from adapter_plus_jax import vtab

        if config.task not in vtab.TASKS:
            raise SetupError(
                f"Unknown VTAB-1k task {config.task!r}; expected one of {sorted(vtab.TASKS)}."
            )
        _check_prepared(
            vtab.TASKS[config.task].tfds_name,
            config.data_dir,
            f"python -m adapter_plus_jax.data prepare --tasks {config.task}",
        )
        return vtab.TASKS[config.task].num_classes
    if config.dataset == "fgvc":
        from adapter_plus_jax import fgvc

        if config.task not in fgvc.FGVC:
            raise SetupError(
                f"Unknown FGVC dataset {config.task!r}; expected one of {sorted(fgvc.FGVC)}."
            )
        spec = fgvc.FGVC[config.task]
        if config.fgvc_root:
            if not Path(config.fgvc_root, "train.json").is_file():
                raise SetupError(f"{config.fgvc_root} has no train.json (VPT's FGVC layout).")
        elif not spec.tfds_name:
            raise SetupError(
                f"{config.task} has no TFDS builder; set --config.fgvc_root to its folder in "
                "VPT's layout (train.json, val.json, test.json and the images)."
            )
        else:
            _check_prepared(
                spec.tfds_name,
                config.data_dir,
                f"python -m adapter_plus_jax.data prepare --tasks {config.task}",
            )
        return spec.num_classes
    if config.dataset == "demo":
        from adapter_plus_jax import demo

        demo.prepare(config.data_dir)  # no network; writes the dataset once
        return config.num_classes
    if config.dataset == "tfds":
        _check_prepared(config.tfds_name, config.data_dir, "tfds build / download_and_prepare")
        return config.num_classes
    raise SetupError(f"Unknown dataset {config.dataset!r}; expected vtab, fgvc, tfds or demo.")


def _check_prepared(tfds_name: str, data_dir: str | None, how: str) -> None:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown names and versions
        raise SetupError(f"Cannot open TFDS dataset {tfds_name!r}: {e}") from e
    if not builder.is_prepared():
        raise SetupError(
            f"The dataset {tfds_name} is not prepared in {builder.data_dir_root}. "
            f"Prepare it first ({how}), or point --config.data_dir at the directory that has it."
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


def run(config: ml_collections.ConfigDict, workdir: str | Path, eval_only: bool = False) -> dict:
    """Train (resuming from WORKDIR/checkpoints if present) and evaluate; returns the results
    also written to WORKDIR/results.json."""
    from tqdm import tqdm

    workdir = Path(workdir)
    if not config.model.pretrained or not (weights_path(config) / "config.json").is_file():
        # timm (via torchvision -> triton) must be imported before TensorFlow: the two LLVMs
        # abort the process when loaded the other way round.
        import timm  # noqa: F401
    # Everything that can be wrong with the input is checked before any compute.
    check_batch(config.batch_size)
    check_batch(config.eval_batch_size, "eval_batch_size")
    num_classes = num_classes_of(config)
    from adapter_plus_jax.data import data_mesh

    mesh = data_mesh()
    rng = jax.random.key(config.seed)
    module, params, pretrained_cfg = build_model(config, num_classes, rng)
    train_loader, eval_loader = make_loaders(
        config, module.config.img_size[0], pretrained_cfg["mean"], pretrained_cfg["std"], mesh
    )
    workdir.mkdir(parents=True, exist_ok=True)

    mask = peft.trainable_mask(params, config.train_mode)
    trainable, frozen = train.split(params, mask)
    n_trainable, n_total = train.param_count(trainable), train.param_count(params)
    steps = train_loader.steps_per_epoch
    tx = train.adamw(lr_schedule(config, steps), config.weight_decay, config.grad_clip)
    state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    state, frozen = replicate(state, mesh), replicate(frozen, mesh)

    ckpt = Checkpointer(str(workdir))
    start_epoch = 0
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        state, meta = ckpt.restore(ckpt.latest_step(), abstract)
        start_epoch = int(meta["epoch"])
        print(f"Resumed from {workdir / 'checkpoints'} at epoch {start_epoch}.", flush=True)
    elif eval_only:
        raise SetupError(f"--eval_only: no checkpoint in {workdir / 'checkpoints'}.")

    print(
        f"{config.model.name} {config.method} on {config.dataset}/{config.task}: "
        f"{n_trainable:,} trainable of {n_total:,} parameters, {steps} steps/epoch, "
        f"{jax.device_count()} devices",
        flush=True,
    )
    schedule = lr_schedule(config, steps)
    options = train.compiler_options(module.dtype)
    train_step = jax.jit(
        train.make_train_step(module, tx, config.label_smoothing, jax.random.fold_in(rng, 2)),
        donate_argnums=0,
        compiler_options=options,
    )
    logger = Logger(workdir)
    train_start, images_seen = time.perf_counter(), 0
    epochs = 0 if eval_only else config.epochs
    bar = tqdm(
        total=epochs * steps,
        initial=start_epoch * steps,
        disable=epochs == 0,
        unit="step",
        dynamic_ncols=True,
    )
    # One pipeline over all remaining epochs, so prefetching runs across epoch boundaries.
    batches = train_loader.epochs(start_epoch, epochs - start_epoch) if epochs else iter(())
    # Steps are counted on the host, and the loop waits for the step before the one it has
    # just dispatched: the host prepares the next batch while the device computes, and no more
    # than two steps (and their batches) are in flight.
    previous = None
    for step, batch in enumerate(batches, start=start_epoch * steps + 1):
        state, metrics = train_step(state, frozen, batch["image"], batch["label"], batch["mask"])
        jax.block_until_ready(previous)
        previous = metrics
        images_seen += config.batch_size
        epoch, end_of_epoch = (step - 1) // steps, step % steps == 0
        if step % config.log_every_steps == 0 or end_of_epoch:
            values = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"Loss is {values['loss']} at step {step} (epoch {epoch}); stopping. "
                    f"The last good checkpoint in {workdir / 'checkpoints'} is kept "
                    "(lower the lr or enable grad_clip)."
                )
            elapsed = time.perf_counter() - train_start
            values.update(lr=float(schedule(step - 1)), images_per_s=images_seen / elapsed)
            logger.write(step, values)
            bar.set_postfix(
                epoch=epoch,
                loss=f"{values['loss']:.4f}",
                acc=f"{values['accuracy']:.3f}",
                lr=f"{values['lr']:.2e}",
                img_s=f"{values['images_per_s']:.0f}",
            )
        bar.update(1)
        if end_of_epoch and (
            (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == epochs
        ):
            meta = {"epoch": epoch + 1, "config": config.to_dict()}
            ckpt.save(step, state, json.loads(json.dumps(meta, default=str)))
    jax.block_until_ready(state)
    bar.close()
    train_time = time.perf_counter() - train_start

    eval_step = jax.jit(make_eval_step(module), compiler_options=options)
    eval_start = time.perf_counter()
    accuracy = evaluate(eval_step, train.merge(state.params, frozen), eval_loader)
    results = {
        "task": config.task,
        "dataset": config.dataset,
        "method": config.method,
        "seed": config.seed,
        "test_accuracy": accuracy,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "epochs": epochs,
        "train_time_s": train_time,
        "train_images_per_s": images_seen / train_time if images_seen else None,
        "eval_time_s": time.perf_counter() - eval_start,
        "devices": jax.device_count(),
    }
    logger.write(int(state.step), {"test_accuracy": accuracy})
    logger.close()
    ckpt.close()
    if jax.process_index() == 0:
        write_json_atomic(workdir / "results.json", results)
    print(f"test accuracy {accuracy:.4f} ({config.task}); results in {workdir / 'results.json'}")
    return results
