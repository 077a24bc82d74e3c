"""The benchmark suite (adapter_plus_jax.suite and .report): aggregation arithmetic on hand-made
results, shard splitting, config overrides, and a smoke run of 2 VTAB tasks x 2 seeds on mocked
data with a tiny random-init backbone, through `run` (two shards, then the rest) and `report`.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adapter_plus_jax import benchmark, report, runner, suite
from adapter_plus_jax import config as config_lib

# Three groups of 2, 1 and 3 tasks; two seeds.
TOY = benchmark.Benchmark(
    "toy",
    "Toy",
    {"A": ("a1", "a2"), "B": ("b1",), "C": ("c1", "c2", "c3")},
    (benchmark.PaperResult("paper method", 0.2, (1.0, 2.0, 3.0), 2.0),),
)
# task -> (accuracy of seed 1, accuracy of seed 2, trainable params)
TOY_RUNS = {
    "a1": (0.50, 0.70, 1000),  # mean 60, population std 10 (sample std would be 14.1)
    "a2": (0.80, 0.80, 3000),  # 80 +- 0 -> group A: 70
    "b1": (0.90, 0.96, 2000),  # 93 +- 3 -> group B: 93
    "c1": (0.40, 0.40, 1000),  # 40
    "c2": (0.50, 0.50, 1000),  # 50
    "c3": (0.30, 0.33, 4000),  # 31.5 +- 1.5 -> group C: 40.5
}


def toy_runs(drop: tuple[str, int] | None = None) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for task, (acc1, acc2, params) in TOY_RUNS.items():
        for seed, acc in ((1, acc1), (2, acc2)):
            if (task, seed) != drop:
                r = {"test_accuracy": acc, "trainable_params": params, "method": "m"}
                runs.setdefault(task, {})[seed] = r
    return runs


def test_summary_arithmetic() -> None:
    s = report.summarize(TOY, toy_runs(), seeds=[1, 2])
    means = {t: s.tasks[t].mean for t in TOY.tasks}
    stds = {t: s.tasks[t].std for t in TOY.tasks}
    assert means == pytest.approx(
        {"a1": 60.0, "a2": 80.0, "b1": 93.0, "c1": 40.0, "c2": 50.0, "c3": 31.5}
    )
    assert stds == pytest.approx({"a1": 10.0, "a2": 0.0, "b1": 3.0, "c1": 0, "c2": 0, "c3": 1.5})
    assert s.group_means == pytest.approx({"A": 70.0, "B": 93.0, "C": 40.5})
    # The mean of the group means, not of the six tasks (59.08).
    assert s.average == pytest.approx((70.0 + 93.0 + 40.5) / 3)
    assert s.average != pytest.approx(np.mean(list(means.values())))
    assert s.params_m == pytest.approx(2000 / 1e6)
    assert s.complete and s.missing == []


def test_summary_of_unfinished_runs() -> None:
    s = report.summarize(TOY, toy_runs(drop=("c3", 2)), seeds=[1, 2])
    assert not s.complete and s.missing == [("c3", 2)]
    assert s.tasks["c3"].mean == pytest.approx(30.0) and s.tasks["c3"].std == 0.0
    assert s.group_means["C"] == pytest.approx(40.0)
    # A group without any finished task has no mean; the partial average skips it.
    runs = {t: r for t, r in toy_runs().items() if t != "b1"}
    s = report.summarize(TOY, runs, seeds=[1, 2])
    assert s.group_means["B"] is None and s.average == pytest.approx((70.0 + 40.5) / 2)
    assert s.missing == [("b1", 1), ("b1", 2)]
    assert report.summarize(TOY, {}, seeds=[1]).average is None


def test_markdown_tables() -> None:
    s = report.summarize(TOY, toy_runs(drop=("c3", 2)), seeds=[1, 2])
    text = report.markdown(s, "m", [1, 2], "plot.png", note="A note.")
    assert "11 of 12 runs finished" in text and "Missing (seeds): c3 (2)." in text
    assert "A note." in text
    assert "| a1 | A | 60.00 ± 10.00 | 2 | 1,000 |" in text
    assert "| c3 | C | 30.00 ± 0.00 | 1 | 4,000 |" in text
    # Ours (group C partial, so the global too) beside the paper's row.
    assert "| **ours: m** | 0.002 | 70.0 | 93.0 | 40.0* | 67.7* |" in text
    assert "| paper: paper method | 0.20 | 1.0 | 2.0 | 3.0 | 2.0 |" in text
    assert "![Trainable parameters vs accuracy](plot.png)" in text


def test_vtab_groups_and_paper_numbers() -> None:
    vtab = benchmark.benchmark("vtab")
    assert [len(t) for t in vtab.groups.values()] == [7, 4, 8]
    assert list(vtab.groups) == ["Natural", "Specialized", "Structured"]
    adapter_plus = vtab.paper[0]
    assert adapter_plus.groups == (83.3, 86.2, 63.3) and adapter_plus.average == 77.6
    # The paper's global averages are the means of its group means.
    for p in vtab.paper:
        if p.groups:
            assert np.mean(p.groups) == pytest.approx(p.average, abs=0.051), p.method
    fgvc = benchmark.benchmark("fgvc")
    assert fgvc.tasks == ("cub", "nabirds", "oxfordflower", "stanforddogs", "stanfordcars")
    assert fgvc.paper[0].average == 90.7


def test_one_head_width_per_benchmark(tmp_path: Path) -> None:
    """Every run of a suite gets the benchmark's common head width (the most classes, rounded
    up), so that all of them share one compiled step; an explicit width is kept."""
    vtab = benchmark.benchmark("vtab")
    assert max(vtab.num_classes.values()) == 397 and vtab.head_width == 512
    assert suite.make_config(vtab, "dtd", 18).model.head_width == 512
    kept = suite.make_config(vtab, "dtd", 18, overrides=["model.head_width=-1"])
    assert kept.model.head_width == -1
    assert benchmark.benchmark("fgvc").head_width == 640  # NABirds: 555 classes

    for task, classes in (("a", 2), ("b", 3)):
        for c in range(classes):
            (tmp_path / task / "train" / f"c{c}").mkdir(parents=True)
            (tmp_path / task / "train" / f"c{c}" / "0.png").write_bytes(b"")
    (tmp_path / "not_a_task").mkdir()
    folders = benchmark.benchmark("folders", tmp_path)
    assert folders.tasks == ("a", "b") and folders.num_classes == {"a": 2, "b": 3}
    config = suite.make_config(folders, "b", 45)
    assert config.data_dir == str(tmp_path / "b") and config.seed == 45
    assert config.dataset == "folder" and config.model.head_width == 128
    with pytest.raises(ValueError, match="needs --root"):
        benchmark.benchmark("folders")
    with pytest.raises(ValueError, match="holds no image folder"):
        benchmark.benchmark("folders", tmp_path / "not_a_task")


def test_fgvc_report_is_one_mean_beside_the_paper(tmp_path: Path) -> None:
    fgvc = benchmark.benchmark("fgvc")
    accuracy = {"cub": 0.9, "nabirds": 0.8, "oxfordflower": 0.99, "stanforddogs": 0.9}
    runs = {
        t: {18: {"test_accuracy": a, "trainable_params": 10**5, "method": "adapter_plus"}}
        for t, a in accuracy.items()
    }
    s = report.summarize(fgvc, runs, seeds=[18])
    assert s.average == pytest.approx(89.75) and s.missing == [("stanfordcars", 18)]
    text = report.markdown(s, "adapter_plus", [18], "plot.png")
    assert "| Method | #Params (M) | Mean |" in text
    assert "| **ours: adapter_plus** | 0.10 | 89.8* |" in text
    assert "| paper: Adapter+ (r per dataset) | – | 90.7 |" in text
    report.plot(s, "adapter_plus", tmp_path / "plot.png")  # the paper as a line: no params given
    assert (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 57, 60])
def test_shards_cover_every_run_exactly_once(count: int) -> None:
    tasks, seeds = [f"t{i}" for i in range(19)], [18, 45, 25]
    shards = [suite.shard_runs(tasks, seeds, i, count) for i in range(count)]
    everything = [pair for shard in shards for pair in shard]
    assert sorted(everything) == sorted((t, s) for t in tasks for s in seeds)
    assert len(everything) == len(set(everything))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # Deterministic: the same call gives the same shard.
    assert suite.shard_runs(tasks, seeds, count - 1, count) == shards[-1]


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shards_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="0 <= i < n"):
        suite.parse_shard(bad)
    assert suite.parse_shard("3/4") == (3, 4)


def test_config_overrides() -> None:
    config = ml_collections.ConfigDict(
        {"lr": 1e-3, "model": {"dtype": "bfloat16", "remat": False, "kw": {}}}
    )
    config_lib.apply_overrides(
        config,
        ["lr=0.01", "model.dtype=float32", "model.remat=true", "model.kw={'depth': 1}"],
    )
    assert config.lr == 0.01 and config.model.dtype == "float32" and config.model.remat is True
    assert config.model.kw.depth == 1
    with pytest.raises(ValueError, match="no 'modle'"):
        config_lib.apply_overrides(config, ["modle.dtype=float32"])
    with pytest.raises(ValueError, match="key=value"):
        config_lib.apply_overrides(config, ["lr"])


def test_a_workdir_holds_one_suite(tmp_path: Path) -> None:
    settings = dict(benchmark="vtab", method=None, config_args="", overrides=[], seeds=[18])
    suite.write_suite_json(tmp_path, settings)
    suite.write_suite_json(tmp_path, {**settings, "seeds": [45, 18]})  # another shard's seeds
    assert json.loads((tmp_path / "suite.json").read_text())["seeds"] == [18, 45]
    with pytest.raises(ValueError, match="Use another --workdir"):
        suite.write_suite_json(tmp_path, {**settings, "method": "lora"})


# ----------------------------------------------------------------------------------------------
# Smoke run on mocked data.

TASKS, SEEDS = ("dtd", "eurosat"), (18, 45)  # a Natural and a Specialized task


def smoke_args(workdir: Path, data_dir: Path) -> list[str]:
    """`suite run` arguments: a random-init ViT with one block, 7x7 patches of 32 px (the VTAB
    pipeline resizes to 224), width 32; one epoch of two batches of 8."""
    timm_kwargs = dict(img_size=224, patch_size=32, embed_dim=32, depth=1, num_heads=2)
    return [
        "run",
        "--verbose",  # leave pytest's logging handlers alone
        "--benchmark=vtab",
        f"--workdir={workdir}",
        f"--tasks={','.join(TASKS)}",
        f"--seeds={','.join(map(str, SEEDS))}",
        "--config.model.pretrained=False",
        f"--config.model.timm_kwargs={timm_kwargs}",
        "--config.model.dtype",  # the two-argument form
        "float32",
        f"--config.data_dir={data_dir}",
        "--config.epochs=1",
        "--config.warmup_epochs=1",
        "--config.batch_size=8",
        "--config.eval_batch_size=8",
        "--config.checkpoint_every_epochs=1",
        "--config.log_every_steps=1",
    ]


def test_smoke_run_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "vtab"
    args = smoke_args(workdir, tmp_path / "tfds")
    # Mocked TFDS (16 random examples per split) is "prepared" for runner's data check.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=16):
        assert suite.main([*args, "--shard=1/2"]) == 0
        finished = sorted(p.parent.relative_to(workdir) for p in workdir.glob("*/*/results.json"))
        assert finished == [Path("dtd/seed45"), Path("eurosat/seed45")]
        assert suite.main(args) == 0  # the other shard's two runs; the finished ones skipped
    for task in TASKS:
        for seed in SEEDS:
            results = json.loads((workdir / task / f"seed{seed}" / "results.json").read_text())
            assert results["task"] == task and results["seed"] == seed
            assert 0.0 <= results["test_accuracy"] <= 1.0
            assert results["method"] == "adapter_plus"

    summary = report.report(workdir)
    assert set(summary.tasks) == set(TASKS) and not summary.complete
    assert summary.group_means["Structured"] is None and summary.average is not None
    text = (workdir / "results.md").read_text()
    assert "4 of 38 runs finished" in text and "| dtd | Natural |" in text
    assert (workdir / "params_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Everything done: a rerun trains nothing (no mock data needed any more).
    assert suite.main(args) == 0


def test_a_failing_run_does_not_stop_the_others(tmp_path: Path, monkeypatch) -> None:
    """One (task, seed) fails: the others still run, the report lists the failure with its error
    line, and a rerun retries only that one."""
    workdir, calls, broken = tmp_path / "vtab", [], [True]

    def fake_run(config, where, *args, **kwargs):  # stands in for training; the suite is tested
        calls.append((config.task, config.seed))
        if (config.task, config.seed) == ("dtd", 45) and broken[0]:
            raise runner.SetupError("dtd is not prepared in /data; run the preparer first.")
        where.mkdir(parents=True, exist_ok=True)
        results = {"test_accuracy": 0.5, "trainable_params": 1000, "method": config.method,
                   "task": config.task, "seed": config.seed}  # fmt: skip
        (where / "results.json").write_text(json.dumps(results))

    monkeypatch.setattr(runner, "run", fake_run)
    args = smoke_args(workdir, tmp_path / "tfds")
    assert suite.main(args) == 1
    assert sorted(calls) == sorted((t, s) for t in TASKS for s in SEEDS)
    failed = json.loads((workdir / "dtd" / "seed45" / report.FAILED_JSON).read_text())
    assert failed["error"] == "SetupError: dtd is not prepared in /data; run the preparer first."
    assert "Traceback" in failed["traceback"]
    report.report(workdir)
    text = (workdir / "results.md").read_text()
    assert "## Failed runs (1;" in text and f"- dtd seed 45: {failed['error']}" in text

    calls.clear()
    broken[0] = False
    assert suite.main(args) == 0
    assert calls == [("dtd", 45)]  # only what failed
    assert not (workdir / "dtd" / "seed45" / report.FAILED_JSON).exists()
    report.report(workdir)
    assert "Failed runs" not in (workdir / "results.md").read_text()
