"""The Flax NNX API: the ViT with its PEFT modules as an `nnx.Module`.

    import optax
    from flax import nnx
    import adapter_plus_jax as apj

    model = apj.nnx.create_model("ported/vit_b16_in21k", num_classes=10,
                                 adapter=apj.AdapterSpec(), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=apj.nnx.Trainable)
    train_step = apj.nnx.make_train_step(model, optimizer)
    metrics = train_step(model, optimizer, images, labels)      # images normalised

The parameters that `params.trainable_mask` marks (adapters, LoRA branches, prompts and head,
for PEFT) are `Trainable` variables (an `nnx.Param`), the frozen backbone's plain `nnx.Param`s,
so `wrt=Trainable` trains exactly what the Linen API trains. The computation is the Linen model's
(`model.VisionTransformer`, held as `model.module`), so both give the same logits on the same
weights. `make_train_step` builds the step in the backend's form, as `train.make_train_step`
does for Linen; `model(images)` after `model.train()` is an ordinary NNX call for loops of one's
own (`nnx.value_and_grad(..., argnums=nnx.DiffState(0, Trainable))`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from adapter_plus_jax import backend, factory, train
from adapter_plus_jax.params import merge, trainable_mask


class Trainable(nnx.Param):
    """A parameter that training updates (`params.trainable_mask`): for PEFT, the adapters,
    LoRA branches, prompts and the head."""


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class VisionTransformer(nnx.Module):
    """A Linen `model.VisionTransformer` and its parameters as an NNX module.

    Args:
      module: the Linen model (its PEFT modules and dtype included).
      params: its 'params' collection.
      mode: which parameters are `Trainable` ('peft', 'linear', 'train_ln', 'finetune'; see
        `params.trainable_mask`); the others are `nnx.Param`.
      rngs: the 'dropout' stream (or the default one) draws training-mode masks.

    As NNX's own layers, it starts in training mode: `model.eval()` turns dropout and drop path
    off, `model.train()` on again.
    """

    def __init__(
        self,
        module: linen.Module,
        params: Mapping[str, Any],
        *,
        mode: str = "peft",
        rngs: nnx.Rngs,
    ) -> None:
        self.module = module
        mask = trainable_mask(params, mode)
        # Trainable arrays are copied: the train step donates them, and `params` stays usable.
        self.params = nnx.data(jax.tree.map(
            lambda p, t: Trainable(jnp.copy(p)) if t else nnx.Param(p), dict(params), mask
        ))  # fmt: skip
        self.rngs = rngs["dropout"].fork()
        self.deterministic = False

    def linen_variables(self) -> dict[str, Any]:
        """{'params': the parameters as arrays}, the Linen model's variables."""
        return {"params": jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)}

    def __call__(
        self, images: jax.Array, *, pre_logits: bool = False, rngs: jax.Array | None = None
    ) -> jax.Array:
        """images [batch, height, width, channels], normalised -> logits [batch, classes] (or
        the pre-logit features). In training mode the masks draw from `rngs` (a key) or from
        the module's stream."""
        train_mode = not self.deterministic
        key = (self.rngs() if rngs is None else rngs) if train_mode else None
        return self.module.apply(
            self.linen_variables(), images, train=train_mode, pre_logits=pre_logits,
            rngs=None if key is None else {"dropout": key},
        )  # fmt: skip


def create_model(
    name_or_dir: str | os.PathLike,
    *,
    num_classes: int,
    adapter: Any = None,
    lora: Any = None,
    prompt: Any = None,
    pretrained: bool = True,
    rngs: nnx.Rngs | None = None,
    mode: str = "peft",
    **kwargs: Any,
) -> VisionTransformer:
    """`factory.create_model` as an NNX module (see `VisionTransformer`): the same arguments,
    with `rngs` (default `nnx.Rngs(0)`) instead of `rng`; its 'params' stream draws the fresh
    parameters. `mode` picks the `Trainable` parameters."""
    rngs = nnx.Rngs(0) if rngs is None else rngs
    module, variables = factory.create_model(
        name_or_dir, num_classes=num_classes, adapter=adapter, lora=lora, prompt=prompt,
        pretrained=pretrained, rng=rngs.params(), **kwargs,
    )  # fmt: skip
    return VisionTransformer(module, variables["params"], mode=mode, rngs=rngs)


_FROZEN = nnx.All(nnx.Param, nnx.Not(Trainable))


def make_train_step(
    model: VisionTransformer,
    optimizer: nnx.Optimizer,
    label_smoothing: float = 0.0,
    *,
    input_fn: Callable[[jax.Array], jax.Array] | None = None,
    plan: backend.Plan | None = None,
) -> Callable:
    """train_step(model, optimizer, images, labels, mask=None) -> metrics {'loss', 'accuracy'}:
    one optimizer step on the `Trainable` parameters, in place, computed as
    `train.make_train_step` computes it (the backend's plan: its chunks and compiler options;
    each example's dropout and drop-path masks from its own key, the step's key drawn from the
    model's stream). `optimizer` is an `nnx.Optimizer` over `wrt=Trainable`; `input_fn` as in
    `train.make_train_step`. The step donates the trainable parameters and the optimizer state
    (the frozen backbone is not)."""
    plan = backend.plan(model.module) if plan is None else plan
    graphdef, _, _ = nnx.split((model, optimizer), _FROZEN, ...)
    prepare = (lambda x: x) if input_fn is None else input_fn

    def pure(state, frozen_state, images, labels, mask):
        model, optimizer = nnx.merge(graphdef, frozen_state, state)
        frozen = nnx.state(model, _FROZEN).to_pure_dict()["params"]

        def apply(trainable, key, x):
            params = merge(trainable.to_pure_dict()["params"], frozen)
            return model.module.apply({"params": params}, prepare(x), train=True,
                                      rngs={"dropout": key})  # fmt: skip

        (loss, logits), grads = train.loss_and_grads(
            apply, nnx.state(model, Trainable), model.rngs(), images, labels, mask,
            label_smoothing, plan.chunk_size(images.shape[0]),
        )  # fmt: skip
        optimizer.update(model, grads)
        state = nnx.state((model, optimizer), nnx.Not(_FROZEN))
        return state, train.step_metrics(loss, logits, labels, mask)

    jitted = plan.jit(pure, donate_argnums=0)

    def train_step(model, optimizer, images, labels, mask=None):
        mask = jnp.ones(jnp.shape(labels), bool) if mask is None else mask
        _, frozen, state = nnx.split((model, optimizer), _FROZEN, ...)
        state, metrics = jitted(state, frozen, images, labels, mask)
        nnx.update((model, optimizer), state)
        return metrics

    return train_step


def make_eval_step(
    model: VisionTransformer,
    *,
    input_fn: Callable[[jax.Array], jax.Array] | None = None,
    plan: backend.Plan | None = None,
) -> Callable:
    """eval_step(model, images, labels, mask) -> (number correct, number counted), as
    `train.make_eval_step` computes it."""
    step = train.make_eval_step(model.module, input_fn=input_fn, plan=plan)

    def eval_step(model, images, labels, mask):
        return step(model.linen_variables()["params"], images, labels, mask)

    return eval_step
