"""The training step: AdamW on the trainable subtree only, with the reference's schedule and
weight-decay rule (docs/recipe.md, "Optimizer and schedule"), and the exact evaluation step.

Parameters are split by a boolean mask into a trainable and a frozen tree. Gradients are taken
with respect to the trainable tree alone, so XLA computes no weight gradients for the frozen
backbone and the optimizer holds state only for the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from adapter_plus_jax import precision

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


def decay_mask(params: Mapping[str, Any]) -> Any:
    """True where the reference applies weight decay: not 1-D, not a bias or scaling, and not
    pos_embed / cls_token / dist_token. Prompts (2-D) are decayed, as in the reference."""

    def decays(path: tuple[str, ...], value: Any) -> bool:
        name = path[-1]
        # getattr: inside optax.multi_transform the frozen leaves arrive as MaskedNode.
        ndim = getattr(value, "ndim", 0)
        return ndim > 1 and name not in ("bias", "scaling") and name not in NO_DECAY_NAMES

    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict({k: decays(k, v) for k, v in flat.items()})


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


def split(params: Mapping[str, Any], mask: Mapping[str, Any]) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees of `params` by a boolean `mask` of the same structure."""
    flat = traverse_util.flatten_dict(dict(params))
    flat_mask = traverse_util.flatten_dict(dict(mask))
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """Inverse of `split`."""
    flat = traverse_util.flatten_dict(dict(frozen))
    flat.update(traverse_util.flatten_dict(dict(trainable)))
    return traverse_util.unflatten_dict(flat)


@flax.struct.dataclass
class TrainState:
    """What changes during training; the frozen backbone lives outside it."""

    step: jax.Array
    params: Any  # the trainable subtree
    opt_state: Any


def _losses(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example cross-entropy with torch's label smoothing, in float32."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


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


def make_train_step(
    module: flax.linen.Module,
    tx: optax.GradientTransformation,
    label_smoothing: float = 0.0,
    rng: jax.Array | None = None,
    chunk: int | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable:
    """train_step(state, frozen, images, labels, mask=None) -> (state, metrics).

    `preprocess` maps the images before the model inside the step, e.g. the input
    normalisation (`preprocess.normalize`) for loaders that yield images in [0, 255], so that
    the input pipeline does not spend its host cores on it.

    Dropout/drop-path randomness is `fold_in(rng, step)`, so a resumed run draws the same masks.
    The gradient of the batch's mean loss is summed over chunks of images processed one after
    another (`precision.chunk_size`; `chunk=None`: the backend's choice, on CPUs in float32
    chunks of 4.8 MB of token activations, 8 ViT-B/16 images, elsewhere the whole batch at
    once); a chunk's masks are drawn from `fold_in(step_rng, chunk index)`, so on CPUs they
    differ from the batched form's.
    """
    rng = jax.random.key(0) if rng is None else rng
    dtype, image_bytes = getattr(module, "dtype", jnp.float32), _token_bytes(module)

    def train_step(
        state: TrainState,
        frozen: Any,
        images: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None = None,
    ):
        step_rng = jax.random.fold_in(rng, state.step)
        mask = jnp.ones(labels.shape, bool) if mask is None else mask
        count = jnp.maximum(jnp.sum(mask), 1)

        def loss_fn(trainable, key, x, y, m):
            """This chunk's share of the batch's mean loss, and its logits."""
            variables = {"params": merge(trainable, frozen)}
            x = x if preprocess is None else preprocess(x)  # per chunk: stays in cache
            logits = module.apply(variables, x, train=True, rngs={"dropout": key})
            return jnp.sum(_losses(logits, y, label_smoothing) * m) / count, logits

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        size = precision.chunk_size(images.shape[0], dtype, chunk, image_bytes)
        if size is None:
            (loss, logits), grads = grad_fn(state.params, step_rng, images, labels, mask)
        else:
            (loss, logits), grads = _chunked_grads(
                grad_fn, state.params, step_rng, size, (images, labels, mask)
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = (jnp.argmax(logits, -1) == labels) & mask
        metrics = {"loss": loss, "accuracy": jnp.sum(correct) / count}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def _token_bytes(module: flax.linen.Module) -> int | None:
    """`ViTConfig.token_bytes` of a model that has one (sizes CPU chunks)."""
    return getattr(getattr(module, "config", None), "token_bytes", None)


def _chunked_grads(grad_fn: Callable, params: Any, key: jax.Array, size: int, batch: tuple):
    """`grad_fn(params, key, *batch)` summed over chunks of `size` examples under `lax.scan`
    (a last, smaller chunk for the remainder), logits concatenated in order; chunk i draws its
    randomness from fold_in(key, i)."""
    heads, rest = precision.split_batch(batch, size)

    def body(total, xs):
        i, *chunk = xs
        (loss, logits), grads = grad_fn(params, jax.random.fold_in(key, i), *chunk)
        return jax.tree.map(jnp.add, total, (loss, grads)), logits

    num = heads[0].shape[0]
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), logits = jax.lax.scan(body, zeros, (jnp.arange(num), *heads))
    logits = logits.reshape(-1, *logits.shape[2:])
    if rest is not None:
        (rest_loss, rest_logits), rest_grads = grad_fn(params, jax.random.fold_in(key, num), *rest)
        loss, grads = jax.tree.map(jnp.add, (loss, grads), (rest_loss, rest_grads))
        logits = jnp.concatenate([logits, rest_logits])
    return (loss, logits), grads


def make_eval_step(
    module: flax.linen.Module, preprocess: Callable[[jax.Array], jax.Array] | None = None
) -> Callable:
    """eval_step(params, images, labels, mask) -> (number correct, number counted); the forward
    in the backend's fastest form (`precision.eval_form`), after `preprocess` as in
    `make_train_step`."""
    prepare = (lambda x: x) if preprocess is None else preprocess

    forward = precision.eval_form(  # preprocess per chunk, as in the train step
        lambda params, x: module.apply({"params": params}, prepare(x), train=False),
        getattr(module, "dtype", jnp.float32),
        image_bytes=_token_bytes(module),
    )

    def eval_step(params, images, labels, mask):
        logits = forward(params, images)
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
