"""Exported tasks: what one trained run adds to a frozen backbone, in a small directory.

    DIR/task.json            the format version, method, architecture, PEFT settings, class
                             names, the evaluation preprocessing, the backbone's identity (how
                             to build it and the SHA-256 of its weights) and the run it came from
    DIR/params.safetensors   the task's own parameters: adapters / LoRA / prompts and head
                             (flat '/'-joined paths), not the backbone

A LoRA task exported merged is a whole plain ViT instead: DIR then also holds config.json and
params.safetensors as `save_pretrained` writes them (so `load_pretrained(DIR)` reads it), and
needs no backbone. `write_task` writes atomically; `read_task` checks what it reads.

    task = read_task("tasks/dtd")
    backbone = load_backbone(task.backbone)                # checked against its SHA-256
    module, variables = task.model(backbone)               # the task's own model
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.factory import create_model
from adapter_plus_jax.images import KINDS
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.params import BACKBONE_GROUPS, param_group
from adapter_plus_jax.peft import AdapterSpec, LoRASpec, PromptSpec
from adapter_plus_jax.pretrained import (
    PARAMS_FILE,
    atomic_directory,
    flat_float32,
    load_pretrained,
    write_pretrained_files,
)
from adapter_plus_jax.tuning import TuneSpec

FORMAT = "adapter_plus_jax.task"
VERSION = 1
TASK_FILE = "task.json"
SHARED_GROUPS = BACKBONE_GROUPS  # what a backbone is; 'peft', 'fixed' and 'head' are the task's


@dataclasses.dataclass(frozen=True)
class BackboneRecord:
    """How the backbone a task was trained on is built, and the SHA-256 of its weights
    (`backbone_digest`). A random-init backbone (pretrained=False) is timm's init from `seed`
    for a model of `num_classes` classes (the head's init draws from the same generator)."""

    name: str
    sha256: str
    pretrained: bool = True
    timm_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    num_classes: int | None = None
    weights_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    """An exported task: its architecture and PEFT settings, its own parameters (nested dict
    of numpy arrays; a whole ViT when `merged`), class names and preprocessing."""

    name: str
    config: ViTConfig
    params: dict
    class_names: tuple[str, ...]
    preprocessing: Mapping[str, Any]
    backbone: BackboneRecord
    adapter: AdapterSpec | None = None
    lora: LoRASpec | None = None
    prompt: PromptSpec | None = None
    merged: bool = False
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tune: TuneSpec | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @functools.cached_property
    def model_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        """The shapes of every parameter of the task's model (flat paths)."""
        from adapter_plus_jax.convert import abstract_params

        flat = traverse_util.flatten_dict(abstract_params(self.module()))
        return {k: tuple(v.shape) for k, v in flat.items()}

    @functools.cached_property
    def needs_backbone(self) -> bool:
        """Whether the task's parameters leave some of its model's to the backbone (all but
        merged and fully fine-tuned tasks)."""
        own = traverse_util.flatten_dict(self.params)
        return not self.merged and any(k not in own for k in self.model_shapes)

    def module(self, dtype: Any = "float32") -> VisionTransformer:
        """The task's own model (eval only: dropout and drop path are off)."""
        return VisionTransformer(
            self.config, self.adapter, self.lora, self.prompt, dtype=jnp.dtype(dtype),
            tune=self.tune,
        )  # fmt: skip

    def model(self, backbone: Mapping[str, Any] | None, dtype: Any = "float32"):
        """(module, variables): the backbone's parameters with the task's on top. A task that
        carries all its weights (merged, fine-tuned) needs no backbone (None)."""
        if backbone is None and self.needs_backbone:
            raise ValueError(f"Task {self.name} needs its backbone's parameters.")
        flat = traverse_util.flatten_dict(dict(backbone or {})) if self.needs_backbone else {}
        flat.update(traverse_util.flatten_dict(self.params))
        return self.module(dtype), {"params": traverse_util.unflatten_dict(flat)}


def backbone_digest(params: Mapping[str, Any]) -> str:
    """SHA-256 over the backbone parameters of `params` (patch embedding, blocks, norms; not
    PEFT modules or head): names, dtypes, shapes and float32 bytes, in sorted name order."""
    h = hashlib.sha256()
    for key, value in sorted(traverse_util.flatten_dict(dict(params)).items()):
        path = "/".join(key)
        if param_group(path) not in SHARED_GROUPS:
            continue
        a = np.ascontiguousarray(np.asarray(value, np.float32))
        h.update(f"{path}:{a.shape}:".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def backbone_params(params: Mapping[str, Any]) -> dict:
    """The backbone part of a full parameter tree (what `backbone_digest` hashes)."""
    flat = traverse_util.flatten_dict(dict(params))
    keep = {k: v for k, v in flat.items() if param_group("/".join(k)) in SHARED_GROUPS}
    return traverse_util.unflatten_dict(keep)


def load_backbone(
    record: BackboneRecord,
    source: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    what: str = "the task",
) -> dict:
    """The backbone's parameters, built as `record` says (or from `source`: a ported directory
    or timm name), checked against `record.sha256`. Raises SetupError when they differ."""
    name = str(source) if source is not None else record.name
    pretrained = True if source is not None else record.pretrained
    kwargs = {} if pretrained else dict(record.timm_kwargs)
    rng = jax.random.key(record.seed if record.seed is not None else 0)
    try:
        _, variables = create_model(
            name,
            num_classes=0 if pretrained else record.num_classes,
            pretrained=pretrained,
            rng=rng,
            weights_dir=weights_dir or record.weights_dir,
            **kwargs,
        )
    except (OSError, ValueError) as e:  # a damaged ported directory, a bad timm name, ...
        raise SetupError(f"Cannot build the backbone {name} of {what}: {e}") from e
    found = backbone_digest(variables["params"])
    if found != record.sha256:
        raise SetupError(
            f"The backbone {name} does not match {what}: its weights hash to {found[:12]}..., "
            f"the task was trained on {record.name} with weights {record.sha256[:12]}.... "
            "Pass --backbone with the backbone it was trained on."
        )
    return backbone_params(variables["params"])


# ----------------------------------------------------------------------------------------------
# Writing and reading.


def _spec_dict(spec: Any) -> dict | None:
    return None if spec is None else dataclasses.asdict(spec)


def write_task(out: str | os.PathLike, task: Task, overwrite: bool = False) -> Path:
    """Write `task` to directory `out`, atomically (a temporary directory renamed into place).
    Raises FileExistsError for an existing, non-empty `out` unless `overwrite`."""
    if task.preprocessing.get("kind") not in KINDS:
        raise ValueError(f"Unknown preprocessing {task.preprocessing!r}.")
    if len(task.class_names) != task.num_classes:
        raise ValueError(
            f"{len(task.class_names)} class names for a head of {task.num_classes} classes."
        )
    document = {
        "format": FORMAT,
        "version": VERSION,
        "name": task.name,
        "model": dataclasses.asdict(task.config),
        "adapter": _spec_dict(task.adapter),
        "lora": _spec_dict(task.lora),
        "prompt": _spec_dict(task.prompt),
        "tune": _spec_dict(task.tune),
        "merged": task.merged,
        "class_names": list(task.class_names),
        "preprocessing": dict(task.preprocessing),
        "backbone": dataclasses.asdict(task.backbone),
        "info": dict(task.info),
    }
    with atomic_directory(out, overwrite) as tmp:
        if task.merged:
            pretrained_cfg = {"mean": task.config.mean, "std": task.config.std,
                              "merged_from": task.backbone.name}  # fmt: skip
            write_pretrained_files(tmp, task.config, task.params, pretrained_cfg)
        else:
            from safetensors.numpy import save_file

            save_file(flat_float32(task.params), str(tmp / PARAMS_FILE))
        (tmp / TASK_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return Path(out)


def read_task(path: str | os.PathLike, name: str | None = None) -> Task:
    """The task in directory `path` (written by `write_task`). Raises SetupError with what is
    wrong for a missing, foreign or damaged directory."""
    root = Path(path)
    if not (root / TASK_FILE).is_file():
        what = "does not exist" if not root.exists() else f"has no {TASK_FILE}"
        raise SetupError(
            f"{root} {what}: expected a task directory written by "
            "`apj export --workdir RUN --out DIR`."
        )
    try:
        doc = json.loads((root / TASK_FILE).read_text())
        found = (doc.get("format"), doc.get("version")) if isinstance(doc, dict) else doc
        if found != (FORMAT, VERSION):
            raise ValueError(f"expected format {FORMAT!r} version {VERSION}, found {found!r}")
        config = ViTConfig.from_dict(doc["model"])
        specs = {
            "adapter": _make(AdapterSpec, doc["adapter"]),
            "lora": _make(LoRASpec, doc["lora"]),
            "prompt": _make(PromptSpec, doc["prompt"]),
            "tune": _make(TuneSpec, doc.get("tune")),  # absent in files from before it
        }
        record = BackboneRecord(**doc["backbone"])
        merged = bool(doc["merged"])
        class_names = tuple(str(c) for c in doc["class_names"])
        preprocessing = dict(doc["preprocessing"])
        if preprocessing.get("kind") not in KINDS:
            raise ValueError(f"preprocessing kind {preprocessing.get('kind')!r} not in {KINDS}")
        if len(class_names) != config.num_classes:
            raise ValueError(f"{len(class_names)} class names for {config.num_classes} classes")
    except (ValueError, KeyError, TypeError) as e:
        raise SetupError(
            f"{root / TASK_FILE} is not a task file this version reads ({type(e).__name__}: {e})."
        ) from e
    if merged:
        try:
            module, variables, _ = load_pretrained(root)
        except (OSError, ValueError) as e:
            raise SetupError(f"Cannot read the merged model in {root}: {e}") from e
        params, config = variables["params"], module.config
    else:
        params = _read_params(root / PARAMS_FILE)
    task = Task(
        name or doc.get("name") or root.name, config, params, class_names,
        preprocessing, record, merged=merged, info=doc.get("info", {}), **specs,
    )  # fmt: skip
    _check_shapes(task, root)
    return task


def _make(cls: type, fields: Mapping[str, Any] | None) -> Any:
    if fields is None:
        return None
    fields = dict(fields)
    if "location" in fields:
        fields["location"] = tuple(fields["location"])
    return cls(**fields)


def _read_params(path: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        flat = load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: missing, truncated or corrupt
        raise SetupError(f"Cannot read {path} ({type(e).__name__}: {e}); export again.") from e
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _check_shapes(task: Task, root: Path) -> None:
    """Every parameter of the task must be one of its model's, with the model's shape, and
    every PEFT and head parameter of the model must be the task's."""
    expected = task.model_shapes
    own = traverse_util.flatten_dict(task.params)
    bad = [
        "/".join(k) for k, v in own.items() if expected.get(k) != tuple(np.shape(v))
    ]  # fmt: skip
    # The task's own modules must all be there: a backbone does not have them.
    bad += [
        f"{'/'.join(k)} (missing)" for k in expected
        if k not in own and param_group("/".join(k)) not in SHARED_GROUPS
    ]  # fmt: skip
    if bad:
        raise SetupError(
            f"{root / PARAMS_FILE} does not fit {root / TASK_FILE}: {', '.join(sorted(bad)[:5])}."
        )


def preprocessing_for(dataset: str, config: ViTConfig) -> dict[str, Any]:
    """The evaluation preprocessing of the runner's datasets (see `images.preprocess`), with
    the normalisation the model applies."""
    norm = {"mean": list(config.mean), "std": list(config.std), "scale": 255.0}
    if dataset == "fgvc":
        return {"kind": "resize_shorter_crop", "shorter": 256, "size": [224, 224], **norm}
    if dataset == "folder":  # decoded for the resize and rounded, as image folders train
        return {"kind": "resize", "size": list(config.img_size), "uint8": True, **norm}
    return {"kind": "resize", "size": list(config.img_size), **norm}


def default_class_names(num_classes: int, names: Sequence[str] | None) -> tuple[str, ...]:
    """`names`, or the label indices as strings when none are known."""
    if names is None:
        return tuple(str(i) for i in range(num_classes))
    return tuple(str(n) for n in names)
