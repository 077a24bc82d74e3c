"""Reading a ViT's architecture off a live timm (or adapter-plus) torch module.

`vit_config_from_timm` gives the ViTConfig and `peft_specs_from_timm` the Adapter, LoRA and
prompt specs, from the module's classes and attributes, never from a table of model names.
What the Flax model cannot represent raises ConversionError naming the part and what was found.
"""

from __future__ import annotations

from typing import Any

from adapter_plus_jax.model import ViTConfig
from adapter_plus_jax.peft import AdapterSpec, LoRASpec, PromptSpec


class ConversionError(ValueError):
    """The torch model or checkpoint cannot be converted; the message says why."""


# ----------------------------------------------------------------------------------------------
# Reading the architecture off a torch module.


def _type_name(obj: Any) -> str:
    return type(obj).__name__


def _unsupported(part: str, found: str, hint: str = "") -> ConversionError:
    msg = f"Unsupported architecture: {part} is {found}."
    return ConversionError(msg + (f" {hint}" if hint else ""))


def vit_config_from_timm(model: Any) -> ViTConfig:
    """Read the ViTConfig off a timm VisionTransformer (or adapter-plus model) instance; raises
    ConversionError for what the Flax model cannot represent."""
    from torch import nn

    _check_supported(model)
    pe, block0 = model.patch_embed, model.blocks[0]
    conv, attn, mlp = pe.proj, block0.attn, block0.mlp
    res_post = "ResPost" in _type_name(block0)
    ls = getattr(block0, "ls1", nn.Identity())
    if res_post:
        init_values = getattr(block0, "init_values", None)
    else:
        init_values = float(ls.gamma.detach().flatten()[0]) if hasattr(ls, "gamma") else None
    use_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    head = model.head
    # Models made by timm.create_model carry the normalisation of their weights.
    data_cfg = getattr(model, "pretrained_cfg", None) or {}
    half = (0.5,) * conv.in_channels
    cfg = ViTConfig(
        img_size=tuple(pe.img_size),
        patch_size=tuple(conv.kernel_size),
        in_chans=conv.in_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        mlp_dim=mlp.fc1.out_features,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
        patch_bias=conv.bias is not None,
        init_values=init_values,
        class_token=model.cls_token is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        no_embed_class=bool(model.no_embed_class),
        pos_embed=model.pos_embed is not None,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and not use_fc_norm),
        fc_norm=use_fc_norm,
        global_pool=model.global_pool,
        block="res_post" if res_post else "pre_norm",
        act=_activation_name(mlp.act),
        norm_eps=_layer_norm_eps(model),
        drop_rate=float(model.head_drop.p),
        pos_drop_rate=float(model.pos_drop.p),
        proj_drop_rate=float(attn.proj_drop.p),
        attn_drop_rate=float(attn.attn_drop.p),
        drop_path_rate=max(float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.blocks),
        mean=tuple(data_cfg.get("mean", half)),
        std=tuple(data_cfg.get("std", half)),
    )
    if cfg.global_pool == "map":
        _check_attn_pool(model.attn_pool, cfg)
    return cfg


def _check_supported(model: Any) -> None:
    """Raise ConversionError where `model` is not a ViT the Flax model represents: its class,
    stem, blocks, attention, MLP and head."""
    from timm.layers import Mlp, PatchEmbed
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from torch import nn

    if not isinstance(model, TimmViT):
        raise _unsupported(
            "the model",
            _type_name(model),
            "Only timm VisionTransformer models (and adapter-plus's subclass) "
            "convert; EVA, relative-position, hybrid and other ViTs do not.",
        )
    if getattr(model, "dynamic_img_size", False):
        raise _unsupported(
            "dynamic_img_size",
            "True",
            "Create the timm model with dynamic_img_size=False and a fixed img_size.",
        )
    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise _unsupported(
            "the stem (patch_embed)",
            _type_name(pe),
            "Only timm PatchEmbed stems convert (no hybrid CNN stems).",
        )
    conv = pe.proj
    if (
        not isinstance(conv, nn.Conv2d)
        or tuple(conv.stride) != tuple(conv.kernel_size)
        or any(conv.padding)
        or getattr(pe, "dynamic_img_pad", False)
        or not isinstance(pe.norm, nn.Identity)
    ):
        raise _unsupported("patch_embed", "a non-standard PatchEmbed (stride, padding or norm)")
    if not isinstance(model.patch_drop, nn.Identity):
        raise _unsupported(
            "patch_drop", _type_name(model.patch_drop), "Create the model with patch_drop_rate=0."
        )
    block_names = {_type_name(b) for b in model.blocks}
    if len(block_names) != 1 or not block_names <= {
        "Block",
        "ResPostBlock",
        "AdapterBlock",
        "AdapterResPostBlock",
    }:
        raise _unsupported(
            "the transformer blocks",
            ", ".join(sorted(block_names)),
            "Supported: Block and ResPostBlock.",
        )
    attn = model.blocks[0].attn
    if _type_name(attn) not in ("Attention", "LoRAAttention"):
        raise _unsupported("the attention layer", _type_name(attn))
    for extra in ("norm",):  # attention-output norm in newer timm (scale_norm)
        if not isinstance(getattr(attn, extra, nn.Identity()), nn.Identity):
            raise _unsupported(f"attn.{extra}", _type_name(getattr(attn, extra)))
    if attn.proj.bias is None:
        raise _unsupported("attn.proj", "a Linear without bias")
    mlp = model.blocks[0].mlp
    if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
        raise _unsupported("the MLP", _type_name(mlp), "Supported: timm Mlp without norm.")
    if mlp.fc1.bias is None or mlp.fc2.bias is None:
        raise _unsupported("the MLP", "an Mlp without bias")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise _unsupported("the head", _type_name(model.head))


def _activation_name(act: Any) -> str:
    from torch import nn

    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    names = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}  # timm.layers
    if _type_name(act) in names:
        return names[_type_name(act)]
    raise _unsupported(
        "the MLP activation", _type_name(act), "Supported: GELU (exact or tanh) and QuickGELU."
    )


def _layer_norm_eps(model: Any) -> float:
    from torch import nn

    norm_like = [
        (n, m)
        for n, m in model.named_modules()
        if "norm" in _type_name(m).lower() or "Norm" in _type_name(m)
    ]
    eps = set()
    for name, m in norm_like:
        if not isinstance(m, nn.LayerNorm):
            raise _unsupported(f"norm layer '{name}'", _type_name(m), "Supported: LayerNorm.")
        if not m.elementwise_affine or m.bias is None:
            raise _unsupported(f"norm layer '{name}'", "a LayerNorm without affine weight/bias")
        eps.add(float(m.eps))
    if len(eps) > 1:
        raise _unsupported("the norm layers", f"LayerNorms with different eps {sorted(eps)}")
    return eps.pop() if eps else 1e-6


def _check_attn_pool(pool: Any, cfg: ViTConfig) -> None:
    from torch import nn

    ok = (
        _type_name(pool) == "AttentionPoolLatent"
        and pool.latent_len == 1
        and pool.pos_embed is None
        and pool.pool == "token"
        and pool.num_heads == cfg.num_heads
        and pool.q.bias is not None
        and isinstance(pool.q_norm, nn.Identity)
        and isinstance(pool.norm, nn.LayerNorm)
        and pool.mlp.fc1.out_features == cfg.mlp_dim
        and isinstance(pool.mlp.act, nn.GELU)
        and pool.mlp.act.approximate == "none"
    )
    if not ok:
        raise _unsupported("the attention pool", "an AttentionPoolLatent with non-default options")


# ----------------------------------------------------------------------------------------------
# adapter-plus modules.


def _fields(cfg: Any, spec_cls: type) -> dict[str, Any]:
    import dataclasses

    names = [f.name for f in dataclasses.fields(spec_cls)]
    out = {n: getattr(cfg, n) for n in names if hasattr(cfg, n) and getattr(cfg, n) is not None}
    if "location" in out:
        out["location"] = tuple(out["location"])
    return out


def peft_specs_from_timm(
    model: Any,
) -> tuple[AdapterSpec | None, LoRASpec | None, PromptSpec | None]:
    """The Adapter, LoRA and prompt specs of an adapter-plus VisionTransformerAdapter."""
    block0 = model.blocks[0]
    adapter = lora = prompt = None
    if getattr(block0, "adapter_config", None) is not None:
        adapter = AdapterSpec(**_fields(block0.adapter_config, AdapterSpec))
    lcfg = getattr(block0, "lora_config", None)
    if lcfg is not None and getattr(lcfg, "config", "attention") == "attention":
        # The reference passes no `init` to its LoRA branches (houlsby init); init does not
        # change the conversion, so keep our default.
        lora = LoRASpec(**{k: v for k, v in _fields(lcfg, LoRASpec).items() if k != "init"})
    pcfg = getattr(block0, "prompt_config", None)
    if pcfg:
        class_token, reg_tokens = model.cls_token is not None, getattr(model, "num_reg_tokens", 0)
        if not class_token:
            raise _unsupported(
                "prompt_config",
                "set on a model with class_token=False",
                "The reference writes prompts at position 1, right after the class token.",
            )
        # The reference puts the prompts between the class token and the registers, we after the
        # registers. Attention, norms and MLPs do not depend on token order, so the class token
        # and an attention pool see the same; an average pool or the token sequence would not.
        if reg_tokens and model.global_pool not in ("token", "map"):
            raise _unsupported(
                "prompt_config",
                f"set on a model with {reg_tokens} register tokens and global_pool="
                f"{model.global_pool!r}",
                "With registers, the reference's prompt layout (class token, prompts, registers) "
                "differs from ours (class token, registers, prompts) in what an average pool or "
                "the token sequence holds; only 'token' and 'map' pooling convert.",
            )
        prompt = PromptSpec(num_tokens=int(pcfg.num_tokens), dropout=float(pcfg.dropout))
    return adapter, lora, prompt
