"""Many tasks on one backbone (adapter_plus_jax/serving.py) and the exported-task format
(adapter_plus_jax/task.py): a mixed batch gives every example its own task's logits, the
task files round-trip, an exported Adapter+ task for ViT-B/16 stays under 1 MB, and predict's
preprocessing is the training pipeline's."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

import adapter_plus_jax as apj
from adapter_plus_jax import backend
from adapter_plus_jax.convert import abstract_params
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.images import resize_bilinear_v1
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.params import param_group
from adapter_plus_jax.serving import TaskSet
from adapter_plus_jax.task import (
    BackboneRecord,
    Task,
    backbone_digest,
    backbone_params,
    read_task,
    write_task,
)
from adapter_plus_jax.tuning import TuneSpec

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
RESIZE = {"kind": "resize", "size": [32, 32]}

# (name, classes, PEFT modules): ranks 2-8, 2-7 classes, adapters at two positions, fixed and
# learned scalings, LoRA on different locations, a head-only task and prompts of two lengths.
SPECS = [
    ("adapter_r4", 5, dict(adapter=apj.AdapterSpec(dim=4))),
    ("adapter_r8", 3, dict(adapter=apj.AdapterSpec(dim=8))),
    ("lora_qk_r2", 7, dict(lora=apj.LoRASpec(dim=2))),
    (
        "lora_qvo_r4",
        4,
        dict(lora=apj.LoRASpec(dim=4, location=("q", "v", "o"), scaling=2.0, bias=True)),
    ),  # fmt: skip
    ("post_fixed", 4, dict(adapter=apj.AdapterSpec(dim=2, scaling=1.5))),
    ("linear", 6, {}),
    ("vpt3_a", 3, dict(prompt=apj.PromptSpec(num_tokens=3))),
    ("vpt3_b", 5, dict(prompt=apj.PromptSpec(num_tokens=3))),
    ("vpt5", 2, dict(prompt=apj.PromptSpec(num_tokens=5))),
    (
        "pfeiffer",
        3,
        dict(adapter=apj.AdapterSpec(config="pfeiffer", norm_layer=True, scaling=1.0, dim=3)),
    ),  # fmt: skip
]
EXPECTED_GROUPS = [[0, 1, 2, 3, 4, 5], [6, 7], [8], [9]]


@pytest.fixture(scope="module")
def tiny() -> tuple[ViTConfig, dict]:
    """The tiny ViT's config and a backbone: timm's random init, with noise on its biases and
    LayerNorms (timm initialises them to 0 and 1, values a task's own could be confused with)."""
    module, variables = apj.create_model("vit_tiny_patch16_224", num_classes=0,
                                         pretrained=False, rng=0, **TINY)  # fmt: skip
    rng = np.random.default_rng(100)
    flat = {
        k: np.asarray(v)
        + (param_group("/".join(k)) in ("bias", "norm", "norm_bias"))
        * rng.normal(0, 0.1, v.shape).astype(np.float32)
        for k, v in traverse_util.flatten_dict(backbone_params(variables["params"])).items()
    }
    return module.config, traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def backbone(tiny) -> dict:
    return tiny[1]


def _task(name: str, num_classes: int, tiny: tuple[ViTConfig, dict], seed: int, **modules) -> Task:
    """A task with these PEFT `modules` (adapter, lora, prompt, tune specs) whose own parameters
    are random (init plus noise: no scaling of one, no zero up projection), on the backbone.
    Initialised eagerly: a compile or a timm model per task would cost more."""
    config, backbone = tiny
    module = VisionTransformer(config.replace(num_classes=num_classes), **modules)
    images = np.zeros((1, *config.img_size, 3), np.float32)
    params = module.init(jax.random.key(seed), images)["params"]
    rng = np.random.default_rng(seed)
    own = {
        k: np.asarray(v) + rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in traverse_util.flatten_dict(params).items()
        if param_group("/".join(k)) in ("peft", "fixed", "head")
    }
    record = BackboneRecord("vit_tiny_patch16_224", backbone_digest(backbone))
    return Task(name, module.config, traverse_util.unflatten_dict(own),
                tuple(f"{name}_{i}" for i in range(num_classes)), RESIZE, record,
                module.adapter, module.lora, module.prompt, tune=module.tune)  # fmt: skip


@pytest.fixture(scope="module")
def tasks(tiny) -> list[Task]:
    return [_task(n, k, tiny, seed, **p) for seed, (n, k, p) in enumerate(SPECS)]


def _own_logits(task: Task, backbone: dict, images: np.ndarray) -> np.ndarray:
    module, variables = task.model(backbone)
    return np.asarray(module.apply(variables, apj.normalize(images, task.config.mean,
                                                            task.config.std)))  # fmt: skip


CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's chunked form")


@pytest.mark.parametrize(
    "cpu_chunk", [None, pytest.param(3, marks=CPU_ONLY)], ids=["whole", "cpu_chunks"]
)
def test_a_shuffled_mixed_batch_gives_each_example_its_own_tasks_logits(
    tasks, backbone, cpu_chunk, monkeypatch
):
    """Also in the form a ViT-B/16 batch takes on CPUs (`cpu_chunks`): each forward of 8 in
    chunks of 3 images under a loop and a remainder of 2, each chunk gathering its own
    examples' task parameters (the tiny model's batches are otherwise never split)."""
    if cpu_chunk:
        chunk_bytes = cpu_chunk * backend.image_bytes(tasks[0].config)
        monkeypatch.setattr(backend, "CHUNK_BYTES", chunk_bytes)
        assert backend.plan(tasks[0].module()).chunk_size(8) == cpu_chunk
    serving = TaskSet(tasks, backbone, batch_size=8)  # 30 examples: batches and padding
    assert [g.members for g in serving.groups] == EXPECTED_GROUPS
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.repeat(np.arange(len(tasks)), 3))
    images = rng.uniform(0, 255, (len(ids), 32, 32, 3)).astype(np.float32)
    logits = serving.logits(images, ids)
    for i, task in enumerate(tasks):
        rows = np.flatnonzero(ids == i)
        got = np.stack([logits[r] for r in rows])
        assert got.shape == (3, task.num_classes)
        np.testing.assert_allclose(got, _own_logits(task, backbone, images[rows]), atol=1e-5,
                                   rtol=0, err_msg=task.name)  # fmt: skip
    top = serving.predict(images[:2], ids[:2], top_k=2)
    assert [p.name for p in top[0]][0].startswith(tasks[ids[0]].name)
    assert abs(sum(p.probability for p in serving.predict(images[:1], ids[:1], 99)[0]) - 1) < 1e-6


def test_a_merged_lora_task_is_served_beside_unmerged_ones(tasks, backbone):
    lora = tasks[2]
    module, variables = lora.model(backbone)
    plain, merged = apj.merge_lora(module, variables)
    merged_task = dataclasses.replace(lora, name="merged", config=plain.config, lora=None,
                                      params=merged["params"], merged=True)  # fmt: skip
    serving = TaskSet([tasks[0], merged_task, lora], backbone, batch_size=4)
    assert [g.members for g in serving.groups] == [[0, 2], [1]]  # merged: its own weights
    images = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    ids = [1, 0, 2, 1, 2, 0]
    logits = serving.logits(images, ids)
    reference = _own_logits(lora, backbone, images)
    for row, task_id in enumerate(ids):
        if task_id:
            np.testing.assert_allclose(logits[row], reference[row], atol=1e-5, rtol=0)


def _with_vectors(task: Task, backbone: dict, groups: tuple[str, ...], seed: int) -> Task:
    """`task` that also trained the backbone's vectors of `groups` (random values)."""
    rng = np.random.default_rng(seed)
    vectors = {k: np.asarray(v) + rng.normal(0, 0.1, v.shape).astype(np.float32)
               for k, v in traverse_util.flatten_dict(backbone).items()
               if param_group("/".join(k)) in groups}  # fmt: skip
    own = {**traverse_util.flatten_dict(task.params), **vectors}
    name = f"{task.name}+{'+'.join(groups)}"
    return dataclasses.replace(task, name=name, params=traverse_util.unflatten_dict(own))


def _assert_each_example_gets_its_tasks_logits(serving: TaskSet, backbone: dict) -> None:
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.repeat(np.arange(len(serving.tasks)), 2))
    images = rng.uniform(0, 255, (len(ids), 32, 32, 3)).astype(np.float32)
    logits = serving.logits(images, ids)
    for i, task in enumerate(serving.tasks):
        rows = np.flatnonzero(ids == i)
        got = np.stack([logits[r] for r in rows])
        np.testing.assert_allclose(got, _own_logits(task, backbone, images[rows]), atol=1e-5,
                                   rtol=0, err_msg=task.name)  # fmt: skip


def test_tasks_of_trained_backbone_vectors_join_the_mixed_batch(tasks, backbone):
    """BitFit (every bias), LN-tune (every LayerNorm) and train_ln (adapters and LayerNorms)
    tasks share the adapter and LoRA tasks' forward: their vectors are gathered per example,
    the others' are the backbone's."""
    bitfit = _with_vectors(tasks[5], backbone, ("bias", "norm_bias"), 1)
    ln_tune = _with_vectors(tasks[5], backbone, ("norm", "norm_bias"), 2)
    train_ln = _with_vectors(tasks[0], backbone, ("norm", "norm_bias"), 3)
    serving = TaskSet(
        [tasks[0], bitfit, tasks[2], ln_tune, train_ln, tasks[6]], backbone, batch_size=8
    )
    assert [g.members for g in serving.groups] == [[0, 1, 2, 3, 4], [5]]
    _assert_each_example_gets_its_tasks_logits(serving, backbone)


# Tasks of `tuning`'s methods: two of each method and settings share a forward; another rank,
# method or set of layers is another group.
TUNED = [
    ("lora_a", 3, TuneSpec(kind="lora", targets=("qkv", "fc1"), dim=2)),
    ("dora_a", 4, TuneSpec(kind="dora", dim=2)),
    ("lora_b", 5, TuneSpec(kind="lora", targets=("qkv", "fc1"), dim=2)),
    ("lora_r4", 3, TuneSpec(kind="lora", targets=("qkv", "fc1"), dim=4)),
    ("dora_b", 2, TuneSpec(kind="dora", dim=2)),
    ("ia3_a", 3, TuneSpec(kind="ia3", targets=("qkv", "fc2"))),
    ("ia3_b", 6, TuneSpec(kind="ia3", targets=("qkv", "fc2"))),
    ("vera_a", 3, TuneSpec(kind="vera", targets=("qkv", "fc1"), dim=4)),
    ("vera_b", 4, TuneSpec(kind="vera", targets=("qkv", "fc1"), dim=4)),
    ("ssf_a", 3, TuneSpec(kind="ssf")),
    ("ssf_b", 5, TuneSpec(kind="ssf")),
    ("fact_tt_a", 3, TuneSpec(kind="fact_tt", dim=2)),
    ("fact_tt_b", 2, TuneSpec(kind="fact_tt", dim=2)),
    ("fact_tk_a", 4, TuneSpec(kind="fact_tk", dim=2)),
    ("fact_tk_b", 3, TuneSpec(kind="fact_tk", dim=2)),
]


def test_tasks_of_one_tuning_method_and_shapes_share_a_mixed_batch(tiny, backbone):
    tuned = [_task(n, k, tiny, 20 + i, tune=t) for i, (n, k, t) in enumerate(TUNED)]
    serving = TaskSet(tuned, backbone, batch_size=8)
    assert [g.members for g in serving.groups] == [
        [0, 2], [1, 4], [3], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14]
    ]  # fmt: skip
    _assert_each_example_gets_its_tasks_logits(serving, backbone)


def test_tasks_with_weights_of_their_own_are_served_alone(tasks, backbone):
    """train_ln (norms trained: needs the rest of the backbone) and fine-tuned (all weights,
    needs none) tasks compute what their own models compute; a fine-tuned task (whole weight
    matrices of its own) is in a group of its own."""
    rng = np.random.default_rng(7)
    flat_backbone = traverse_util.flatten_dict(backbone)
    norms = {k: np.asarray(v) + rng.normal(0, 0.1, v.shape).astype(np.float32)
             for k, v in flat_backbone.items()
             if param_group("/".join(k)) in ("norm", "norm_bias")}  # fmt: skip
    base = tasks[0]
    train_ln = dataclasses.replace(base, name="train_ln", params=traverse_util.unflatten_dict(
        {**traverse_util.flatten_dict(base.params), **norms}))  # fmt: skip
    full = {k: np.asarray(v) + rng.normal(0, 0.02, v.shape).astype(np.float32)
            for k, v in flat_backbone.items()}  # fmt: skip
    finetuned = dataclasses.replace(base, name="finetuned", params=traverse_util.unflatten_dict(
        {**full, **traverse_util.flatten_dict(base.params)}))  # fmt: skip
    assert train_ln.needs_backbone and not finetuned.needs_backbone
    serving = TaskSet([base, train_ln, finetuned], backbone, batch_size=4)
    assert [g.members for g in serving.groups] == [[0, 1], [2]]
    images = np.random.default_rng(2).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    ids = [2, 1, 0, 1, 2, 0]
    logits = serving.logits(images, ids)
    for row, i in enumerate(ids):
        task = [base, train_ln, finetuned][i]
        expected = _own_logits(task, backbone if i < 2 else None, images[row : row + 1])[0]
        np.testing.assert_allclose(logits[row], expected, atol=1e-5, rtol=0)
    assert TaskSet([finetuned], None).logits(images[:1], [0])[0].shape == (5,)
    with pytest.raises(ValueError, match="needs the backbone"):
        TaskSet([train_ln], None)


def test_tasks_of_another_backbone_are_refused(tasks, backbone):
    other = dict(backbone)
    other["norm"] = {**backbone["norm"], "scale": np.asarray(backbone["norm"]["scale"]) * 2}
    with pytest.raises(SetupError, match="not all trained on this backbone"):
        TaskSet(tasks[:2], other)


def test_tasks_round_trip_through_their_files(tasks, backbone, tmp_path):
    serving_tasks = []
    for task in tasks:
        write_task(tmp_path / task.name, task)
        back = read_task(tmp_path / task.name)
        assert (back.name, back.config, back.class_names, back.backbone) == (
            task.name, task.config, task.class_names, task.backbone)  # fmt: skip
        assert (back.adapter, back.lora, back.prompt) == (task.adapter, task.lora, task.prompt)
        flat, flat_back = (traverse_util.flatten_dict(t.params) for t in (task, back))
        assert flat.keys() == flat_back.keys()
        assert all(np.array_equal(flat[k], flat_back[k]) for k in flat)
        serving_tasks.append(back)
    with pytest.raises(FileExistsError):
        write_task(tmp_path / tasks[0].name, tasks[0])
    (tmp_path / "adapter_r4" / "params.safetensors").write_bytes(b"cut short")
    with pytest.raises(SetupError, match="Cannot read"):
        read_task(tmp_path / "adapter_r4")
    with pytest.raises(SetupError, match="expected a task directory"):
        read_task(tmp_path / "missing")
    # A task file without its head, or with a wrong number of class names: refused on reading.
    lora = tasks[2]
    flat = traverse_util.flatten_dict(lora.params)
    headless = {k: v for k, v in flat.items() if k[0] != "head"}
    write_task(tmp_path / "headless", dataclasses.replace(
        lora, params=traverse_util.unflatten_dict(headless)))  # fmt: skip
    with pytest.raises(SetupError, match="head/kernel .missing."):
        read_task(tmp_path / "headless")
    document = json.loads((tmp_path / "lora_qk_r2" / "task.json").read_text())
    document["class_names"] = document["class_names"][:-1]
    (tmp_path / "lora_qk_r2" / "task.json").write_text(json.dumps(document))
    with pytest.raises(SetupError, match="6 class names for 7 classes"):
        read_task(tmp_path / "lora_qk_r2")


def test_an_adapter_plus_task_for_vit_b16_with_47_classes_is_under_1_mb(tmp_path):
    config = apj.ViTConfig(num_classes=47)  # ViT-B/16
    module = apj.VisionTransformer(config, adapter=apj.AdapterSpec())
    own = {
        k: np.zeros(v.shape, np.float32)
        for k, v in traverse_util.flatten_dict(abstract_params(module)).items()
        if param_group("/".join(k)) in ("peft", "fixed", "head")
    }
    task = Task("dtd", config, traverse_util.unflatten_dict(own),
                tuple(str(i) for i in range(47)), {"kind": "resize", "size": [224, 224]},
                BackboneRecord("vit_base_patch16_224.orig_in21k", "0" * 64),
                adapter=module.adapter)  # fmt: skip
    assert (
        apj.trainable_count(traverse_util.unflatten_dict(own))
        == 12 * (2 * 768 * 8 + 8 + 768 + 768) + 768 * 47 + 47
    )
    out = write_task(tmp_path / "dtd", task)
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 1_000_000, size


@pytest.mark.parametrize("shape", [(49, 49), (103, 103), (300, 200), (200, 301)])
def test_predicts_fgvc_resize_has_the_training_pipelines_sizes(shape):
    """Same output size and crop window as the FGVC eval pipeline (Pillow's bicubic vs TF's:
    close pixels, not equal)."""
    import tensorflow as tf

    from adapter_plus_jax.data.fgvc import eval_image
    from adapter_plus_jax.images import resize_shorter_crop

    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (shape[0] // 8 + 2, shape[1] // 8 + 2, 3)).astype(np.float32)
    image = np.clip(resize_bilinear_v1(smooth, shape), 0, 255).astype(np.uint8)
    expected = eval_image(tf.constant(image)).numpy()
    got = resize_shorter_crop(image, 256, 224)
    assert got.shape == expected.shape == (224, 224, 3)
    assert np.abs(got - expected).mean() < 1.5


@pytest.mark.parametrize("shape", [(37, 53), (20, 20), (32, 32), (300, 200)])
def test_predicts_resize_is_the_training_pipelines(shape):
    import tensorflow as tf

    from adapter_plus_jax.data.tfdata import resize_bilinear_v1 as tf_resize

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = tf_resize(tf.constant(image), 32).numpy()
    np.testing.assert_allclose(resize_bilinear_v1(image, (32, 32)), expected, atol=1e-4, rtol=0)


def test_the_backbone_digest_sees_every_backbone_weight_and_nothing_else(backbone, tasks):
    digest = backbone_digest(backbone)
    full = {**traverse_util.flatten_dict(backbone), **traverse_util.flatten_dict(tasks[0].params)}
    assert backbone_digest(traverse_util.unflatten_dict(full)) == digest  # PEFT, head: ignored
    changed = traverse_util.flatten_dict(backbone)
    key = ("blocks_1", "mlp", "fc2", "bias")
    changed[key] = np.asarray(changed[key]).copy()
    changed[key][3] += 1e-6
    assert backbone_digest(traverse_util.unflatten_dict(changed)) != digest
    assert jax.tree.structure(backbone) == jax.tree.structure(backbone_params(backbone))
