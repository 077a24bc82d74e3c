"""One experiment, built: the checked config's model (a padded head, `params.head_width`),
loaders, optimizer and replicated state (`setup`), and the jitted steps as runs use them
(`run_train_step`, `run_eval_step`, compiled ahead of their first call by `compile_step`).
`runner.py` trains and evaluates it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adapter_plus_jax import params as params_lib
from adapter_plus_jax import train
from adapter_plus_jax.checkpoint import Checkpointer
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.factory import create_model, weights_path
from adapter_plus_jax.images import normalize
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.pretrained import CONFIG_FILE
from adapter_plus_jax.workdir import Resume


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
        tune=config.get("tune"),
        pretrained=m.pretrained,
        rng=rng,
        drop_path_rate=m.drop_path_rate,
        dtype=m.dtype,
        remat=m.remat,
        attention=m.get("attention", "auto"),
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
    """`tree`'s arrays (the same values in every process) replicated on every device of `mesh`,
    which may span processes."""
    sharding = NamedSharding(mesh, P())

    def put(x: Any) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, host, host.shape)

    return jax.tree.map(put, tree)


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
    eval_examples: int = 0  # how many examples the last evaluation counted

    @property
    def steps_per_epoch(self) -> int:
        return self.train_loader.steps_per_epoch

    @functools.cached_property
    def class_count(self) -> jax.Array | None:
        """The train and eval steps' `num_classes` argument: the class count when the head is
        padded (an argument, replicated like the state, so that every class count runs one
        compiled step), else None."""
        if self.module.config.num_classes == self.num_classes:
            return None
        return replicate(np.int32(self.num_classes), self.state.step.sharding.mesh)


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
                            module.config.img_size[0], mesh)  # fmt: skip
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
