"""Export a finished run as a small task directory (see `task.py`): its adapters / LoRA /
prompts and head, the model and PEFT settings, class names, preprocessing and the backbone's
identity, without the backbone.

    apj export --workdir runs/dtd --out tasks/dtd
    apj export --workdir runs/dtd_lora --out tasks/dtd_vit --merge
    apj predict --task tasks/dtd photo.jpg

The run's newest good checkpoint is read without touching the workdir (a run may still be
going there); the backbone is built as the run built it, to hash its weights. `--merge`
(also spelled `--merge-lora`) folds a LoRA run's branches, or a `tuning` method (LoRA on linear
layers, DoRA, (IA)3, VeRA, SSF, FacT), into the backbone's weights and writes the whole plain
ViT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
from flax import traverse_util

from adapter_plus_jax import tuning
from adapter_plus_jax.checkpoint import CHECKPOINTS_DIR, Checkpointer, has_checkpoints
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.experiment import build_model
from adapter_plus_jax.params import key_diff, merge_lora, param_count, param_group, resize_head
from adapter_plus_jax.pretrained import PARAMS_FILE, check_target
from adapter_plus_jax.runner import RESULTS_FILE
from adapter_plus_jax.task import (
    BackboneRecord,
    Task,
    backbone_digest,
    default_class_names,
    preprocessing_for,
    write_task,
)


def _read_run(
    workdir: Path, allow_unfinished: bool
) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, trained parameters, checkpoint meta) of the run's newest good checkpoint."""
    if not has_checkpoints(workdir):
        raise SetupError(f"{workdir} has no checkpoint in {workdir / CHECKPOINTS_DIR}: "
                         "train it first (apj train ... --workdir).")  # fmt: skip
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step, meta = ckpt.find_good()
        config = ml_collections.ConfigDict(meta["config"])
        if meta["epoch"] < config.epochs and not allow_unfinished:
            raise SetupError(
                f"{workdir} is unfinished (epoch {meta['epoch']} of {config.epochs}): rerun its "
                "`apj train` command to finish it, or pass --allow-unfinished to export this "
                "checkpoint."
            )
        state, _ = ckpt.read(step)
    finally:
        ckpt.close()
    return config, state["params"], {**meta, "step": step}


def _class_names(workdir: Path, path: str | None, num_classes: int) -> tuple[str, ...]:
    names, source = None, Path(path) if path else workdir / RESULTS_FILE
    try:
        if path:
            names = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        elif source.is_file():
            names = json.loads(source.read_text()).get("class_names")
    except (OSError, ValueError) as e:  # a folder, unreadable, not UTF-8 or not JSON
        raise SetupError(f"Cannot read the class names from {source}: {e}") from e
    if names is not None and len(names) != num_classes:
        raise SetupError(f"{len(names)} class names for a head of {num_classes} classes.")
    return default_class_names(num_classes, names)


def _info(workdir: Path, config: ml_collections.ConfigDict, meta: dict) -> dict:
    results = workdir / RESULTS_FILE
    accuracy = json.loads(results.read_text()).get("test_accuracy") if results.is_file() else None
    return {
        "workdir": str(workdir.absolute()), "step": meta["step"], "epoch": meta["epoch"],
        "epochs": config.epochs, "dataset": config.dataset, "task": config.task,
        "method": config.method, "train_mode": config.train_mode, "seed": config.seed,
        "train_dtype": config.model.dtype, "test_accuracy": accuracy,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip


def export_run(
    workdir: str | Path,
    out: str | Path,
    merge: bool = False,
    class_names: str | None = None,
    overwrite: bool = False,
    allow_unfinished: bool = False,
) -> Task:
    """Write the task of run `workdir` to `out` (see the module docstring); returns it.
    Raises SetupError (before writing anything) for a workdir without a finished run, class
    names that do not fit, or `merge` for a run without LoRA."""
    workdir, out = Path(workdir), Path(out)
    check_target(out, overwrite)  # before the expensive part
    config, trained, meta = _read_run(workdir, allow_unfinished)
    foldable = (config.lora or config.get("tune")) and not (config.adapter or config.prompt)
    if merge and not (foldable and not (config.lora and config.get("tune"))):
        raise SetupError(
            f"--merge needs a run of lora, lora_linear, dora, ia3, vera, ssf, fact_tt or "
            f"fact_tk; {workdir} is {config.method}."
        )
    # A head padded for training (`params.head_width`) is cut back to the dataset's classes.
    num_classes = int(meta.get("num_classes") or trained["head"]["kernel"].shape[-1])
    trained = resize_head(trained, num_classes) if "head" in trained else trained
    names = _class_names(workdir, class_names, num_classes)
    # Only the parameters' shapes are needed: a run trained with cuDNN's attention on a GPU
    # exports anywhere (a task does not record the kernel).
    config = config.copy_and_resolve_references()
    config.model.attention = "xla"
    module, params = build_model(config, num_classes, jax.random.key(config.seed))
    flat_trained = traverse_util.flatten_dict(trained)
    flat_params = traverse_util.flatten_dict(params)
    problems = key_diff(
        {"/".join(k): v.shape for k, v in flat_params.items() if k in flat_trained},
        {"/".join(k): v.shape for k, v in flat_trained.items()},
    )
    if problems:
        raise SetupError(f"The checkpoint does not fit the run's model: {problems}")
    m = config.model
    name = str(Path(m.name).absolute()) if Path(m.name).is_dir() else m.name
    record = BackboneRecord(
        name=name, sha256=backbone_digest(params), pretrained=m.pretrained,
        timm_kwargs={} if m.pretrained else dict(m.timm_kwargs or {}),
        seed=None if m.pretrained else config.seed,
        num_classes=None if m.pretrained else num_classes, weights_dir=m.weights_dir,
    )  # fmt: skip
    # The task's own parameters: every PEFT module and the head (trained or, with train_mode
    # 'linear' on a PEFT method, frozen at their init), and whatever else was trained.
    own = {
        k: v
        for k, v in flat_params.items()
        if param_group("/".join(k)) in ("peft", "fixed", "head")
    }
    own = traverse_util.unflatten_dict({**own, **flat_trained})
    task = Task(
        out.name, module.config, own, names, preprocessing_for(config.dataset, module.config),
        record, module.adapter, module.lora, module.prompt, info=_info(workdir, config, meta),
        tune=module.tune,
    )  # fmt: skip
    if merge:
        flat_params.update(flat_trained)
        variables = {"params": traverse_util.unflatten_dict(flat_params)}
        if module.tune is not None:
            plain = module.clone(tune=None)
            merged = {"params": tuning.merge(module.tune, variables["params"])}
        else:
            plain, merged = merge_lora(module, variables)
        task = Task(task.name, plain.config, merged["params"], names, task.preprocessing, record,
                    merged=True, info=task.info)  # fmt: skip
    write_task(out, task, overwrite=overwrite)
    return task


def main(argv: Sequence[str] | None = None, prog: str = "apj export") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--workdir", required=True, help="the run's workdir (apj train --workdir)")
    parser.add_argument("--out", required=True, help="the task directory to write")
    parser.add_argument("--merge", "--merge-lora", action="store_true", dest="merge",
                        help="fold LoRA (or DoRA, (IA)3, VeRA, SSF) into the ViT and write the "
                        "whole plain model")  # fmt: skip
    parser.add_argument("--class-names", help="a text file: one class name per line, in label "
                        "order (default: results.json's, else the label indices)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="export the newest checkpoint of an unfinished run")  # fmt: skip
    args = parser.parse_args(argv)
    from adapter_plus_jax import console

    console.quiet_libraries()
    try:
        task = export_run(args.workdir, args.out, args.merge, args.class_names,
                          args.overwrite, args.allow_unfinished)  # fmt: skip
    except FileExistsError:
        print(f"{prog}: error: {args.out} exists and is not empty; choose another --out or "
              "pass --overwrite.", file=sys.stderr)  # fmt: skip
        return 2
    except (ValueError, OSError) as e:  # SetupError, PretrainedError, an unreadable file, ...
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in Path(args.out).iterdir())
    what = "a merged plain ViT" if task.merged else "adapters/head only"
    print(f"Exported {args.workdir} (step {task.info['step']}, {task.info['method']}, "
          f"{task.num_classes} classes) to {args.out}: {param_count(task.params):,} parameters "
          f"({what}), {size / 1e6:.2f} MB in {PARAMS_FILE} and task.json; backbone "
          f"{task.backbone.name} sha256 {task.backbone.sha256[:12]}...", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":  # the same as `apj export`
    sys.exit(main(prog="python -m adapter_plus_jax.export"))
