"""Save and load ported ViT weights as a directory of two files.

    DIR/params.safetensors   flat '/'-joined Flax parameter paths -> float32 arrays
    DIR/config.json          {"model": ViTConfig fields, "pretrained_cfg": timm's pretrained_cfg
                              (mean, std, input_size, num_classes, interpolation, crop_pct,
                              timm_name, ...)}

`save_pretrained` writes into a temporary directory next to DIR and renames it into place, so a
reader never sees a half-written DIR. `load_pretrained` can rebuild the model at another image
size (position embeddings resampled the way timm does) or with a new classification head.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapter_plus_jax.convert import abstract_params
from adapter_plus_jax.layers import trunc_normal
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.params import key_diff

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


class PretrainedError(ValueError):
    """A saved model directory cannot be read or does not match its config; the message says
    why."""


# ----------------------------------------------------------------------------------------------
# Saving.


def save_pretrained(
    out_dir: str | os.PathLike,
    config: ViTConfig,
    params: Mapping[str, Any],
    pretrained_cfg: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write `params` (the Flax 'params' collection of a plain ViT built from `config`) and the
    configs to `out_dir`, atomically. Returns the directory.

    `pretrained_cfg['input_size']` and `['num_classes']` are set from `config` so that they
    describe the saved weights. Raises FileExistsError if `out_dir` exists and is not empty,
    unless `overwrite`; ValueError if `params` do not fit `config`.
    """
    with atomic_directory(out_dir, overwrite) as tmp:
        write_pretrained_files(tmp, config, params, pretrained_cfg)
    return Path(out_dir)


def flat_float32(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A parameter tree as '/'-joined names -> contiguous float32 arrays (safetensors' input)."""
    return {
        "/".join(path): np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        for path, value in traverse_util.flatten_dict(dict(params)).items()
    }


def write_pretrained_files(
    directory: Path, config: ViTConfig, params: Mapping[str, Any], pretrained_cfg: Mapping
) -> None:
    """PARAMS_FILE and CONFIG_FILE of `save_pretrained` into an existing `directory` (not
    atomic by itself: `atomic_directory` gives one to write into)."""
    flat = flat_float32(params)
    problems = _mismatches(config, flat)
    if problems:
        raise ValueError(f"params do not fit the config: {problems}")
    cfg = dict(pretrained_cfg)
    cfg["input_size"] = [config.in_chans, *config.img_size]
    cfg["num_classes"] = config.num_classes
    document = {"model": json.loads(config.to_json()), "pretrained_cfg": cfg}

    from safetensors.numpy import save_file

    save_file(flat, str(directory / PARAMS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory next to `out_dir` to write into; renamed to `out_dir` when the
    block ends without an error, removed when it raises. Readers never see a half-written
    `out_dir`. Raises FileExistsError for an existing, non-empty `out_dir` unless `overwrite`
    (the old one is then replaced only once the new one is complete)."""
    out = Path(out_dir)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, hence same filesystem: the final rename is atomic.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():
            # safetensors creates files private (0600); give them the usual umask permissions.
            os.chmod(path, 0o666 & ~_umask())
            _fsync(path)
        _fsync(tmp)
        _swap_in(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent)


def check_target(out: Path, overwrite: bool) -> None:
    """Raise FileExistsError when `out` exists and is not an empty directory (unless
    `overwrite`)."""
    if overwrite or not os.path.lexists(out):
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; pass overwrite=True.")
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not empty; choose another directory or pass overwrite=True."
        )


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; with `overwrite`, move an existing `out` aside first and delete it
    only once the new directory is in place."""
    check_target(out, overwrite)  # again: `out` may have appeared while writing
    if not os.path.lexists(out) or (
        out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    ):
        os.replace(tmp, out)  # rename(2) replaces an empty directory
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    # Flush file data and directory entries before (and after) the rename, so that a crash
    # leaves either the old or the complete new directory.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=16)
def _param_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    # Cached: tracing the model for its shapes takes about a second for ViT-B.
    params = abstract_params(VisionTransformer(config))
    return {
        "/".join(p): tuple(leaf.shape) for p, leaf in traverse_util.flatten_dict(params).items()
    }


def _mismatches(config: ViTConfig, flat: Mapping[str, np.ndarray]) -> str:
    """'' if `flat` has exactly the parameters of a plain ViT built from `config`, else a
    description of the missing, unexpected and wrongly shaped arrays."""
    return key_diff(_param_shapes(config), {k: v.shape for k, v in flat.items()})


# ----------------------------------------------------------------------------------------------
# Loading.


def load_pretrained(
    path: str | os.PathLike,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    rng: jax.Array | int | None = None,
    dtype: Any = jnp.float32,
) -> tuple[VisionTransformer, dict, dict]:
    """Load a directory written by `save_pretrained` as (module, variables, pretrained_cfg).

    Args:
      path: the directory.
      img_size: build the model for this input size; the position embedding is resampled
        (bicubic, antialiased) as timm's `checkpoint_filter_fn` does.
      num_classes: a different number of classes gets a fresh head (kernel trunc-normal std
        0.02, bias 0) drawn from `rng`; 0 drops the head.
      rng: a jax PRNG key or an int seed; required for a fresh head.
      dtype: compute dtype of the module; parameters stay float32.

    The returned pretrained_cfg has `input_size` and `num_classes` of the returned model.
    Raises FileNotFoundError for a missing directory or file and PretrainedError for a
    corrupt file or a config that does not parse or does not match the weights.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"No saved model directory at {root}.")
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} is missing; {root} is not a directory written by save_pretrained "
                "(apj port)."
            )
    config, pretrained_cfg = _read_config(root / CONFIG_FILE)
    flat = _read_params(root / PARAMS_FILE)
    problems = _mismatches(config, flat)
    if problems:
        raise PretrainedError(
            f"{root / PARAMS_FILE} does not match {root / CONFIG_FILE}: {problems}"
        )

    if img_size is not None:
        new_config = config.replace(img_size=img_size)
        if new_config.grid_size != config.grid_size and config.pos_embed:
            flat["pos_embed"] = _resample_pos_embed(flat["pos_embed"], config, new_config)
        config = new_config
    if num_classes is not None and num_classes != config.num_classes:
        flat.pop("head/kernel", None)
        flat.pop("head/bias", None)
        if num_classes > 0:
            flat.update(_fresh_head(config.embed_dim, num_classes, rng))
        config = config.replace(num_classes=num_classes)

    pretrained_cfg["input_size"] = [config.in_chans, *config.img_size]
    pretrained_cfg["num_classes"] = config.num_classes
    params = traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()}
    )
    return VisionTransformer(config, dtype=dtype), {"params": params}, pretrained_cfg


def _read_config(path: Path) -> tuple[ViTConfig, dict]:
    try:
        document = json.loads(path.read_text())
        pretrained_cfg = dict(document["pretrained_cfg"])
        # Directories ported before ViTConfig had mean/std keep them in timm's pretrained_cfg.
        norm = {k: pretrained_cfg[k] for k in ("mean", "std") if k in pretrained_cfg}
        config = ViTConfig.from_dict({**norm, **document["model"]})
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise PretrainedError(
            f"Cannot parse {path}: {type(e).__name__}: {e}. Expected "
            '{"model": {ViTConfig fields}, "pretrained_cfg": {...}} as save_pretrained writes.'
        ) from e
    return config, pretrained_cfg


def _read_params(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        flat = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise PretrainedError(
            f"Cannot read {path} ({type(e).__name__}: {e}); the file is truncated or corrupt. "
            "Port the weights again."
        ) from e
    return {k: v.astype(np.float32, copy=False) for k, v in flat.items()}


def _resample_pos_embed(pos_embed: np.ndarray, old: ViTConfig, new: ViTConfig) -> np.ndarray:
    """Resample the patch part of the position embedding from `old.grid_size` to
    `new.grid_size` with timm's own function, so that results match timm exactly."""
    try:
        import torch
        from timm.layers import resample_abs_pos_embed
    except ImportError as e:
        raise PretrainedError(
            f"Resampling the position embedding to {new.img_size} uses timm's own function, "
            "which needs torch and timm: pip install 'adapter_plus_jax[port]'."
        ) from e

    # Prefix tokens (class, registers) have no position entry with `no_embed_class`.
    num_prefix = 0 if old.no_embed_class else old.num_prefix_tokens
    resampled = resample_abs_pos_embed(
        torch.from_numpy(np.array(pos_embed)),
        new_size=list(new.grid_size),
        old_size=list(old.grid_size),
        num_prefix_tokens=num_prefix,
    )
    return resampled.numpy()


def _fresh_head(
    embed_dim: int, num_classes: int, rng: jax.Array | int | None
) -> dict[str, np.ndarray]:
    if rng is None:
        raise ValueError(
            f"num_classes={num_classes} needs a new head; pass rng= (a jax PRNG key or int seed) "
            "to initialize it."
        )
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    # timm's head init: trunc_normal_(std=.02) (cut at +-2 absolute), zero bias.
    kernel = trunc_normal(0.02, cutoff=100.0)(key, (embed_dim, num_classes), jnp.float32)
    return {
        "head/kernel": np.asarray(kernel),
        "head/bias": np.zeros((num_classes,), np.float32),
    }
