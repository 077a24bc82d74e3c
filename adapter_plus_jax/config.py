"""Experiment configuration: the base ConfigDict (the paper's recipe), the training methods as
config entries, and the one parser of config arguments.

Every way of setting a value goes through `parse_value`, typed by the value it replaces:

- `configs/vtab.py:dtd,method=lora,seed=45`: the argument of a config file (`parse_arg`);
- `--config.lr=3e-3` (or `--config.lr 3e-3`) on the command line of every command that takes
  a config (`split_overrides`, then `apply_overrides`).

Config files (configs/*.py) ship inside the package (adapter_plus_jax/configs), so that an
installed copy finds them without the repository (`load_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from adapter_plus_jax import backend, peft
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.params import TRAINABLE_GROUPS

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# Keys under which a config may gain new entries: free-form keyword arguments.
OPEN_KEYS = ("model.timm_kwargs",)


def parse_value(text: str, like: Any = None) -> Any:
    """`text` as a value of `like`'s type (bool: true/false/yes/no/1/0; int; float; str), or, when
    `like` is None or a container, as a Python literal ('1e-3', "'qk'", "{'depth': 1}"), falling
    back to the string itself. Raises ValueError when `text` is not a value of `like`'s type."""
    if isinstance(like, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "yes", "no", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return lowered in ("true", "yes", "1")
    if isinstance(like, (int, float, str)):
        try:
            return type(like)(text)
        except ValueError:
            raise ValueError(f"expected {type(like).__name__}, got {text!r}") from None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse 'TASK,key=value,...' (the part after ':' in `--config file.py:ARG`).

    A bare first word sets `task`. Values take the type of their default; keys that have no
    default are rejected, so a typo fails at once.
    """
    out = ml_collections.ConfigDict(defaults)
    for i, item in enumerate(filter(None, (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            if i:
                raise ValueError(f"Config argument {item!r} must be key=value.")
            key, value = "task", item
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
        try:
            out[key] = parse_value(value, "" if defaults[key] is None else defaults[key])
        except ValueError as e:
            raise ValueError(f"Config argument {key}={value}: {e}.") from None
    return out


# The help text of --config.KEY=VALUE, for every command that takes a config.
OVERRIDES_HELP = (
    "--config.KEY=VALUE (or --config.KEY VALUE) sets any field of the config (nested keys with "
    "dots, e.g. --config.model.dtype=float32; unknown keys are rejected)."
)


def dashed(argv: Sequence[str]) -> list[str]:
    """`argv` with underscores in flag names turned into dashes (`--eval_only` ->
    `--eval-only`: main.py's old spellings); values and --config.KEY items are untouched."""
    out = []
    for item in argv:
        if item.startswith("--") and not item.startswith("--config."):
            flag, sep, value = item.partition("=")
            item = flag.replace("_", "-") + sep + value
        out.append(item)
    return out


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the 'KEY=VALUE' config overrides given as --config.KEY=VALUE or --config.KEY VALUE in
    `args`, the other arguments). Raises ValueError for a --config.KEY without a value."""
    overrides, rest, i = [], [], 0
    while i < len(args):
        item = args[i]
        if not item.startswith("--config."):
            rest.append(item)
            i += 1
            continue
        key, sep, value = item.removeprefix("--config.").partition("=")
        if not sep:  # --config.KEY VALUE
            if i + 1 == len(args):
                raise ValueError(f"{item} needs a value")
            value, i = args[i + 1], i + 1
        overrides.append(f"{key}={value}")
        i += 1
    return overrides, rest


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Set 'a.b.c=value' overrides in place, each typed by the value it replaces. The key must
    exist (so that a typo fails), except under OPEN_KEYS."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Config override {item!r}: expected key=value.")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parents[: i + 1])
                raise ValueError(f"Config override {item!r}: the config has no {where!r}.")
            node = node[part]
        open_key = ".".join(parents) in OPEN_KEYS
        if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not open_key):
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ValueError(f"Config override {item!r}: unknown key {key!r}; known: {known}.")
        current = node[leaf] if leaf in node else None
        if current is None and leaf in node:  # a placeholder: typed, but without a value
            current = _placeholder_type(node, leaf)
        try:
            value = parse_value(text, current)
        except ValueError as e:
            raise ValueError(f"Config override {item!r}: {e}.") from None
        node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def _placeholder_type(node: ml_collections.ConfigDict, leaf: str) -> Any:
    """A sample value of a placeholder's declared type (None when it has none to parse by)."""
    kind = node.get_ref(leaf).get_type()
    return {bool: False, int: 0, float: 0.0, str: ""}.get(kind)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(ARG)` of the config file in 'PATH.py[:ARG]'. PATH is a file, or one of the
    packaged configs by name ('configs/vtab.py', 'vtab.py' or 'vtab')."""
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        packaged = CONFIGS_DIR / (path.stem + ".py")
        if not packaged.is_file():
            names = sorted(p.stem for p in CONFIGS_DIR.glob("[!_]*.py"))
            raise ValueError(f"No config file {path_text!r}; the packaged configs are {names}.")
        path = packaged
    module_spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


# ----------------------------------------------------------------------------------------------
# The recipe and the methods.


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment: the paper's recipe (docs/recipe.md, section 6)."""
    c = ml_collections.ConfigDict()
    # vtab | fgvc | tfds (any TFDS dataset with image and label) | demo (configs/demo.py)
    c.dataset = "vtab"
    c.task = ""
    c.tfds_name = ""  # dataset=tfds: the TFDS builder name
    c.num_classes = 0  # dataset=tfds/demo: the class count (tfds: 0 reads it from the builder)
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.fgvc_root = ml_collections.config_dict.placeholder(str)  # VPT's json layout (FGVC)
    c.train_split = "train800val200"
    c.eval_split = "test"

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit_base_patch16_224.orig_in21k"
    c.model.pretrained = True  # False: the timm architecture with random weights (no network)
    c.model.timm_kwargs = ml_collections.ConfigDict()  # timm.create_model kwargs (random init)
    # Ported weights live in WEIGHTS_DIR/<name>; ported on first use when online.
    c.model.weights_dir = "~/.cache/adapter_plus_jax"
    c.model.drop_path_rate = 0.1
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32 (bf16-mixed, as Lightning)
    c.model.remat = False
    # 'auto': cuDNN's fused attention on NVIDIA GPUs in bfloat16 where it runs, XLA's einsums
    # elsewhere; 'xla' or 'cudnn' to choose (docs/performance.md, 'GPU').
    c.model.attention = "auto"
    # The head's width: 0 pads it with masked-out classes to a multiple of 128, so that runs
    # with other class counts share one compiled step (params.head_width); -1: no padding;
    # N: N outputs. Results and exported tasks have the dataset's classes either way.
    c.model.head_width = 0

    c.method = "adapter_plus"
    c.train_mode = "peft"  # params.TRAINABLE_GROUPS: peft | linear | train_ln | finetune | ...
    c.adapter = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
    c.lora = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
    c.prompt = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
    c.tune = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)

    c.batch_size = 64
    c.eval_batch_size = 64
    c.epochs = 100
    c.warmup_epochs = 10
    c.lr = 1e-3
    c.lr_start_factor = 100.0
    c.lr_min_factor = 1000.0
    c.weight_decay = 1e-4
    c.label_smoothing = 0.0
    c.grad_clip = ml_collections.config_dict.placeholder(float)
    c.seed = 18
    c.checkpoint_every_epochs = 10
    c.log_every_steps = 5
    # JAX's persistent compilation cache: '' = $ADAPTER_PLUS_JAX_COMPILATION_CACHE or
    # ~/.cache/adapter_plus_jax/xla; a directory; 'off' (backend.compilation_cache_dir).
    c.compilation_cache = ""
    # Image folders: where their decoded images are cached ('' = $ADAPTER_PLUS_JAX_DATA_CACHE
    # or ~/.cache/adapter_plus_jax/folders; 'off': decoded into memory by every run;
    # data/image_cache.py).
    c.data_cache = ""
    return c


def spec_config(spec: Any) -> ml_collections.ConfigDict:
    """A PEFT spec as a ConfigDict with the reference's field names (LoRA's location as 'qk')."""
    fields = dataclasses.asdict(spec)
    if "location" in fields:
        fields["location"] = "".join(fields["location"])
    for key in ("targets", "ia3_inputs"):  # tuning.TuneSpec's layer lists, as 'qkv-fc2'
        if key in fields:
            fields[key] = "-".join(fields[key])
    # Not type-safe: `scaling` is a float or a string, and overrides may switch between them.
    return ml_collections.ConfigDict(fields, type_safe=False)


def apply_method(c: ml_collections.ConfigDict, method: str, dim: int, num_tokens: int) -> None:
    """Fill `c` with a method of `peft.METHODS` (in place), with adapter/LoRA rank `dim` and
    `num_tokens` prompts."""
    m = peft.get_method(method).sized(dim=dim, num_tokens=num_tokens)
    c.method, c.train_mode, c.lr = method, m.train_mode, m.lr
    for key in ("adapter", "lora", "prompt", "tune"):
        spec = getattr(m, key)
        if spec is not None:
            c[key] = spec_config(spec)


# ----------------------------------------------------------------------------------------------
# Checking a config before anything is loaded.


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# field -> (check, what it must be). Each check gets the value and the whole config.
_RULES: dict[str, tuple[Any, str]] = {
    "batch_size": (lambda v, c: _integer(v) and v >= 1, "a positive integer"),
    "eval_batch_size": (lambda v, c: _integer(v) and v >= 1, "a positive integer"),
    "epochs": (lambda v, c: _integer(v) and v >= 1, "a positive integer"),
    "warmup_epochs": (lambda v, c: _integer(v) and v >= 0, "an integer >= 0"),
    "lr": (lambda v, c: _number(v) and v > 0, "a positive number"),
    "lr_start_factor": (lambda v, c: _number(v) and v > 0, "a positive number"),
    "lr_min_factor": (lambda v, c: _number(v) and v > 0, "a positive number"),
    "weight_decay": (lambda v, c: _number(v) and v >= 0, "a number >= 0"),
    "label_smoothing": (lambda v, c: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "grad_clip": (lambda v, c: v is None or (_number(v) and v > 0), "None or a positive number"),
    "seed": (lambda v, c: _integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "checkpoint_every_epochs": (lambda v, c: _integer(v) and v >= 1, "a positive integer"),
    "log_every_steps": (lambda v, c: _integer(v) and v >= 1, "a positive integer"),
    "model.drop_path_rate": (lambda v, c: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.dtype": (lambda v, c: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "model.head_width": (lambda v, c: _integer(v) and v >= -1, "-1, 0 or a class count"),
    "compilation_cache": (lambda v, c: isinstance(v, str), "a directory, '' or 'off'"),
    "data_cache": (lambda v, c: isinstance(v, str), "a directory, '' or 'off'"),
    "train_mode": (
        lambda v, c: v in TRAINABLE_GROUPS,
        "one of " + ", ".join(TRAINABLE_GROUPS),
    ),
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise SetupError naming every bad value of `config` (one line), before any data or
    model is loaded. Starts nothing: safe before `jax.distributed.initialize`. Whether
    `model.attention` can run here is `create_model`'s check."""
    problems = []
    for key, (ok, expected) in _RULES.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        value = node.get(leaf)
        if not ok(value, config):
            problems.append(f"{key}={value!r} (expected {expected})")
    for key, spec in (("adapter", peft.AdapterSpec), ("lora", peft.LoRASpec),
                      ("prompt", peft.PromptSpec), ("tune", peft.TuneSpec)):  # fmt: skip
        if config.get(key) is not None:
            try:
                spec.from_config(config[key])
            except (ValueError, TypeError) as e:
                problems.append(f"{key}: {str(e).rstrip('.')}")
    try:
        backend.check_cpu_dots_env()
    except SetupError as e:
        problems.append(str(e).rstrip("."))
    if problems:
        raise SetupError("Bad config value(s): " + "; ".join(problems) + ".")
