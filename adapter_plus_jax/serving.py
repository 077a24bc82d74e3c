"""Many tasks on one frozen backbone: mixed batches in which every example runs through its
own task's adapters, LoRA branches, prompts and head, in one jitted forward.

    tasks = [read_task(d) for d in ("tasks/dtd", "tasks/flowers", "tasks/pets")]
    serving = TaskSet(tasks, load_backbone(tasks[0].backbone))
    logits = serving.logits(images, task_ids)     # images: [B, H, W, 3] in [0, 255]
    top = serving.predict(images, task_ids, top_k=5)

How: the tasks of a group share one "union" model: the adapter and LoRA branches at the
largest rank, LoRA on every location some task uses, a per-channel scaling, a head as wide as
the most classes. Each task's parameters are written into that shape with zeros where it has
less (extra rank rows and columns, a branch it does not have, extra classes): a zero up
projection adds exactly nothing, so every task computes what its own model computes. The
task-specific parameters are stacked on a leading task axis, gathered per example and the
model is vmapped over the batch with the backbone's parameters shared: the backbone's
products stay ordinary batched matmuls, the adapters' become per-example ones.

Tasks that train vectors of the backbone (BitFit's biases, LN-tune's and train_ln's LayerNorms)
join too: those vectors are stacked and gathered per example like the adapters, with the
backbone's own values for the tasks that leave them as they are. Tasks of the methods that
change the backbone's layers (`tuning`: LoRA on any layer, DoRA, (IA)³, VeRA, SSF, FacT) share
a forward with tasks of the same method and settings (the same shapes).

Tasks that cannot share a union model form groups of their own, each one forward: adapters at
another position or of another structure (norm, activation), another number of prompts (prompt
tokens change the sequence every example attends over), another `tuning` method or setting,
and tasks that carry backbone matrices (merged, fine-tuned: gathering whole weight matrices per
example would cost more than a forward of their own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapter_plus_jax import backend
from adapter_plus_jax.convert import abstract_params
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.images import normalize
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.params import BACKBONE_GROUPS, merge, param_group
from adapter_plus_jax.peft import LORA_LOCATIONS
from adapter_plus_jax.task import Task, backbone_digest

Flat = dict[tuple[str, ...], Any]


class Prediction(NamedTuple):
    name: str
    probability: float
    index: int


def _structure(task: Task) -> tuple:
    """What tasks of one group must agree on (None: the task has no such module)."""
    a, lo, p = task.adapter, task.lora, task.prompt
    return (
        None if a is None else (a.config, a.attn_adapter, a.act_layer, a.norm_layer),
        None if lo is None else (lo.act_layer, lo.norm_layer),
        None if p is None else (p.num_tokens, p.deep),
        task.tune and dataclasses.replace(task.tune, dropout=0.0),
    )


def _fits(group: tuple, structure: tuple) -> bool:
    modules = zip(group[:2], structure[:2], strict=True)
    return all(g is None or s is None or g == s for g, s in modules) and group[2:] == structure[2:]


def _mixes(task: Task) -> bool:
    """Whether the task's examples can share a forward with other tasks': its own parameters
    are PEFT modules, a head and at most vectors of the backbone (biases, LayerNorms)."""
    return not task.merged and all(
        np.ndim(value) <= 1 or param_group("/".join(key)) not in BACKBONE_GROUPS
        for key, value in traverse_util.flatten_dict(task.params).items()
    )


def _union_module(tasks: Sequence[Task], dtype: Any) -> VisionTransformer:
    """The model every task of the group fits into (see the module docstring)."""
    adapters = [t.adapter for t in tasks if t.adapter is not None]
    loras = [t.lora for t in tasks if t.lora is not None]
    adapter = lora = None
    if adapters:
        adapter = dataclasses.replace(
            adapters[0], dim=max(a.dim for a in adapters), bias=any(a.bias for a in adapters),
            scaling="channel", dropout=0.0, drop_path=0.0,
        )  # fmt: skip
    if loras:
        used = {loc for lo in loras for loc in lo.location}
        lora = dataclasses.replace(
            loras[0], dim=max(lo.dim for lo in loras), bias=any(lo.bias for lo in loras),
            location=tuple(loc for loc in LORA_LOCATIONS if loc in used),
            scaling="channel", dropout=0.0, drop_path=0.0,
        )  # fmt: skip
    prompt = tasks[0].prompt and dataclasses.replace(tasks[0].prompt, dropout=0.0)
    tune = tasks[0].tune and dataclasses.replace(tasks[0].tune, dropout=0.0)  # equal in a group
    config = tasks[0].config.replace(num_classes=max(t.num_classes for t in tasks))
    return VisionTransformer(config, adapter, lora, prompt, dtype=jnp.dtype(dtype), tune=tune)


def _fit(
    task: Task, own: Flat, key: tuple[str, ...], shape: tuple[int, ...], backbone: Flat
) -> np.ndarray:
    """The task's value of union parameter `key`: its own, zero-padded to `shape`; a fixed or
    scalar scaling as per-channel values; the backbone's value of a backbone parameter it
    leaves as it is; zeros for a PEFT parameter it does not have."""
    if key in own:
        value = np.asarray(own[key], np.float32)
        if key[-1] == "scaling":
            return np.broadcast_to(value, shape).copy()
        return np.pad(value, [(0, t - s) for s, t in zip(value.shape, shape, strict=True)])
    branch = key[:-1]
    if key[-1] == "scaling" and branch + ("down", "kernel") in own:  # a fixed scaling
        spec = task.lora if "lora" in branch[-1] else task.adapter
        return np.full(shape, spec.scaling, np.float32)
    if param_group("/".join(key)) in BACKBONE_GROUPS:
        return np.asarray(backbone[key], np.float32)
    if key[-2:] == ("norm", "scale"):
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)


@dataclasses.dataclass
class _Group:
    """Tasks sharing one forward: `members` (indices into the TaskSet), the shared parameters
    and the task parameters stacked on a leading axis."""

    members: list[int]
    module: VisionTransformer
    shared: Any
    stacked: Any
    forward: Any


def _group_params(tasks: Sequence[Task], module: VisionTransformer, backbone: Flat):
    """(shared, stacked) parameters of a group: the backbone's that no task of the group
    changes, and every task's own (PEFT, head, its backbone vectors or, alone in its group,
    its whole weights) fitted to `module`."""
    shapes = traverse_util.flatten_dict(abstract_params(module))
    own = [traverse_util.flatten_dict(t.params) for t in tasks]
    stacked_keys = [
        k for k in shapes
        if param_group("/".join(k)) in ("peft", "head") or any(k in o for o in own)
    ]  # fmt: skip
    shared = {k: backbone[k] for k in shapes if k not in stacked_keys}
    pairs = list(zip(tasks, own, strict=True))
    stacked = {
        k: np.stack([_fit(t, o, k, tuple(shapes[k].shape), backbone) for t, o in pairs])
        for k in stacked_keys
    }
    return traverse_util.unflatten_dict(shared), traverse_util.unflatten_dict(stacked)


def _make_forward(module: VisionTransformer, single: bool):
    cfg = module.config

    def run(params, batch):
        (shared, stacked), (images, ids) = params, batch
        x = normalize(images, cfg.mean, cfg.std)
        if single:  # one task: its own model, no gather
            return module.apply({"params": merge(jax.tree.map(lambda a: a[0], stacked), shared)}, x)

        def one(image, own):
            return module.apply({"params": merge(own, shared)}, image[None])[0]

        return jax.vmap(one)(x, jax.tree.map(lambda a: a[ids], stacked))

    # The backend's form, as evaluation's: where it runs a batch in chunks, each chunk gathers
    # only its own examples' task parameters.
    plan = backend.plan(module)
    form = backend.map_chunks(run, plan.chunk)

    def forward(shared, stacked, images, ids):
        return form((shared, stacked), (images, ids))

    return plan.jit(forward)


class TaskSet:
    """Exported tasks on one backbone, for mixed batches.

    Args:
      tasks: the tasks (`read_task`); a task's index in this list is its task id.
      backbone: the shared backbone's parameters (`load_backbone`); None when every task
        carries its own weights (merged).
      dtype: compute dtype ('float32' or 'bfloat16').
      batch_size: examples per forward of a group; a group's examples are padded up to it, so
        each group compiles once.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        backbone: Mapping[str, Any] | None,
        dtype: Any = "float32",
        batch_size: int = 32,
    ):
        if not tasks:
            raise ValueError("TaskSet needs at least one task.")
        self.tasks, self.batch_size = list(tasks), batch_size
        sizes = {t.config.img_size for t in tasks}
        if len(sizes) > 1:
            raise SetupError(f"The tasks take different input sizes {sorted(sizes)}.")
        sharing = [t for t in tasks if t.needs_backbone]
        if sharing and backbone is None:
            raise ValueError(f"Task {sharing[0].name} needs the backbone's parameters.")
        digests = {t.backbone.sha256 for t in sharing}
        found = backbone_digest(backbone) if sharing else None
        if len(digests) > 1 or (sharing and found not in digests):
            names = ", ".join(f"{t.name} ({t.backbone.sha256[:12]})" for t in sharing)
            raise SetupError(
                f"The tasks were not all trained on this backbone ({found[:12]}): {names}. Serve "
                "tasks of different backbones in different TaskSets."
            )
        flat_backbone = traverse_util.flatten_dict(dict(backbone or {}))
        self.groups = []
        for members in self._grouping():
            group_tasks = [self.tasks[i] for i in members]
            module = _union_module(group_tasks, dtype)
            shared, stacked = _group_params(group_tasks, module, flat_backbone)
            forward = _make_forward(module, single=len(members) == 1)
            self.groups.append(_Group(members, module, shared, stacked, forward))

    def _grouping(self) -> list[list[int]]:
        groups: list[tuple[tuple, list[int]]] = []
        mixes = [_mixes(task) for task in self.tasks]
        for i, task in enumerate(self.tasks):
            structure = _structure(task)
            for n, (key, members) in enumerate(groups):
                if mixes[i] and mixes[members[0]] and _fits(key, structure):
                    pairs = zip(key, structure, strict=True)
                    merged = tuple(k if k is not None else s for k, s in pairs)
                    groups[n] = (merged, [*members, i])
                    break
            else:
                groups.append((structure, [i]))
        return [members for _, members in groups]

    def logits(self, images: Any, task_ids: Sequence[int]) -> list[np.ndarray]:
        """Per example, its task's logits ([num_classes of that task], float32).

        images: [B, H, W, 3] in [0, 255] at the tasks' input size (`images.preprocess`).
        task_ids: [B] indices into `tasks`.
        """
        images = np.asarray(images, np.float32)
        ids = np.asarray(task_ids, np.int64)
        if images.shape[0] != ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {ids.shape[0]} task ids.")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.tasks)):
            raise ValueError(f"task ids must be in [0, {len(self.tasks)}); got {ids.tolist()}.")
        out: list[np.ndarray | None] = [None] * len(ids)
        for group in self.groups:
            local = {task: n for n, task in enumerate(group.members)}
            rows = np.flatnonzero(np.isin(ids, group.members))
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                pad = self.batch_size - len(chunk)
                x = np.concatenate([images[chunk], np.zeros((pad, *images.shape[1:]), np.float32)])
                g = np.array([local[t] for t in ids[chunk]] + [0] * pad, np.int32)
                result = np.asarray(group.forward(group.shared, group.stacked, x, g))
                for row, logits in zip(chunk, result, strict=False):  # result has the padding too
                    out[row] = logits[: self.tasks[ids[row]].num_classes]
        return out

    def predict(
        self, images: Any, task_ids: Sequence[int], top_k: int = 5
    ) -> list[list[Prediction]]:
        """Per example, its task's `top_k` (class name, probability, index), most probable
        first."""
        results = []
        for i, logits in zip(task_ids, self.logits(images, task_ids), strict=True):
            z = logits.astype(np.float64) - logits.max()
            probs = np.exp(z) / np.exp(z).sum()
            best = np.argsort(-probs, kind="stable")[:top_k]
            names = self.tasks[i].class_names
            results.append([Prediction(names[j], float(probs[j]), int(j)) for j in best])
        return results
