"""main.py and the training loop: data parallelism, what is trained and computed, and bad
input failing before any compute. (What a workdir survives: test_workdir.py.)

Runs use configs/demo.py (scikit-learn digits written as a local TFDS dataset, random-init
timm backbone), shrunk further with overrides so that each run takes seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import ROOT, final_state, load_config, main_process

from adapter_plus_jax import experiment, peft, runner, train
from adapter_plus_jax import params as params_lib
from adapter_plus_jax.params import param_count, trainable_mask


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config=configs/vtab.py:no_such_task"], "Unknown VTAB-1k task 'no_such_task'"),
        (["--config=configs/vtab.py:dtd,method=adapterplus"], "Unknown method 'adapterplus'"),
        (["--config=configs/demo.py", "--config.no_such_key=1"], "no_such_key"),
    ],
    ids=["unknown_task", "unknown_method", "unknown_config_key"],
)
def test_bad_command_line_fails_with_a_clear_message(tmp_path, args, message) -> None:
    out, _ = main_process(tmp_path / "w", *args).communicate(timeout=120)
    assert message in out
    assert not (tmp_path / "w").exists()


def test_missing_weights_offline_fails_before_compute(tmp_path: Path, hf_offline) -> None:
    config = load_config("demo")
    config.model.pretrained = True
    config.model.weights_dir = str(tmp_path / "weights")
    with pytest.raises(runner.SetupError, match="apj port --model vit_tiny_patch16_224"):
        runner.run(config, tmp_path / "w")
    assert not (tmp_path / "w").exists() and not (tmp_path / "weights").exists()


def test_data_dir_without_the_dataset_fails_before_compute(tmp_path: Path) -> None:
    config = load_config("vtab", "dtd")
    config.data_dir = str(tmp_path / "empty")
    with pytest.raises(runner.SetupError, match="dtd.* is not prepared in .*empty"):
        runner.run(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_eight_devices_train_like_one_and_reject_indivisible_batches(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from adapter_plus_jax import experiment, peft, train
        from adapter_plus_jax.data.pipeline import data_mesh
        from adapter_plus_jax.params import split, trainable_mask
        from adapter_plus_jax.model import VisionTransformer, ViTConfig
        assert jax.device_count() == 8
        cfg = ViTConfig(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        mlp_dim=64, num_classes=4)
        module = VisionTransformer(cfg, adapter=peft.AdapterSpec(dim=4, scaling="channel"))
        x = jnp.zeros((1, 16, 16, 3))
        # numpy, so that each run's device_put makes fresh arrays (the step donates them).
        params = jax.tree.map(np.asarray, module.init(jax.random.key(0), x)["params"])
        rng = np.random.default_rng(0)
        data = [(rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                 rng.integers(0, 4, 16).astype(np.int32)) for _ in range(4)]

        def run(mesh):
            trainable, frozen = split(params, trainable_mask(params))
            tx = train.adamw(train.reference_lr(1e-2, 2, warmup_epochs=1, epochs=2))
            state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
            state, frozen = experiment.replicate(state, mesh), experiment.replicate(frozen, mesh)
            step = train.make_train_step(module, tx)  # jitted, the state donated
            shard = NamedSharding(mesh, P("data"))
            for images, labels in data:
                batch = jax.device_put(images, shard), jax.device_put(labels, shard)
                state, _ = step(state, frozen, *batch)
            return jax.tree.map(np.asarray, state.params)

        many, one = run(data_mesh()), run(data_mesh(jax.devices()[:1]))
        err = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(many),
                                                       jax.tree.leaves(one)))
        print("max difference", err)
        assert err <= 1e-5, err
        try:
            experiment.check_batch(12)
        except experiment.SetupError as e:
            print("rejected:", e)
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rejected: batch_size=12 is not divisible by the 8 devices" in done.stdout


def _train_step_costs(train_mode: str) -> tuple[float, float, int, int]:
    """(train-step FLOPs, forward FLOPs, optimizer-state size, trainable size) for ViT-B/16
    Adapter+ r=8 with a 47-class head, from XLA's compiled cost analysis (batch 1)."""
    from adapter_plus_jax.model import VisionTransformer, ViTConfig

    module = VisionTransformer(
        ViTConfig(num_classes=47), adapter=peft.AdapterSpec(dim=8, scaling="channel")
    )
    images = jnp.zeros((1, 224, 224, 3))
    params = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    trainable, frozen = params_lib.split(params, trainable_mask(params, train_mode))
    tx = train.adamw(train.reference_lr(1e-3, 15))
    opt_state = jax.eval_shape(tx.init, trainable)
    state = train.TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, opt_state)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    step = train.make_train_step(module, tx).lower(state, frozen, images, labels)
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, images)
    flops = [c.compile().cost_analysis()["flops"] for c in (step, forward)]
    return flops[0], flops[1], param_count(opt_state), param_count(trainable)


def test_adapter_training_costs_at_most_2_2_forwards_and_2x_state() -> None:
    step, forward, opt_size, n_trainable = _train_step_costs("peft")
    assert n_trainable == 202_127  # the paper's count for r=8, 47 classes
    assert 2 * n_trainable <= opt_size <= 2 * n_trainable + 16  # Adam's mu and nu (+ counts)
    print(f"Adapter+ train step / forward FLOPs: {step / forward:.3f}")
    assert step / forward <= 2.2
    step_ft, forward_ft, _, _ = _train_step_costs("finetune")
    print(f"full fine-tuning train step / forward FLOPs: {step_ft / forward_ft:.3f}")
    assert step_ft / forward_ft >= 2.8  # the measure sees weight gradients when they exist


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    config = load_config("demo", "epochs=4")
    config.model.timm_kwargs.depth = 1
    config.model.timm_kwargs.patch_size = 8
    config.checkpoint_every_epochs = 1
    # Epochs 0 and 1 run at lr 1e-3 (the warmup start), epoch 2 at 1e30: it diverges there.
    config.lr, config.lr_start_factor, config.warmup_epochs = 1e30, 1e33, 1
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        runner.run(config, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [20, 40]
    state = final_state(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    assert not (tmp_path / "results.json").exists()


def test_pretrained_weights_reach_the_trained_model(tmp_path: Path, monkeypatch) -> None:
    """Every backbone parameter of the model runner.run (main.py's loop) trains is the ported
    file's value, when training starts and, frozen, when it has ended."""
    import timm
    from safetensors.numpy import load_file

    from adapter_plus_jax.convert import from_timm
    from adapter_plus_jax.pretrained import PARAMS_FILE, save_pretrained

    config = load_config("demo", "epochs=2")
    kwargs = dict(config.model.timm_kwargs, depth=1)
    torch_model = timm.create_model(config.model.name, pretrained=False, num_classes=0, **kwargs)
    backbone, variables = from_timm(torch_model)
    ported_dir = tmp_path / "weights" / config.model.name
    save_pretrained(ported_dir, backbone.config, variables["params"], torch_model.pretrained_cfg)
    ported = load_file(str(ported_dir / PARAMS_FILE))  # read back independently of our loader
    config.model.pretrained = True
    config.model.weights_dir = str(tmp_path / "weights")

    seen = {}

    def flat(params) -> dict[str, np.ndarray]:
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        return {"/".join(k.key for k in path): np.asarray(v) for path, v in paths}

    def spy_split(params, mask):  # called once, on the initial parameters
        seen.setdefault("start", flat(params))
        return split(params, mask)

    def spy_evaluate(step, params, batches):  # called with the trained parameters
        seen["end"] = flat(params)
        return evaluate(step, params, batches)

    split, evaluate = train.split, train.evaluate_counts
    monkeypatch.setattr(runner.train, "split", spy_split)
    monkeypatch.setattr(runner.train, "evaluate_counts", spy_evaluate)
    runner.run(config, tmp_path / "w")

    start, end = seen["start"], seen["end"]
    assert ported.keys() < start.keys() and start.keys() == end.keys()
    for key, value in ported.items():
        np.testing.assert_array_equal(start[key], value, err_msg=f"{key} at the start")
        np.testing.assert_array_equal(end[key], value, err_msg=f"{key} after training")
    trained = [k for k in start if k not in ported]
    assert any(k.startswith("head/") for k in trained) and any("adapter" in k for k in trained)
    assert all(not np.array_equal(start[k], end[k]) for k in trained if k.endswith("kernel"))


def test_any_tfds_dataset_through_configs_tfds(tmp_path: Path, monkeypatch) -> None:
    """configs/tfds.py:NAME trains on a TFDS dataset (mocked: 16 random examples per split) with
    the class count read from the builder's info (cifar10: 10), from a backbone given as a
    directory written by the porter."""
    import tensorflow_datasets as tfds
    import timm

    from adapter_plus_jax import config as cfglib
    from adapter_plus_jax.convert import from_timm
    from adapter_plus_jax.pretrained import save_pretrained

    config = cfglib.load_config("configs/tfds.py:cifar10,epochs=1,train_split=train[:16]")
    assert (config.dataset, config.tfds_name, config.num_classes) == ("tfds", "cifar10", 0)
    kwargs = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    torch_model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    backbone, variables = from_timm(torch_model)
    ported = tmp_path / "ported"
    save_pretrained(ported, backbone.config, variables["params"], torch_model.pretrained_cfg)
    config.model.name = str(ported)
    config.model.dtype = "float32"
    config.batch_size = config.eval_batch_size = 8
    config.data_dir = str(tmp_path / "tfds")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    seen = {}
    build = experiment.build_model

    def spy(config, num_classes, rng):
        seen["num_classes"] = num_classes
        return build(config, num_classes, rng)

    monkeypatch.setattr(experiment, "build_model", spy)
    with tfds.testing.mock_data(num_examples=16):
        results = runner.run(config, tmp_path / "w")
    assert seen["num_classes"] == 10 and results["task"] == "cifar10"
    assert 0.0 <= results["test_accuracy"] <= 1.0


def test_tfds_config_needs_a_name() -> None:
    from adapter_plus_jax import config as cfglib

    with pytest.raises(ValueError, match="needs a TFDS builder name"):
        cfglib.load_config("configs/tfds.py")


def test_runs_steps_take_images_in_0_255_and_normalise_them() -> None:
    """runner.py's loaders yield images in [0, 255]: the steps runs use (`run_train_step`,
    `run_eval_step`) train and evaluate on them exactly as the plain steps do on the normalised
    images."""
    import optax

    from adapter_plus_jax.images import normalize
    from adapter_plus_jax.model import VisionTransformer, ViTConfig

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       mlp_dim=64, num_classes=5, mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225))  # fmt: skip
    module = VisionTransformer(config, adapter=peft.AdapterSpec(dim=4))
    raw = jax.random.uniform(jax.random.key(1), (6, 32, 32, 3), maxval=255.0)
    x = normalize(raw, config.mean, config.std)
    labels, mask = jnp.arange(6) % 5, jnp.ones(6, bool)
    params = module.init(jax.random.key(0), x)["params"]
    trainable, frozen = params_lib.split(params, trainable_mask(params))
    tx, rng = optax.sgd(1.0), jax.random.key(3)

    def state() -> train.TrainState:  # a fresh copy: the run's train step donates it
        own = jax.tree.map(jnp.copy, trainable)
        return train.TrainState(jnp.zeros((), jnp.int32), own, tx.init(own))

    run_train, run_eval = (
        experiment.run_train_step(module, tx, 0.1, rng),
        experiment.run_eval_step(module),
    )
    got, got_metrics = run_train(state(), frozen, raw, labels, mask)
    want, want_metrics = train.make_train_step(module, tx, 0.1, rng)(state(), frozen, x, labels,
                                                                     mask)  # fmt: skip
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 got.params, want.params)  # fmt: skip
    # Weights far from init (its zero head gives every image class 0, normalised or not).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noisy = jax.tree.unflatten(tree, [v + 0.2 * jax.random.normal(k, v.shape)
                                      for v, k in zip(leaves, keys, strict=True)])  # fmt: skip
    labels = jnp.argmax(module.apply({"params": noisy}, x), -1)  # all correct when normalised
    assert (jnp.argmax(module.apply({"params": noisy}, raw), -1) != labels).any()
    correct, count = run_eval(noisy, raw, labels, mask)
    assert (int(correct), int(count)) == (6, 6)
