"""Heads padded to a common width (`params.head_width`, `train.mask_classes`): a run trains and
evaluates as it would unpadded, and every class count runs one compiled step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_plus_jax import backend, train
from adapter_plus_jax import params as params_lib
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.peft import AdapterSpec

ROOT = Path(__file__).resolve().parents[1]
CLASSES, WIDTH = 5, 16


def _model(num_classes: int) -> VisionTransformer:
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       mlp_dim=64, num_classes=num_classes, proj_drop_rate=0.2,
                       drop_path_rate=0.2)  # fmt: skip
    return VisionTransformer(config, adapter=AdapterSpec(dim=4, dropout=0.2))


def test_head_width_rule() -> None:
    assert params_lib.head_width(10) == params_lib.head_width(128) == 128
    assert params_lib.head_width(397) == 512
    assert params_lib.head_width(10, -1) == 10 and params_lib.head_width(10, 47) == 47
    assert params_lib.head_width(0) == 0  # no head: nothing to pad
    with pytest.raises(ValueError, match="smaller than the 10 classes"):
        params_lib.head_width(10, 4)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_padded_training_equals_unpadded(label_smoothing: float) -> None:
    """Three AdamW steps with a head padded from 5 to 16 classes: the same loss, accuracy and
    parameters as unpadded (to float32 rounding: the products run at another width), padded
    logits never win or get probability, and the padded columns stay exactly zero."""
    import optax

    module = _model(CLASSES)
    x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 3, 4, 4])
    params = module.init(jax.random.key(0), x)["params"]
    padded_module = module.clone(config=module.config.replace(num_classes=WIDTH))
    padded_params = params_lib.resize_head(params, WIDTH)
    tx = train.adamw(optax.constant_schedule(1e-2), weight_decay=0.1)

    def run(m, p, num_classes):
        state, frozen = train.init_state(p, tx)
        step = train.make_train_step(m, tx, label_smoothing, jax.random.key(3), plan=backend.Plan())
        history = []
        for _ in range(3):
            state, metrics = step(state, frozen, x, labels, None, num_classes)
            history.append({k: float(v) for k, v in metrics.items()})
        return state, frozen, history

    state, frozen, history = run(module, params, None)
    padded_state, padded_frozen, padded_history = run(padded_module, padded_params,
                                                      np.int32(CLASSES))  # fmt: skip
    for a, b in zip(history, padded_history, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
        assert a["accuracy"] == b["accuracy"]
    head = padded_state.params["head"]
    assert not np.asarray(head["kernel"][:, CLASSES:]).any()
    assert not np.asarray(head["bias"][CLASSES:]).any()
    cut = params_lib.resize_head(padded_state.params, CLASSES)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=0, atol=2e-6),
                 cut, state.params)  # fmt: skip
    assert max(float(jnp.abs(u - v).max()) for u, v in zip(  # training moved the parameters
        jax.tree.leaves(state.params), jax.tree.leaves(train.init_state(params, tx)[0].params),
        strict=True)) > 1e-3  # fmt: skip

    # Evaluation: the same predictions; a padded logit is -inf and never the argmax.
    evaluate = train.make_eval_step(padded_module, plan=backend.Plan())
    unpadded = train.make_eval_step(module, plan=backend.Plan())
    merged = params_lib.merge(padded_state.params, padded_frozen)
    mask = jnp.ones(6, bool)
    assert [int(v) for v in evaluate(merged, x, labels, mask, np.int32(CLASSES))] == [
        int(v) for v in unpadded(params_lib.merge(state.params, frozen), x, labels, mask)
    ]
    # With every real logit far below zero, the padded ones (zero) would win unmasked.
    bias = merged["head"]["bias"]
    low = {**merged, "head": {**merged["head"], "bias": bias.at[:CLASSES].add(-100.0)}}
    correct = int(evaluate(merged, x, labels, mask, np.int32(CLASSES))[0])
    assert correct > 0 and int(evaluate(low, x, labels, mask, np.int32(CLASSES))[0]) == correct
    logits = train.mask_classes(padded_module.apply({"params": merged}, x), CLASSES)
    assert np.isneginf(np.asarray(logits[:, CLASSES:])).all()
    probs = jax.nn.softmax(logits)
    assert not np.asarray(probs[:, CLASSES:]).any() and np.isfinite(np.asarray(probs)).all()


def test_class_count_and_seed_are_not_compiled_in() -> None:
    """The runner's step takes the class count and the run's key as arguments: runs with other
    class counts (one head width) and other seeds lower to one program."""
    import optax

    module = _model(WIDTH)
    x = jnp.zeros((4, 32, 32, 3))
    params = module.init(jax.random.key(0), x)["params"]
    tx = train.adamw(optax.constant_schedule(1e-3))
    state, frozen = train.init_state(params, tx)
    step = train.make_train_step(module, tx, 0.1, plan=backend.Plan())
    texts = {
        step.lower(
            state, frozen, x, jnp.zeros(4, jnp.int32), None, np.int32(n), jax.random.key(seed)
        ).as_text()  # fmt: skip
        for n, seed in [(3, 18), (5, 45), (16, 25)]
    }
    assert len(texts) == 1


def _folder(root: Path, classes: int, per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(classes)
    for split, count in (("train", per_class), ("test", 2)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (24, 20 + i, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


def test_second_run_with_another_class_count_loads_its_step(tmp_path: Path) -> None:
    """Two folder runs of one backbone (the folder config's default bfloat16) with 3 and 4
    classes, in two processes sharing a compilation cache: the second one's steps come from the
    cache, in at most a quarter of the first one's compile time. Its results hold the class
    count, not the head's width."""
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ADAPTER_PLUS_JAX_COMPILATION_CACHE": str(cache)}
    results = []
    for classes, per_class in ((3, 8), (4, 6)):  # 24 images each: the same steps per epoch
        _folder(tmp_path / f"images{classes}", classes, per_class)
        workdir = tmp_path / f"run{classes}"
        proc = subprocess.run(
            [sys.executable, "main.py", "--config",
             f"configs/folder.py:{tmp_path / f'images{classes}'},epochs=1",
             "--config.model.name=vit_tiny_patch16_224", "--config.model.pretrained=False",
             "--config.batch_size=8", "--config.eval_batch_size=4", "--workdir", str(workdir)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads((workdir / "results.json").read_text()))
    first, second = results
    assert (first["num_classes"], second["num_classes"]) == (3, 4)
    assert first["head_width"] == second["head_width"] == 128
    assert second["compile_s"] <= first["compile_s"] / 4, (first["compile_s"], second["compile_s"])
    assert any(p.name.startswith("jit_train_step") for p in cache.iterdir())
