"""The helper of benchmarks/gpu_e2e.sh: what the host lacks, the image folders, the summary.

    python benchmarks/e2e_report.py missing
    python benchmarks/e2e_report.py make-folder ROOT [ROOT...] --train 1000 --test 1000 \\
        --classes 47 --size 224 --seed 0
    python benchmarks/e2e_report.py summary OUT [--tiny]

`missing` prints one line, "<import name> <pip name>", for each Python module that the
end-to-end check needs and this interpreter cannot find (the package itself is read from the
repository, on PYTHONPATH). It imports nothing outside the standard library.

`make-folder` writes VTAB-shaped image folders, ROOT/train/<class>/*.jpg and ROOT/test/<class>/
*.jpg (numpy and Pillow only): smooth random images with a tint per class, JPEG quality 90; the
i-th ROOT gets seed SEED + i.

`summary` reads what gpu_e2e.sh left in OUT (the run's and the suite's results.json files, the
isolated step's JSON, the parts' wall times in OUT/<part>.wall_s), prints a markdown summary and
writes it to OUT/summary.md, with the projected time of the VTAB-1k suite (19 tasks x 3 seeds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

# (import name, pip name) of what the check runs: training and the suite (jax, flax, ...),
# timm's architectures, the isolated step's reference (adapter_plus on torch, omegaconf, psutil)
# and the suite report's plot (matplotlib). Never TensorFlow.
NEEDED = (
    ("jax", "jax"),
    ("ml_collections", "ml-collections"),
    ("orbax.checkpoint", "orbax-checkpoint"),
    ("optax", "optax"),
    ("flax", "flax"),
    ("timm", "timm"),
    ("torch", "torch"),
    ("PIL", "pillow"),
    ("sklearn", "scikit-learn"),
    ("tqdm", "tqdm"),
    ("safetensors", "safetensors"),
    ("psutil", "psutil"),
    ("matplotlib", "matplotlib"),
    ("adapter_plus", "adapter-plus"),
    ("omegaconf", "omegaconf"),
)

# Test-set sizes of the 19 VTAB-1k tasks (TFDS 4.9.6; docs/recipe.md section 2 names the splits,
# tests/test_data.py SPEC_SPLITS checks the same sizes). adapter_plus_jax/data/vtab.py holds the
# split strings, not their sizes, and imports TensorFlow, which this check must not need.
VTAB_TEST_SIZES = {
    "cifar100": 10000,
    "caltech101": 6084,
    "dtd": 1880,
    "flowers102": 6149,
    "pet": 3669,
    "svhn": 26032,
    "sun397": 21750,
    "camelyon": 32768,
    "eurosat": 5400,
    "resisc45": 6300,
    "retinopathy": 42670,
    "clevr_count": 15000,
    "clevr_distance": 15000,
    "dmlab": 22735,
    "kitti": 711,
    "dsprites_position": 73728,
    "dsprites_orientation": 73728,
    "smallnorb_azimuth": 12150,
    "smallnorb_elevation": 12150,
}
VTAB_SEEDS, VTAB_EPOCHS, VTAB_STEPS, VTAB_BATCH = 3, 100, 15, 64  # 1,000 images: 15 steps/epoch
VTAB_PROGRAMS = 6  # distinct ranks of configs/vtab.py's default per-task ranks (dims=dim1-32)
OURS = "ours (jax)"  # the isolated step's peer (benchmarks/train_step.py)


# ----------------------------------------------------------------------------------------------
# missing


def missing() -> list[tuple[str, str]]:
    """The NEEDED modules that this interpreter cannot find."""
    lost = []
    for module, pip_name in NEEDED:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing or broken
            found = False
        if not found:
            lost.append((module, pip_name))
    return lost


# ----------------------------------------------------------------------------------------------
# make-folder


def make_folder(root: Path, train: int, test: int, classes: int, size: int, seed: int) -> None:
    """ROOT/{train,test}/c<k>/<i>.jpg: image i of a split has class i % classes; each image is
    8x8 random colours upsampled (bicubic) to size x size, mixed with its class's tint."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    tints = rng.uniform(0, 255, (classes, 1, 1, 3))
    width = len(str(classes - 1))
    for split, count in (("train", train), ("test", test)):
        for k in range(classes):
            (root / split / f"c{k:0{width}d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            k = i % classes
            coarse = rng.uniform(0, 255, (8, 8, 3))
            pixels = (0.6 * coarse + 0.4 * tints[k, 0]).astype(np.uint8)
            image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
            image.save(root / split / f"c{k:0{width}d}" / f"{i:05d}.jpg", quality=90)


# ----------------------------------------------------------------------------------------------
# summary


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wall(out: Path, part: str) -> float | None:
    try:
        return float((out / f"{part}.wall_s").read_text())
    except (OSError, ValueError):
        return None


def _s(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f} s"


def _n(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _trace(r: dict) -> float:
    return r.get("train_trace_s", 0.0) + r.get("eval_trace_s", 0.0)


def isolated_step(out: Path) -> tuple[dict | None, float | None]:
    """(the isolated step's JSON, our step's images/s) from OUT/train_step/*.json."""
    for path in sorted((out / "train_step").glob("train_step_*.json")):
        data = _load(path)
        if data is not None:
            ours = data.get("train", {}).get(OURS, {})
            return data, ours.get("images_per_s")
    return None, None


def suite_results(out: Path) -> dict[str, dict]:
    """'<task>/seed<seed>' -> results.json of each finished suite run."""
    found = {}
    for path in sorted((out / "suite").glob("*/seed*/results.json")):
        data = _load(path)
        if data is not None:
            found[f"{path.parent.parent.name}/{path.parent.name}"] = data
    return found


def cache_line(out: Path, run: dict | None, suite: dict[str, dict]) -> str:
    """Whether the run's steps went into the compilation cache and the suite's came from it."""
    cached = [
        name
        for name in ("train_step", "eval_step")
        if any((out / "xla_cache").glob(f"jit_{name}-*"))
    ]
    line = (
        f"Compilation cache {out / 'xla_cache'}: holds "
        f"{' and '.join(cached) if cached else 'neither the train nor the eval step'}"
    )
    if run is None:
        return line + "."
    load = statistics.median(r["compile_s"] for r in suite.values())
    loaded = len(cached) == 2 and load < 0.5 * run["compile_s"]
    return (
        f"{line}. The run compiled in {_s(run['compile_s'], 2)}; the suite's runs took "
        f"{_s(load, 2)} (median compile_s): "
        + ("loaded from the cache." if loaded else "NOT loaded from the cache (see log.txt).")
    )


def projection(run: dict, suite: dict[str, dict]) -> tuple[list[str], float] | None:
    """The projected VTAB-1k suite time (lines stating the formula and terms, seconds), from the
    run's steady and evaluation rates and the suite's trace and cache-load times; None where a
    figure is missing."""
    steady, eval_rate = run.get("steady_images_per_s"), run.get("eval_images_per_s")
    first_compile = run.get("compile_s")
    loaded = list(suite.values())  # the run compiled; the suite's runs load from the cache
    if not (steady and eval_rate and first_compile is not None and loaded):
        return None
    trace = statistics.median(_trace(r) for r in loaded)
    load = statistics.median(r["compile_s"] for r in loaded)
    runs = len(VTAB_TEST_SIZES) * VTAB_SEEDS
    images = VTAB_EPOCHS * VTAB_STEPS * VTAB_BATCH
    train = images / steady
    test_images = VTAB_SEEDS * sum(VTAB_TEST_SIZES.values())
    evaluation = test_images / eval_rate
    programs = VTAB_PROGRAMS
    total = runs * (trace + load + train) + evaluation + programs * (first_compile - load)
    lines = [
        "Formula: total = runs x (trace + cache load + epochs x steps x batch / steady images/s)"
        " + seeds x sum(VTAB-1k test-set sizes) / evaluation images/s"
        " + programs x (a full compile - cache load), with",
        "",
        "| Term | Value |",
        "|---|---|",
        f"| runs | {len(VTAB_TEST_SIZES)} tasks x {VTAB_SEEDS} seeds = {runs} |",
        f"| trace + lowering per run (suite's median, train + eval) | {_s(trace, 2)} |",
        f"| cache load per run (suite's median compile_s) | {_s(load, 2)} |",
        f"| training per run: {VTAB_EPOCHS} x {VTAB_STEPS} x {VTAB_BATCH} = {images:,} images / "
        f"{_n(steady)} images/s | {_s(train)} |",
        f"| evaluation: {VTAB_SEEDS} x {test_images // VTAB_SEEDS:,} test images / "
        f"{_n(eval_rate)} images/s | {_s(evaluation)} |",
        f"| programs: one per distinct adapter rank of the default per-task ranks "
        f"(dims=dim1-32: 1, 2, 4, 8, 16, 32) | {programs} |",
        f"| a full compile (the run's compile_s) - cache load | {_s(first_compile - load)} |",
        "",
        "Not counted: process start, data loading and model building per run (the suite's "
        "other time above shows them for these folders). The evaluation rate is the folder "
        "run's, from memory; VTAB-1k's test splits are streamed through tf.data "
        "(benchmarks/data_pipeline.py measures that rate on the host's cores).",
    ]
    return lines, total


def summary(out: Path, tiny: bool) -> str:
    run = _load(out / "run" / "results.json")
    suite = suite_results(out)
    step, step_rate = isolated_step(out)
    device = (step or {}).get("device", "n/a")
    now = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    lines = [
        f"# benchmarks/gpu_e2e.sh{' --tiny' if tiny else ''}, {now}",
        "",
        f"Device: {device}. Wall time of the whole check: {_s(_wall(out, 'total'), 0)}.",
    ]
    if tiny:
        lines += [
            "",
            "--tiny: toy sizes (the run a 2-block ViT-Ti at 32x32, the isolated step a 4-block "
            "ViT-Ti at 64x64): the figures check the plumbing, not the speed.",
        ]

    lines += ["", "## One run (main.py)", ""]
    if run is None:
        lines.append(f"No results: see {out / 'run.log'}.")
    else:
        ratio = (
            run["steady_images_per_s"] / step_rate
            if step_rate and run.get("steady_images_per_s")
            else None
        )
        args = (step or {}).get("args", {})
        lines += [
            f"{run['epochs']} epochs, {run['num_classes']} classes (head width "
            f"{run['head_width']}), {run['trainable_params']:,} trainable of "
            f"{run['total_params']:,} parameters.",
            "",
            "| Figure | Value |",
            "|---|---|",
            f"| wall time (process start to exit) | {_s(_wall(out, 'run'))} |",
            f"| train time / eval time (compilation included) | {_s(run['train_time_s'])} / "
            f"{_s(run['eval_time_s'])} |",
            f"| compile_s (XLA, train + eval) | {_s(run['compile_s'], 2)} (train "
            f"{_s(run.get('train_compile_s'), 2)}, eval {_s(run.get('eval_compile_s'), 2)}) |",
            f"| trace_s (tracing + lowering, train + eval) | {_s(_trace(run), 2)} |",
            f"| training images/s, whole run / steady (after the first step) | "
            f"{_n(run.get('train_images_per_s'))} / {_n(run.get('steady_images_per_s'))} |",
            f"| isolated step images/s (benchmarks/train_step.py, {OURS}, "
            f"{args.get('model_size', '?')} batch {args.get('batch', '?')} "
            f"{args.get('dtype', '?')}) | {_n(step_rate)} |",
            f"| steady images/s over the isolated step's (target >= 0.9) | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'} |",
            f"| input-wait fraction of the steady step time | "
            f"{_pct(run.get('input_wait_fraction'))} |",
            f"| evaluation images/s | {_n(run.get('eval_images_per_s'))} |",
            f"| test accuracy (random weights, random images) | {run['test_accuracy']:.4f} |",
        ]

    lines += ["", "## Suite (apj suite run --benchmark folders, one process)", ""]
    if not suite:
        lines.append(f"No results: see {out / 'suite.log'}.")
    else:
        accounted = sum(r["train_time_s"] + r["eval_time_s"] for r in suite.values())
        wall = _wall(out, "suite")
        lines += [
            f"{len(suite)} runs, wall time {_s(wall)}; other time (process start, data "
            f"loading, model building) per run: "
            f"{_s(None if wall is None else (wall - accounted) / len(suite))}.",
            "",
            "| Run | compile_s | trace_s | steady images/s | input wait | eval images/s | "
            "train time | eval time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in suite.items():
            lines.append(
                f"| {name} | {_s(r['compile_s'], 2)} | {_s(_trace(r), 2)} | "
                f"{_n(r.get('steady_images_per_s'))} | "
                f"{_pct(r.get('input_wait_fraction'))} | "
                f"{_n(r.get('eval_images_per_s'))} | {_s(r['train_time_s'])} | "
                f"{_s(r['eval_time_s'])} |"
            )
        lines += ["", cache_line(out, run, suite)]

    lines += ["", "## Projected VTAB-1k suite time (19 tasks x 3 seeds)", ""]
    projected = projection(run, suite) if run is not None else None
    if projected is None:
        lines.append("Cannot project: the run's or the suite's figures are missing.")
    else:
        terms, total = projected
        lines += [f"**Projected VTAB-1k suite time: {total:,.0f} s ({total / 3600:.2f} h)**", ""]
        lines += terms
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("missing", help="list the needed modules this Python lacks")
    mk = sub.add_parser("make-folder", help="write VTAB-shaped image folders")
    mk.add_argument("roots", type=Path, nargs="+")
    mk.add_argument("--train", type=int, default=1000)
    mk.add_argument("--test", type=int, default=1000)
    mk.add_argument("--classes", type=int, default=47)
    mk.add_argument("--size", type=int, default=224)
    mk.add_argument("--seed", type=int, default=0, help="the i-th ROOT gets SEED + i")
    sm = sub.add_parser("summary", help="print and write OUT/summary.md")
    sm.add_argument("out", type=Path)
    sm.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)

    if a.command == "missing":
        for module, pip_name in missing():
            print(module, pip_name)
    elif a.command == "make-folder":
        if min(a.train, a.test) < a.classes:
            p.error("--train and --test need at least one image per class")
        for i, root in enumerate(a.roots):
            start = time.perf_counter()
            make_folder(root, a.train, a.test, a.classes, a.size, a.seed + i)
            print(f"{root}: {a.train} + {a.test} images of {a.size}x{a.size}, {a.classes} "
                  f"classes, seed {a.seed + i} ({time.perf_counter() - start:.1f} s)")  # fmt: skip
    else:
        text = summary(a.out, a.tiny)
        (a.out / "summary.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
