"""Port a timm Vision Transformer's weights to the Flax model (adapter_plus_jax).

    apj port --model vit_base_patch16_224.orig_in21k --out ported/vit_b16_in21k
    apj port --model vit_base_patch16_224.orig_in21k --out DIR \\
        --checkpoint ~/Downloads/model.safetensors [--img-size 384] [--overwrite]

(`python port_weights.py ...` in a clone of the repository is the same command.)

Without --checkpoint, timm downloads the pretrained weights (from the Hugging Face Hub, or the
HF_HOME cache). With --checkpoint, the weights come from a local .safetensors, .pth/.pt/.bin
(loaded with weights_only=True, never unpickled) or Google .npz file. The result is a directory
that `adapter_plus_jax.pretrained.load_pretrained` reads.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from adapter_plus_jax.convert import from_timm
from adapter_plus_jax.params import key_diff
from adapter_plus_jax.pretrained import save_pretrained
from adapter_plus_jax.timm_arch import ConversionError, vit_config_from_timm

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Wrappers of training checkpoints, in timm's order of preference (EMA weights first).
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Key prefixes under which Google .npz checkpoints keep the ViT (see timm's `_load_weights`).
NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


class PortError(Exception):
    """An expected failure (bad input, no network); reported as one line, without traceback."""


def parse_args(argv: Sequence[str] | None, prog: str = "apj port") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="timm model name, optionally .tag")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="local weights file (.safetensors, .pth, .pt, .bin or .npz) instead of downloading",
    )
    parser.add_argument(
        "--img-size", type=int, help="input size to port for (resamples position embeddings)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output directory"
    )
    return parser.parse_args(argv)


def check_model_name(name: str) -> None:
    """Fail early, with near matches, for an unknown architecture or pretrained tag."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch}*")
        near += [
            m for m in difflib.get_close_matches(arch, timm.list_models(), n=5) if m not in near
        ]
        hint = f" Near matches: {', '.join(near[:10])}." if near else ""
        raise PortError(
            f"Unknown timm model '{arch}'.{hint} List models with timm.list_models('*pattern*')."
        )
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise PortError(f"timm model '{arch}' has no pretrained tag '{tag}'. Available: {tags}.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors / .pth / .pt / .bin file, unwrapped from a training
    checkpoint ('state_dict', 'model', ...) and without DistributedDataParallel's 'module.'."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a checkpoint is data; never run code from a pickle.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad header, disallowed pickle global, ...
        raise PortError(
            f"Cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "the file is truncated, corrupt or not a weights file."
        ) from e
    if isinstance(state, dict):
        for key in WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PortError(f"Checkpoint {path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def npz_num_classes(path: Path) -> int:
    """Number of classes of the head in a Google .npz checkpoint (0 without a head)."""
    try:
        with np.load(path) as arrays:  # allow_pickle stays False
            keys = set(arrays.files)
            head = next((p + "head/bias" for p in NPZ_PREFIXES if p + "head/bias" in keys), None)
            return int(arrays[head].shape[-1]) if head else 0
    except Exception as e:  # BadZipFile, truncated member, not an npz
        raise PortError(
            f"Cannot read checkpoint {path} ({type(e).__name__}: {e}); "
            "the file is truncated, corrupt or not a .npz archive."
        ) from e


def check_convertible(model: torch.nn.Module) -> None:
    """Fail early (before loading weights) if the Flax model cannot represent `model`."""
    try:
        vit_config_from_timm(model)
    except ValueError as e:  # ConversionError, or a ViTConfig field (e.g. img_size) rejected
        raise PortError(str(e)) from e


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load with strict=True after listing missing, unexpected and wrongly shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = key_diff(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise PortError(f"Checkpoint does not match the model: {problems}.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PortError(f"Checkpoint does not match the model: {e}") from e


def model_from_checkpoint(name: str, path: Path, img_size: int | None) -> torch.nn.Module:
    """A timm model of architecture `name` holding the weights of the file `path`."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not path.is_file():
        raise PortError(f"Checkpoint {path} does not exist.")
    kwargs = {} if img_size is None else {"img_size": img_size}
    if path.suffix == ".npz":
        num_classes = npz_num_classes(path)
        print(f"building {name} (num_classes={num_classes})", flush=True)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        check_convertible(model)
        print(f"loading {path}", flush=True)
        try:
            model.load_pretrained(str(path))  # timm's loader for Google checkpoints
        except KeyError as e:
            raise PortError(f"Checkpoint {path} lacks the array {e} the model needs.") from e
        except Exception as e:
            raise PortError(
                f"Cannot load checkpoint {path} ({type(e).__name__}: {e}); "
                "the file is truncated or corrupt."
            ) from e
        return model
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise PortError(
            f"Checkpoint {path}: unknown file type '{path.suffix}'; expected one of "
            f"{', '.join((*STATE_DICT_SUFFIXES, '.npz'))}."
        )
    print(f"loading {path}", flush=True)
    state = read_state_dict(path)
    head = state.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    print(f"building {name} (num_classes={num_classes})", flush=True)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    check_convertible(model)
    # The condition under which checkpoint_filter_fn resamples.
    if "pos_embed" in state and state["pos_embed"].shape[1] != model.pos_embed.shape[1]:
        print(
            f"resampling pos_embed {tuple(state['pos_embed'].shape)} -> "
            f"{tuple(model.pos_embed.shape)}",
            flush=True,
        )
    # timm's own filter: resamples pos_embed / patch_embed, drops the old pre_logits layer.
    load_state_dict_strict(model, checkpoint_filter_fn(state, model))
    return model


def model_from_download(name: str, img_size: int | None) -> torch.nn.Module:
    """A timm model with the pretrained weights that timm downloads (or finds in HF_HOME)."""
    print(f"building {name} with pretrained weights (download or HF_HOME cache)", flush=True)
    kwargs = {} if img_size is None else {"img_size": img_size}
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    # The download stack (timm -> huggingface_hub -> httpx/requests, or torch.hub) raises
    # version-dependent exception types; all of them mean "no weights", and the message keeps
    # the original error.
    except Exception as e:
        raise PortError(download_failure(name, e)) from e
    check_convertible(model)
    return model


def download_failure(name: str, error: Exception) -> str:
    """The message for a failed download: what failed and how to do without downloading."""
    reason = f"Could not get the pretrained weights of {name} ({type(error).__name__}: {error})."
    local = "pass --checkpoint FILE (.safetensors, .pth, .bin or .npz) with weights you downloaded"
    if "huggingface_hub" in str(error) and importlib.util.find_spec("huggingface_hub"):
        # timm says "not installed" when its import of an incompatible huggingface_hub fails.
        return (
            f"{reason} huggingface_hub {importlib.metadata.version('huggingface_hub')} is "
            f"installed but timm {timm.__version__} cannot import it, so timm can neither "
            f"download nor read the Hugging Face cache: {local}, or install a huggingface_hub "
            "that this timm supports (huggingface_hub<2)."
        )
    return (
        f"{reason} No network or the download failed: {local}, or set HF_HOME to a Hugging "
        "Face cache that has them."
    )


def pretrained_cfg_of(model: torch.nn.Module) -> dict[str, Any]:
    """timm's pretrained_cfg (mean, std, interpolation, crop_pct, ...) plus the full timm name."""
    cfg = dict(model.pretrained_cfg)
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    cfg["timm_name"] = f"{arch}.{tag}" if tag else arch
    return cfg


def port_model(
    name: str,
    out: str | Path,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Port timm model `name` (its pretrained weights, or those of the local file `checkpoint`)
    to the directory `out`, built for `img_size` if given. Raises PortError (or ConversionError,
    OSError) with what went wrong; nothing is left half-written."""
    check_model_name(name)
    if img_size is not None and img_size <= 0:
        raise PortError(f"--img-size must be positive, got {img_size}.")
    # Refuse before the slow part; save_pretrained checks again before it renames.
    out = Path(out)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PortError(f"{out} exists and is not an empty directory; pass --overwrite.")
    with torch.no_grad():
        if checkpoint is not None:
            model = model_from_checkpoint(name, Path(checkpoint), img_size)
        else:
            model = model_from_download(name, img_size)
    model.eval()
    print("converting to Flax", flush=True)
    module, variables = from_timm(model)
    print(f"writing {out}", flush=True)
    save_pretrained(out, module.config, variables["params"], pretrained_cfg_of(model), overwrite)
    return out


def main(argv: Sequence[str] | None = None, prog: str = "apj port") -> int:
    """Run the command; returns the exit status (0 on success, 1 on an expected error)."""
    args = parse_args(argv, prog)
    start = time.perf_counter()
    try:
        out = port_model(args.model, args.out, args.checkpoint, args.img_size, args.overwrite)
    # OSError: the output directory cannot be written (permissions, disk full, ...).
    except (PortError, ConversionError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s: {out}", flush=True)
    return 0


if __name__ == "__main__":  # the same as `apj port`
    sys.exit(main(prog="python -m adapter_plus_jax.port"))
