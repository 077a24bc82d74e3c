"""The Flax NNX API (adapter_plus_jax.nnx): the same model as the Linen one, its Trainable
variables exactly what `trainable_mask` marks, and steps that change nothing else."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import adapter_plus_jax as apj
from adapter_plus_jax import backend, train
from adapter_plus_jax.model import VisionTransformer, ViTConfig

CONFIG = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                   num_classes=5, drop_path_rate=0.2, proj_drop_rate=0.1)  # fmt: skip
# A timm architecture with random weights: the NNX factory's door, as the Linen one's.
TIMM = dict(img_size=32, patch_size=8, depth=2)


def _linen(**specs):
    module = VisionTransformer(CONFIG, **specs)
    params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # away from init's zeros and ones
    noisy = [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    return module, jax.tree.unflatten(tree, noisy)


def _flat(model: apj.nnx.VisionTransformer, kind: type = nnx.Param) -> dict:
    state = nnx.state(model, kind).to_pure_dict()["params"]
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(state).items()}


def _batch(n: int = 6):
    x = jax.random.normal(jax.random.key(2), (n, 32, 32, 3))
    return x, jnp.arange(n) % 5


@pytest.mark.parametrize(
    "specs",
    [
        dict(adapter=apj.AdapterSpec(dim=4)),
        dict(lora=apj.LoRASpec(dim=4)),
        dict(prompt=apj.PromptSpec(num_tokens=3)),
    ],
    ids=["adapter", "lora", "prompt"],
)
def test_logits_equal_the_linen_models_and_trainable_is_trainable_mask(specs) -> None:
    module, params = _linen(**specs)
    model = apj.nnx.VisionTransformer(module, params, rngs=nnx.Rngs(0))
    x, _ = _batch()
    model.eval()
    np.testing.assert_array_equal(model(x), module.apply({"params": params}, x))
    np.testing.assert_array_equal(model(x, pre_logits=True),
                                  module.apply({"params": params}, x, pre_logits=True))  # fmt: skip
    mask = traverse_util.flatten_dict(apj.trainable_mask(params), sep="/")
    trainable = _flat(model, apj.nnx.Trainable)
    assert set(trainable) == {k for k, on in mask.items() if on}
    assert set(_flat(model)) == set(mask)  # every parameter, Trainable or plain nnx.Param
    assert sum(v.size for v in trainable.values()) == apj.trainable_count(params)


def test_create_model_is_the_linen_create_model_as_an_nnx_module() -> None:
    """The same weights as `apj.create_model` given the key the Rngs' 'params' stream draws."""
    model = apj.nnx.create_model("vit_tiny_patch16_224", num_classes=3, adapter=apj.AdapterSpec(),
                                 pretrained=False, rngs=nnx.Rngs(7), **TIMM)  # fmt: skip
    module, variables = apj.create_model("vit_tiny_patch16_224", num_classes=3,
                                         adapter=apj.AdapterSpec(), pretrained=False,
                                         rng=nnx.Rngs(7).params(), **TIMM)  # fmt: skip
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(variables["params"]).items()}
    got = _flat(model)
    assert set(got) == set(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert model.module == module
    assert sum(v.size for v in _flat(model, apj.nnx.Trainable).values()) == apj.trainable_count(
        variables["params"]
    )


def test_linear_mode_trains_the_head_only() -> None:
    module, params = _linen(adapter=apj.AdapterSpec(dim=4))
    model = apj.nnx.VisionTransformer(module, params, mode="linear", rngs=nnx.Rngs(0))
    assert set(_flat(model, apj.nnx.Trainable)) == {"head/bias", "head/kernel"}


def _hand_written_step(model, optimizer, x, y):
    """An NNX step as its documentation writes one: grads of the Trainable variables only."""

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, apj.nnx.Trainable))(model)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("form", ["make_train_step", "hand_written"])
def test_a_step_changes_only_trainable_variables(form: str) -> None:
    module, params = _linen(adapter=apj.AdapterSpec(dim=4))
    model = apj.nnx.VisionTransformer(module, jax.tree.map(jnp.copy, params), rngs=nnx.Rngs(0))
    tx = optax.adamw(1e-2, weight_decay=1e-4, mask=apj.decay_mask)
    optimizer = nnx.Optimizer(model, tx, wrt=apj.nnx.Trainable)
    before, trainable = _flat(model), set(_flat(model, apj.nnx.Trainable))
    x, y = _batch()
    if form == "make_train_step":
        metrics = apj.nnx.make_train_step(model, optimizer)(model, optimizer, x, y)
        assert np.isfinite(float(metrics["loss"]))
    else:
        nnx.jit(_hand_written_step)(model, optimizer, x, y)
    after = _flat(model)
    for key, value in before.items():
        if key in trainable:
            assert not np.array_equal(after[key], value), key  # adam moves every one
        else:
            np.testing.assert_array_equal(after[key], value, err_msg=key)
    assert int(optimizer.step[...]) == 1


def test_make_train_step_computes_the_linen_step() -> None:
    """The NNX step is the Linen step (the backend's plan, chunks included) on the model's
    variables: the same loss and trained parameters, without dropout to tell the keys apart."""
    module = VisionTransformer(CONFIG.replace(drop_path_rate=0.0, proj_drop_rate=0.0),
                               adapter=apj.AdapterSpec(dim=4, drop_path=0.0))  # fmt: skip
    _, params = _linen(adapter=apj.AdapterSpec(dim=4))
    tx = optax.adamw(1e-2, weight_decay=1e-4, mask=apj.decay_mask)
    x, y = _batch(7)
    plan = backend.Plan(chunk=3)  # two chunks and a remainder
    state, frozen = train.init_state(jax.tree.map(jnp.copy, params), tx)
    state, linen_metrics = train.make_train_step(module, tx, plan=plan)(state, frozen, x, y)
    model = apj.nnx.VisionTransformer(module, jax.tree.map(jnp.copy, params), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=apj.nnx.Trainable)
    metrics = apj.nnx.make_train_step(model, optimizer, plan=plan)(model, optimizer, x, y)
    np.testing.assert_allclose(metrics["loss"], linen_metrics["loss"], rtol=1e-6)
    trained = _flat(model, apj.nnx.Trainable)
    for key, value in traverse_util.flatten_dict(state.params).items():
        np.testing.assert_allclose(trained["/".join(key)], value, rtol=0, atol=1e-6)


def test_training_mode_draws_dropout_from_the_models_stream() -> None:
    module, params = _linen(adapter=apj.AdapterSpec(dim=4))
    model = apj.nnx.VisionTransformer(module, params, rngs=nnx.Rngs(0))
    x, _ = _batch()
    assert not model.deterministic  # NNX modules start in training mode
    first, second = model(x), model(x)
    assert not np.allclose(first, second)  # the stream moved on
    key = jax.random.key(4)
    np.testing.assert_array_equal(
        model(x, rngs=key),
        module.apply({"params": params}, x, train=True, rngs={"dropout": key}),
    )
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_eval_step_counts_like_the_linen_one() -> None:
    module, params = _linen(adapter=apj.AdapterSpec(dim=4))
    model = apj.nnx.VisionTransformer(module, params, rngs=nnx.Rngs(0))
    x, _ = _batch()
    labels = jnp.argmax(module.apply({"params": params}, x), -1)
    mask = jnp.arange(6) < 5
    correct, count = apj.nnx.make_eval_step(model)(model, x, labels, mask)
    assert (int(correct), int(count)) == (5, 5)
