"""`create_model`: the one door to a timm ViT in Flax with Adapter+ (or LoRA, VPT), pretrained.

    module, variables = create_model(
        "vit_base_patch16_224.orig_in21k", num_classes=47, adapter=AdapterSpec(),
        rng=jax.random.key(0))

The backbone comes from a directory written by `apj port` (or `save_pretrained`), or
from a timm name: looked up in WEIGHTS_DIR/<name>, and ported there on first use (that needs
the `port` extra: torch, timm; online, or with the weights in the Hugging Face cache). The PEFT
modules and a new head (when `num_classes` differs from the checkpoint's) are freshly
initialised from `rng`. Loading a ported directory needs neither torch nor TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adapter_plus_jax import backend
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.model import VisionTransformer
from adapter_plus_jax.params import init_params
from adapter_plus_jax.peft import AdapterSpec, LoRASpec, PromptSpec
from adapter_plus_jax.pretrained import CONFIG_FILE, load_pretrained
from adapter_plus_jax.tuning import TuneSpec

DEFAULT_WEIGHTS_DIR = "~/.cache/adapter_plus_jax"


def _spec(value: Any, cls: type) -> Any:
    """None, a spec, True (the default spec) or a mapping of the reference's field names."""
    if value is None or isinstance(value, cls):
        return value
    if value is True:
        return cls()
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        return cls.from_config(value)
    raise TypeError(f"Expected {cls.__name__}, True, a mapping or None; got {value!r}.")


def _key(rng: jax.Array | int) -> jax.Array:
    return jax.random.key(rng) if isinstance(rng, int) else rng


def _torch_seed(rng: jax.Array) -> int:
    """An int seed for torch from a JAX key: `seed` itself for `jax.random.key(seed)`."""
    words = [int(w) for w in np.asarray(jax.random.key_data(rng)).ravel()]
    return sum(w << (32 * i) for i, w in enumerate(reversed(words[-2:])))


def weights_path(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Where the ported backbone of timm model `name` is kept."""
    return Path(os.path.expanduser(weights_dir or DEFAULT_WEIGHTS_DIR)) / name


def ensure_ported(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The ported backbone's directory of timm model `name`; ports it on first use."""
    path = weights_path(name, weights_dir)
    if (path / CONFIG_FILE).is_file():
        return path
    fix = (
        "When offline, port a downloaded checkpoint first: apj port --model "
        f"{name} --checkpoint FILE --out {path}"
    )
    try:
        from adapter_plus_jax import port
    except ImportError as e:
        raise SetupError(
            f"No ported weights for {name} at {path}, and porting needs torch and timm "
            f"(pip install 'adapter_plus_jax[port]'). {fix}"
        ) from e
    print(f"No ported weights at {path}; porting {name} from timm ...", flush=True)
    try:
        return port.port_model(name, path)
    except (port.PortError, ValueError, OSError) as e:  # ConversionError is a ValueError
        raise SetupError(f"Missing ported weights for {name} at {path}, and porting them "
                         f"failed: {e} {fix}") from e  # fmt: skip


def _random_backbone(
    name: str, num_classes: int, rng: jax.Array, img_size: Any, timm_kwargs: Mapping[str, Any]
) -> tuple[VisionTransformer, dict]:
    """timm's architecture `name` with timm's random init, seeded from `rng`."""
    try:
        import timm
        import torch
    except ImportError as e:
        raise SetupError(
            "pretrained=False builds the timm architecture, which needs torch and timm: "
            "pip install 'adapter_plus_jax[port]'."
        ) from e
    from adapter_plus_jax.convert import from_timm

    kwargs = dict(timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    torch.manual_seed(_torch_seed(rng))
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return from_timm(model.eval())


def _backbone(
    name_or_dir: str | os.PathLike, num_classes: int, pretrained: bool, rng: jax.Array,
    img_size: Any, weights_dir: str | os.PathLike | None, timm_kwargs: Mapping[str, Any],
) -> tuple[VisionTransformer, dict]:  # fmt: skip
    """(plain ViT, its variables): ported weights (a directory, or a timm name ported on first
    use) with a head of `num_classes`, or timm's random init for `pretrained=False`."""
    is_dir = Path(name_or_dir, CONFIG_FILE).is_file()
    if is_dir and not pretrained:
        raise ValueError(
            f"{name_or_dir} is a ported directory; pretrained=False takes a timm model name."
        )
    if timm_kwargs and pretrained:
        raise ValueError(
            f"timm keyword arguments {sorted(timm_kwargs)} only apply with pretrained=False; "
            "a pretrained backbone has the architecture it was ported with."
        )
    if not pretrained:
        return _random_backbone(str(name_or_dir), num_classes, rng, img_size, timm_kwargs)
    path = Path(name_or_dir) if is_dir else ensure_ported(str(name_or_dir), weights_dir)
    head_rng = jax.random.fold_in(rng, 1)
    backbone, variables, _ = load_pretrained(path, img_size, num_classes, head_rng)
    return backbone, variables


def create_model(
    name_or_dir: str | os.PathLike,
    *,
    num_classes: int,
    adapter: AdapterSpec | Mapping | bool | None = None,
    lora: LoRASpec | Mapping | bool | None = None,
    prompt: PromptSpec | Mapping | bool | None = None,
    tune: TuneSpec | Mapping | None = None,
    pretrained: bool = True,
    rng: jax.Array | int,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.1,
    dtype: Any = "float32",
    remat: bool = False,
    attention: str = "auto",
    weights_dir: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> tuple[VisionTransformer, dict]:
    """A ViT with PEFT modules and its variables ({'params': ...}).

    Args:
      name_or_dir: a directory written by `apj port` / `save_pretrained`, or a timm model name
        (e.g. 'vit_base_patch16_224.orig_in21k').
      num_classes: classes of the head; a new head is drawn when it differs from the
        checkpoint's (0: no head, `apply` returns the pre-logit features).
      adapter, lora, prompt: the PEFT modules: a spec (`AdapterSpec()` is Adapter+), True for
        the default spec, a mapping with the reference's field names, or None.
      tune: a method that changes the backbone's own layers (`tuning.TuneSpec`: LoRA on any
        linear layer, DoRA, (IA)3, VeRA, SSF), a mapping of its fields, or None.
      pretrained: False builds timm's architecture with timm's random init (no download).
      rng: a JAX key (or int seed) for the fresh parameters.
      img_size: build for this input size (position embeddings resampled as timm does).
      drop_path_rate: stochastic depth at the last block (linear over depth, as timm).
      dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.
      remat: recompute block activations in the backward pass (less memory, more time).
      attention: 'auto' (cuDNN's fused attention where it runs: an NVIDIA GPU from Ampere on
        with cuDNN 9, bfloat16, no attention dropout; XLA's einsums elsewhere:
        `backend.auto_attention`),
        'xla' (the einsums, the reference's arithmetic, everywhere) or 'cudnn'. The module's
        `attention` says which was taken; docs/performance.md, 'GPU', has the measurements.
      weights_dir: where ported timm names live (default ~/.cache/adapter_plus_jax).
      **timm_kwargs: `timm.create_model` arguments for `pretrained=False` (e.g. depth=4).

    Raises SetupError (a ValueError) with what to do when the weights cannot be found or
    ported or `attention` cannot run here (`backend.check_attention`), ValueError for bad
    PEFT settings.
    """
    attn_drop = 0.0 if pretrained else timm_kwargs.get("attn_drop_rate", 0.0)
    backend.check_attention(attention, dtype, attn_drop)
    rng = _key(rng)
    specs = dict(
        adapter=_spec(adapter, AdapterSpec),
        lora=_spec(lora, LoRASpec),
        prompt=_spec(prompt, PromptSpec),
        tune=_spec(tune, TuneSpec),
    )
    backbone, variables = _backbone(
        name_or_dir, num_classes, pretrained, rng, img_size, weights_dir, timm_kwargs
    )
    config = backbone.config.replace(drop_path_rate=drop_path_rate)
    attention = backend.resolve_attention(attention, dtype, config)
    module = VisionTransformer(
        config, dtype=jnp.dtype(dtype), remat=remat, attention=attention, **specs
    )
    try:
        params = init_params(module, variables["params"], rng)
    except ValueError as e:
        raise SetupError(str(e)) from e
    return module, {"params": params}
