"""After training: `python -m adapter_plus_jax.export` turns a finished demo run into a task
directory that reproduces the run's model and accuracy, and `python -m adapter_plus_jax.predict`
classifies image files with one or several tasks, reporting bad files and refusing a backbone
the tasks were not trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from runs import final_state, tiny_demo

from adapter_plus_jax import export, predict, runner
from adapter_plus_jax.data import demo
from adapter_plus_jax.images import decode, normalize
from adapter_plus_jax.params import resize_head
from adapter_plus_jax.pretrained import load_pretrained
from adapter_plus_jax.serving import TaskSet
from adapter_plus_jax.task import backbone_digest, load_backbone, read_task


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished 2-epoch demo runs: Adapter+ and LoRA (same seed, hence the same backbone)."""
    root = tmp_path_factory.mktemp("runs")
    runner.run(tiny_demo(2), root / "adapter")
    runner.run(tiny_demo(2, "method=lora,dim=4"), root / "lora")
    return {"adapter": root / "adapter", "lora": root / "lora", "root": root}


@pytest.fixture(scope="module")
def exported(runs) -> dict[str, Path]:
    out = runs["root"] / "tasks"
    assert export.main(["--workdir", str(runs["adapter"]), "--out", str(out / "digits")]) == 0
    assert export.main(["--workdir", str(runs["lora"]), "--out", str(out / "digits_lora")]) == 0
    assert export.main(["--workdir", str(runs["lora"]), "--out", str(out / "digits_merged"),
                        "--merge-lora"]) == 0  # fmt: skip
    return {name: out / name for name in ("digits", "digits_lora", "digits_merged")}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    demo.write_test_images(folder / "digits", 6)
    (folder / "digits" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _test_split() -> tuple[np.ndarray, np.ndarray]:
    all_images, labels = demo._images()
    return all_images[demo.NUM_TRAIN :], labels[demo.NUM_TRAIN :]


def test_the_exported_task_is_the_runs_model(runs, exported):
    files = sorted(p.name for p in exported["digits"].iterdir())
    assert files == ["params.safetensors", "task.json"]
    results = json.loads((runs["adapter"] / "results.json").read_text())
    task = read_task(exported["digits"])
    # Exactly the checkpoint's trained parameters, nothing of the backbone; the head, padded
    # for training, cut back to the 10 classes.
    assert final_state(runs["adapter"])["params"]["head"]["bias"].shape == (128,)
    trained = traverse_util.flatten_dict(resize_head(final_state(runs["adapter"])["params"], 10))
    own = traverse_util.flatten_dict(task.params)
    assert own.keys() == trained.keys()
    assert all(np.array_equal(own[k], trained[k]) for k in own)
    assert sum(v.size for v in own.values()) == results["trainable_params"]
    assert task.class_names == tuple(str(i) for i in range(10))
    assert task.preprocessing["kind"] == "resize" and task.preprocessing["size"] == [32, 32]
    assert task.info["test_accuracy"] == results["test_accuracy"]
    # The backbone is rebuilt from the record (timm's random init, seed 18) and matches.
    backbone = load_backbone(task.backbone)
    assert backbone_digest(backbone) == task.backbone.sha256
    # The task's model has the run's test accuracy on the demo's test split.
    test_images, labels = _test_split()
    logits = TaskSet([task], backbone, batch_size=100).logits(test_images, [0] * len(labels))
    accuracy = np.mean(np.argmax(np.stack(logits), -1) == labels)
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-12)


def test_a_linear_probe_on_a_peft_model_keeps_its_frozen_adapters(tmp_path):
    """train_mode=linear with Adapter+: only the head trains, the adapters stay at their
    (random) init, and the exported task must carry them."""
    config = tiny_demo(1)
    config.train_mode = "linear"
    results = runner.run(config, tmp_path / "run")
    task = export.export_run(tmp_path / "run", tmp_path / "task")
    assert "adapter" in read_task(tmp_path / "task").params["blocks_0"]
    test_images, labels = _test_split()
    serving = TaskSet([task], load_backbone(task.backbone), batch_size=100)
    logits = serving.logits(test_images, [0] * len(labels))
    accuracy = np.mean(np.argmax(np.stack(logits), -1) == labels)
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-12)


def test_predict_classifies_files_and_reports_bad_ones(exported, images, capsys):
    missing = str(images / "nothing.jpg")
    rc = predict.main(["--task", str(exported["digits"]), "--json", "--top-k", "3",
                       str(images / "digits"), missing])  # fmt: skip
    assert rc == 1  # some inputs failed, the others were classified
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    errors = {Path(r["file"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"nothing.jpg", "broken.png"}
    assert "no such file" in errors["nothing.jpg"] and "cannot read" in errors["broken.png"]
    good = [r for r in records if "predictions" in r]
    assert len(good) == 6 and all(len(r["predictions"]) == 3 for r in good)
    # The same as the task's own model on the decoded files.
    task = read_task(exported["digits"])
    module, variables = task.model(load_backbone(task.backbone))
    x = np.stack([decode(r["file"]) for r in good]).astype(np.float32)
    logits = module.apply(variables, normalize(x, task.config.mean, task.config.std))
    probs = np.asarray(jax.nn.softmax(logits))
    for r, p in zip(good, probs, strict=True):
        assert [q["index"] for q in r["predictions"]] == list(np.argsort(-p)[:3])
        np.testing.assert_allclose([q["probability"] for q in r["predictions"]],
                                   np.sort(p)[::-1][:3], atol=1e-6)  # fmt: skip

    assert predict.main(["--task", str(exported["digits"]), str(images / "digits")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.count("\t") == 2 for line in lines)


def test_several_tasks_and_a_merged_lora_task_in_one_call(exported, images, capsys):
    paths = [str(exported[n]) for n in ("digits", "digits_lora", "digits_merged")]
    folder = images / "digits"
    assert predict.main([*sum((["--task", p] for p in paths), []), "--json", str(folder)]) == 1
    together = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    alone = {}
    for p in paths:
        predict.main(["--task", p, "--json", str(folder)])
        alone[Path(p).name] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for name, records in alone.items():
        mine = [r for r in together if r.get("task") == name]
        good = [r for r in records if "predictions" in r]
        assert [r["file"] for r in mine] == [r["file"] for r in good]
        for a, b in zip(mine, good, strict=True):
            assert [q["index"] for q in a["predictions"]] == [q["index"] for q in b["predictions"]]
            np.testing.assert_allclose([q["probability"] for q in a["predictions"]],
                                       [q["probability"] for q in b["predictions"]], atol=1e-6)
    # Merged and unmerged LoRA give the same probabilities (to float32 rounding).
    for a, b in zip(alone["digits_lora"], alone["digits_merged"], strict=True):
        if "predictions" in a:
            np.testing.assert_allclose([q["probability"] for q in a["predictions"]],
                                       [q["probability"] for q in b["predictions"]], atol=1e-5)
    # The merged task is a plain ViT directory that load_pretrained reads, with no LoRA.
    module, variables, _ = load_pretrained(exported["digits_merged"])
    assert module.lora is None and "lora_q" not in variables["params"]["blocks_0"]["attn"]


def test_predict_refuses_a_backbone_the_task_was_not_trained_on(exported, images, tmp_path,
                                                                capsys):  # fmt: skip
    task_dir = tmp_path / "other_seed"
    shutil.copytree(exported["digits"], task_dir)
    document = json.loads((task_dir / "task.json").read_text())
    document["backbone"]["seed"] = 19  # another random init
    (task_dir / "task.json").write_text(json.dumps(document))
    assert predict.main(["--task", str(task_dir), str(images / "digits")]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "--backbone" in err and "Traceback" not in err
    assert predict.main(["--task", str(tmp_path / "no_task"), str(images / "digits")]) == 2
    assert "expected a task directory" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_export(runs, tmp_path, capsys):
    out = tmp_path / "task"

    def refused(workdir: Path, *flags: str) -> str:
        assert export.main(["--workdir", str(workdir), "--out", str(out), *flags]) == 2
        assert not out.exists() and not list(tmp_path.glob(".task.tmp-*"))
        return capsys.readouterr().err

    assert "has no checkpoint" in refused(tmp_path / "empty")
    assert "--merge needs a run of lora" in refused(runs["adapter"], "--merge-lora")
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n")
    assert "2 class names for a head of 10" in refused(runs["adapter"], "--class-names",
                                                       str(names))  # fmt: skip
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["adapter"], unfinished)
    steps = sorted((unfinished / "checkpoints").iterdir(), key=lambda p: p.name)
    shutil.rmtree(max((p for p in steps if p.name.isdigit()), key=lambda p: int(p.name)))
    assert "unfinished (epoch 1 of 2)" in refused(unfinished)
    assert export.main(["--workdir", str(unfinished), "--out", str(out),
                        "--allow-unfinished"]) == 0  # fmt: skip
    assert read_task(out).info["epoch"] == 1
    assert export.main(["--workdir", str(runs["adapter"]), "--out", str(out)]) == 2  # out exists
    assert "not empty; choose another --out or pass --overwrite" in capsys.readouterr().err
