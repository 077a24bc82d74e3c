"""The training step: AdamW on the trainable subtree only, with the reference's schedule and
weight-decay rule (docs/recipe.md, "Optimizer and schedule"), and the exact evaluation step.

    state, frozen = init_state(params, tx)
    train_step = make_train_step(module, tx)          # jitted, in the backend's plan
    state, metrics = train_step(state, frozen, images, labels)

Parameters are split by a boolean mask into a trainable and a frozen tree. Gradients are taken
with respect to the trainable tree alone, so XLA computes no weight gradients for the frozen
backbone and the optimizer holds state only for the trainable parameters. The steps are written
once; how a backend runs them (chunks, compiler options) is `backend.plan`'s, and every example
draws its dropout and drop-path masks from its own key (`example_keys`), whatever the chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.extend
import jax.numpy as jnp
import optax

from adapter_plus_jax import backend
from adapter_plus_jax.params import merge, split, trainable_mask

# timm's VisionTransformer.no_weight_decay(): these get no decay whatever their rank.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")


def reference_lr(
    base_lr: float,
    steps_per_epoch: int,
    warmup_epochs: int = 10,
    epochs: int = 100,
    start_factor: float = 100.0,
    min_factor: float = 1000.0,
) -> optax.Schedule:
    """The reference's linear-warmup + cosine schedule, stepped once per epoch with its lag.

    pl_bolts' LinearWarmupCosineAnnealingLR is stepped at the end of each epoch with the epoch
    index, so epoch 0 runs at the warmup start lr and epoch k >= 1 at f(k - 1), with
        f(j) = s + j (b - s) / (W - 1)                           for j < W
        f(j) = m + (b - m) (1 + cos(pi (j - W) / (E - W))) / 2    for j >= W
    where b = base_lr, s = b / start_factor, m = b / min_factor.
    """
    b, s, m = base_lr, base_lr / start_factor, base_lr / min_factor
    w, e = warmup_epochs, epochs

    def f(j):
        warm = s + j * (b - s) / max(w - 1, 1)
        cos = m + 0.5 * (b - m) * (1 + jnp.cos(jnp.pi * (j - w) / max(e - w, 1)))
        return jnp.where(j < w, warm, cos)

    def schedule(step):
        epoch = step // steps_per_epoch
        return jnp.where(epoch == 0, s, f(jnp.maximum(epoch - 1, 0).astype(jnp.float32)))

    return schedule


def decay_mask(params: Any) -> Any:
    """True where the reference applies weight decay: not 1-D, not a bias or scaling, and not
    pos_embed / cls_token / dist_token. Prompts (2-D) are decayed, as in the reference.

    The mask has the structure of `params` (a dict, a FrozenDict or an NNX State), as `optax`'s
    `mask=` wants it; a parameter's name is the last dict key on its path.
    """

    def decays(path: tuple[Any, ...], value: Any) -> bool:
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        ndim = getattr(value, "ndim", 0)
        return ndim > 1 and name not in ("bias", "scaling") and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(
    schedule: optax.Schedule,
    weight_decay: float = 1e-4,
    grad_clip: float | None = None,
) -> Callable[[Any], optax.GradientTransformation]:
    """torch.optim.AdamW's update (betas 0.9/0.999, eps 1e-8, decoupled decay scaled by the lr),
    with the decay mask derived from the parameters it is initialised on."""
    tx = optax.adamw(
        schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask
    )
    if grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx


@flax.struct.dataclass
class TrainState:
    """What changes during training; the frozen backbone lives outside it."""

    step: jax.Array
    params: Any  # the trainable subtree
    opt_state: Any


def init_state(
    params: Mapping[str, Any], tx: optax.GradientTransformation, mode: str = "peft"
) -> tuple[TrainState, dict]:
    """(the TrainState of the parameters `mode` trains, the frozen rest): what the train step of
    `make_train_step` takes, from a model's 'params' (see `params.trainable_mask`). The state
    holds copies of the trainable arrays: the step donates its state, and `params` stays
    usable."""
    trainable, frozen = split(params, trainable_mask(params, mode))
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable)), frozen


def mask_classes(logits: jax.Array, num_classes: jax.Array | int | None) -> jax.Array:
    """`logits` with the columns from `num_classes` on (a padded head's, see
    `params.resize_head`) at -inf: such a class is never predicted and gets no probability and
    no gradient. `num_classes` may be traced, so heads of one width share one compiled step;
    None: no mask."""
    if num_classes is None:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < num_classes, logits, -jnp.inf)


def _losses(
    logits: jax.Array,
    labels: jax.Array,
    label_smoothing: float,
    num_classes: jax.Array | int | None = None,
) -> jax.Array:
    """Per-example cross-entropy with torch's label smoothing, in float32, over the first
    `num_classes` logits (None: all)."""
    logits = logits.astype(jnp.float32)
    if num_classes is None:
        targets = jax.nn.one_hot(labels, logits.shape[-1])
        if label_smoothing:
            targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
        return optax.softmax_cross_entropy(logits, targets)
    real = jnp.arange(logits.shape[-1]) < num_classes
    targets = jax.nn.one_hot(labels, logits.shape[-1]) * (1 - label_smoothing)
    targets = targets + jnp.where(real, label_smoothing / num_classes, 0.0)
    log_p = jax.nn.log_softmax(jnp.where(real, logits, -jnp.inf))
    return -jnp.sum(jnp.where(real, targets * log_p, 0.0), axis=-1)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean cross-entropy (torch's `F.cross_entropy(label_smoothing=...)`) over the examples
    where `mask` is True (padding in a last partial batch does not count)."""
    losses = _losses(logits, labels, label_smoothing)
    if mask is None:
        return losses.mean()
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


@functools.cache
def _per_example_prng(n: int) -> Any:
    """A PRNG implementation whose one key holds n threefry keys, one per example: its random
    bits of shape [n, ...] are row i's bits of shape [...] from key i, and folding data in folds
    it into every row. Flax's dropout then draws each example's mask from that example's key."""
    threefry = jax.extend.random.threefry_prng_impl

    def seed(_):
        raise NotImplementedError("per-example keys are made by `example_keys`")

    def split(keys, shape):
        return jnp.moveaxis(jax.vmap(lambda k: threefry.split(k, shape))(keys), 0, len(shape))

    def fold_in(keys, data):
        return jax.vmap(lambda k: threefry.fold_in(k, data))(keys)

    def random_bits(keys, bit_width, shape):
        if not shape or shape[0] != n:
            raise ValueError(f"per-example keys of {n} examples draw [{n}, ...], not {shape}")
        return jax.vmap(lambda k: threefry.random_bits(k, bit_width, shape[1:]))(keys)

    return jax.extend.random.define_prng_impl(
        key_shape=(n, *threefry.key_shape), seed=seed, split=split, random_bits=random_bits,
        fold_in=fold_in, name=f"per_example_threefry{n}",
    )  # fmt: skip


def example_keys(key: jax.Array, start: jax.Array | int, n: int) -> jax.Array:
    """One key for a batch of the n examples start, ..., start + n - 1 of a step: example i's
    randomness comes from fold_in(base, i), whatever batch or chunk it is computed in. `base`
    is a threefry key drawn from `key` (of any PRNG implementation), since threefry's draws do
    not depend on how they are batched."""
    base = jax.random.bits(key, jax.extend.random.threefry_prng_impl.key_shape, jnp.uint32)
    base = jax.random.wrap_key_data(base, impl="threefry2x32")
    index = start + jnp.arange(n)
    rows = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(base, i)))(index)
    return jax.random.wrap_key_data(rows, impl=_per_example_prng(n))


def loss_and_grads(
    apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any,
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
    chunk: int | None = None,
    num_classes: jax.Array | int | None = None,
) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """((the batch's mean loss over `mask`, logits), its gradient w.r.t. `params`).

    `apply(params, key, x)` is the model in training mode on images `x`, drawing its dropout
    and drop-path masks from `key` (`example_keys`: example i of the batch from fold_in(key,
    i)), so every chunking and every backend draws the same masks. `chunk`
    (`backend.Plan.chunk_size`): the batch in chunks of that many examples one after another
    under `lax.scan`, gradients summed, a last, smaller chunk for the remainder; None: the
    whole batch at once. `num_classes`: the loss and the logits cover the first `num_classes`
    classes of a padded head (`mask_classes`).
    """
    count = jnp.maximum(jnp.sum(mask), 1)

    def loss_fn(p, start, x, y, m):
        """This chunk's share of the batch's mean loss, and its logits."""
        logits = apply(p, example_keys(key, start, x.shape[0]), x)
        losses = _losses(logits, y, label_smoothing, num_classes)
        return jnp.sum(losses * m) / count, mask_classes(logits, num_classes)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if chunk is None:
        return grad_fn(params, 0, images, labels, mask)
    heads, rest = backend.split_batch((images, labels, mask), chunk)

    def body(total, xs):
        i, *chunk_batch = xs
        (loss, logits), grads = grad_fn(params, i * chunk, *chunk_batch)
        return jax.tree.map(jnp.add, total, (loss, grads)), logits

    num = heads[0].shape[0]
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), logits = jax.lax.scan(body, zeros, (jnp.arange(num), *heads))
    logits = logits.reshape(-1, *logits.shape[2:])
    if rest is not None:
        (rest_loss, rest_logits), rest_grads = grad_fn(params, num * chunk, *rest)
        loss, grads = jax.tree.map(jnp.add, (loss, grads), (rest_loss, rest_grads))
        logits = jnp.concatenate([logits, rest_logits])
    return (loss, logits), grads


def make_train_step(
    module: flax.linen.Module,
    tx: optax.GradientTransformation,
    label_smoothing: float = 0.0,
    rng: jax.Array | None = None,
    *,
    input_fn: Callable[[jax.Array], jax.Array] | None = None,
    plan: backend.Plan | None = None,
    jit: bool = True,
) -> Callable:
    """train_step(state, frozen, images, labels, mask=None, num_classes=None, rng=None) ->
    (state, metrics), in the form
    that is fastest on this backend (`backend.plan(module)`, or `plan`): jitted with the plan's
    compiler options, the state donated (its arrays are deleted by the call: use the state it
    returns; `jit=False` gives the plain function), the batch in the plan's chunks.

    `input_fn` maps the images before the model inside the step, e.g. the input normalisation
    (`images.normalize`) for loaders that yield images in [0, 255], so that the input pipeline
    does not spend its host cores on it. Dropout and drop path draw from fold_in(rng, step),
    then per example (`example_keys`), so a resumed run draws the same masks, and so does every
    chunking; `rng` given to the step replaces the one given here, as an argument (runs with
    other seeds then share one compiled step). A padded example (mask False) counts in neither
    the loss nor the accuracy.
    `num_classes` (an int32 scalar, traced: any value runs the same compiled step) trains a
    head padded beyond the class count (`params.resize_head`) on its first `num_classes`
    classes only (`mask_classes`); None: every output is a class.
    """
    default_rng = jax.random.key(0) if rng is None else rng
    plan = backend.plan(module) if plan is None else plan
    prepare = (lambda x: x) if input_fn is None else input_fn

    def train_step(
        state: TrainState,
        frozen: Any,
        images: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None = None,
        num_classes: jax.Array | None = None,
        rng: jax.Array | None = None,
    ):
        mask = jnp.ones(labels.shape, bool) if mask is None else mask
        key = default_rng if rng is None else rng

        def apply(trainable, key, x):
            variables = {"params": merge(trainable, frozen)}
            return module.apply(variables, prepare(x), train=True, rngs={"dropout": key})

        (loss, logits), grads = loss_and_grads(
            apply, state.params, jax.random.fold_in(key, state.step), images, labels, mask,
            label_smoothing, plan.chunk_size(images.shape[0]), num_classes,
        )  # fmt: skip
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), step_metrics(loss, logits, labels,
                                                                          mask)  # fmt: skip

    return plan.jit(train_step, donate_argnums=0) if jit else train_step


def step_metrics(
    loss: jax.Array, logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """{'loss', 'accuracy'} of a train step; accuracy over the examples where `mask` is True."""
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return {"loss": loss, "accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1)}


def make_eval_step(
    module: flax.linen.Module,
    *,
    input_fn: Callable[[jax.Array], jax.Array] | None = None,
    plan: backend.Plan | None = None,
    jit: bool = True,
) -> Callable:
    """eval_step(params, images, labels, mask, num_classes=None) -> (number correct, number
    counted), in the backend's form (`backend.plan`, or `plan`: jitted with its compiler
    options, the forward over its chunks), after `input_fn` and with `num_classes` as in
    `make_train_step`."""
    plan = backend.plan(module) if plan is None else plan
    prepare = (lambda x: x) if input_fn is None else input_fn
    forward = backend.map_chunks(  # input_fn per chunk, as in the train step
        lambda params, x: module.apply({"params": params}, prepare(x), train=False), plan.chunk
    )

    def eval_step(params, images, labels, mask, num_classes=None):
        logits = mask_classes(forward(params, images), num_classes)
        correct = (jnp.argmax(logits, -1) == labels) & mask
        return jnp.sum(correct), jnp.sum(mask)

    return plan.jit(eval_step) if jit else eval_step


def evaluate(eval_step, params, batches) -> float:
    """Top-1 accuracy over padded, masked batches: every example counts exactly once."""
    correct, count = evaluate_counts(eval_step, params, batches)
    return correct / max(count, 1)


def evaluate_counts(eval_step, params, batches) -> tuple[int, int]:
    """(correct, counted) over padded, masked batches; `counted` is the number of examples."""
    correct = count = 0
    for batch in batches:
        c, n = eval_step(params, batch["image"], batch["label"], batch["mask"])
        correct, count = correct + int(c), count + int(n)
    return correct, count
