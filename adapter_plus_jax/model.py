"""Vision Transformer in Flax Linen that computes what timm's `VisionTransformer` computes.

Parameter names follow timm's module names ('/'-joined, `blocks_3/attn/qkv/kernel`), so that the
one key mapping in `convert.py` stays readable. Adapters, LoRA branches and prompts (`peft.py`)
plug into `Block` and `Attention`; with none configured the model is a plain timm ViT.

    module = VisionTransformer(ViTConfig(...), adapter=AdapterSpec(...))
    logits = module.apply(variables, images_nhwc, train=False)
    features = module.apply(variables, images_nhwc, pre_logits=True)

With `train=True`, dropout, attention dropout and stochastic depth draw from the 'dropout' rng.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from adapter_plus_jax import fact as fact_lib
from adapter_plus_jax.layers import (
    AttentionPool,
    DropPath,
    LayerScale,
    Mlp,
    attend,
    dense,
    trunc_normal,
)
from adapter_plus_jax.peft import (
    POSITIONS,
    Adapter,
    AdapterSpec,
    Branch,
    LoRA,
    LoRASpec,
    PromptSpec,
    prompt_init,
)
from adapter_plus_jax.tuning import TuneSpec, after_norm, linear

GLOBAL_POOLS = ("", "token", "avg", "max", "avgmax", "map")
BLOCK_TYPES = ("pre_norm", "res_post")  # timm `Block` and `ResPostBlock`
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a timm VisionTransformer (the names follow timm's arguments).

    `fc_norm` is resolved (True: norm after pooling), unlike timm's `None` default.
    `block` is 'pre_norm' for timm `Block`, 'res_post' for `ResPostBlock`.
    """

    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    qk_norm: bool = False
    patch_bias: bool = True
    init_values: float | None = None  # LayerScale (pre_norm) or norm init (res_post)
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    pos_embed: bool = True
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool = False
    global_pool: str = "token"
    block: str = "pre_norm"
    act: str = "gelu"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # The input normalisation the weights expect, (x / 255 - mean) / std per channel (timm's
    # pretrained_cfg); for `images.normalize`. Most ViT checkpoints use 0.5.
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        for name in ("img_size", "patch_size"):
            value = getattr(self, name)
            object.__setattr__(
                self, name, (value, value) if isinstance(value, int) else tuple(value)
            )
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        checks = [
            (self.global_pool in GLOBAL_POOLS, "global_pool", f"one of {GLOBAL_POOLS}"),
            (self.block in BLOCK_TYPES, "block", f"one of {BLOCK_TYPES}"),
            (self.act in ACTIVATIONS, "act", f"one of {ACTIVATIONS}"),
            (self.embed_dim % self.num_heads == 0, "num_heads", "a divisor of embed_dim"),
            (
                self.class_token or self.global_pool != "token",
                "global_pool",
                "not 'token' for a model without class token",
            ),
            (
                all(i % p == 0 for i, p in zip(self.img_size, self.patch_size, strict=False)),
                "img_size",
                "a multiple of patch_size",
            ),
            (len(self.mean) == len(self.std) == self.in_chans, "mean", "one value per channel"),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise ValueError(
                    f"ViTConfig.{field}={getattr(self, field)!r}: expected {expected}."
                )

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ViTConfig field(s) {unknown}.")
        return cls(**d)


class Attention(nn.Module):
    """timm `Attention` (fused qkv, optional q/k LayerNorm), with optional LoRA branches.

    LoRA follows the reference's LoRAAttention: the q/k/v branches read the attention input and
    are added per head before attention; the 'o' branch reads the output projection.
    """

    num_heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    norm_eps: float = 1e-6
    act: str = "gelu"
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32
    attention: str = "xla"
    tune: TuneSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, fact: dict | None = None) -> jax.Array:
        b, n, c = x.shape
        heads = (self.num_heads, c // self.num_heads)
        qkv = linear(3 * c, "qkv", self.dtype, self.qkv_bias, self.tune, fact)(x, train)
        qkv = qkv.reshape(b, n, 3, *heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        lora = functools.partial(LoRA, self.lora, act=self.act, norm_eps=self.norm_eps,
                                 dtype=self.dtype)  # fmt: skip
        if self.lora is not None:
            # The reference gives q/k/v branches a bias only when qkv has one.
            use_bias = self.lora.bias and self.qkv_bias
            q, k, v = (
                t + lora(use_bias=use_bias, name=f"lora_{loc}")(x, train).reshape(t.shape)
                if loc in self.lora.location
                else t
                for loc, t in zip("qkv", (q, k, v), strict=True)
            )
        if self.qk_norm:
            q = nn.LayerNorm(epsilon=self.norm_eps, name="q_norm")(q)
            k = nn.LayerNorm(epsilon=self.norm_eps, name="k_norm")(k)
        x = attend(q, k, v, nn.Dropout(self.attn_drop), train, self.attention)
        x = x.reshape(b, n, c)
        x = linear(c, "proj", self.dtype, True, self.tune, fact)(x, train)
        if self.lora is not None and "o" in self.lora.location:
            x = x + lora(use_bias=self.lora.bias, name="lora_o")(x, train)
        return nn.Dropout(self.proj_drop)(x, deterministic=not train)


class Block(nn.Module):
    """One transformer block (timm `Block` or `ResPostBlock`) with the adapter positions of the
    reference's AdapterBlock.forward_* variants (`peft.POSITIONS`), and VPT prompts written in
    before it runs."""

    config: ViTConfig
    drop_path: float = 0.0
    adapter: AdapterSpec | None = None
    lora: LoRASpec | None = None
    prompt: PromptSpec | None = None
    dtype: Any = jnp.float32
    attention: str = "xla"
    tune: TuneSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, fact: dict | None = None) -> jax.Array:
        """`fact`: FacT's factors for this block (`fact.for_block`), with `tune` FacT."""
        if self.prompt is not None:
            x = self._write_prompt(x, train)
        attn, mlp = self._residual_branches(train, fact)
        if self.adapter is None:
            x = x + attn(x)
            return x + mlp(x)
        cfg = self.config

        def adapter(y: jax.Array, skip: jax.Array, name: str = "adapter") -> jax.Array:
            module = Adapter(self.adapter, cfg.act, cfg.norm_eps, self.dtype, name=name)
            return module(y, skip=skip, train=train)

        return POSITIONS[self.adapter.config](x, attn, mlp, adapter)

    def _residual_branches(self, train: bool, fact: dict | None) -> tuple[Branch, Branch]:
        """(attention branch, MLP branch): y -> DropPath(the layer on y), with timm's norms and
        LayerScale (`Block`: before the layer; `ResPostBlock`: after it)."""
        cfg = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=cfg.norm_eps)
        if cfg.block == "res_post" and cfg.init_values is not None:
            norm = functools.partial(norm, scale_init=nn.initializers.constant(cfg.init_values))
        attn = Attention(
            cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.attn_drop_rate, cfg.proj_drop_rate,
            cfg.norm_eps, cfg.act, self.lora, self.dtype, self.attention, self.tune, name="attn",
        )  # fmt: skip
        mlp = Mlp(cfg.mlp_dim, cfg.act, cfg.proj_drop_rate, self.dtype,
                  functools.partial(linear, spec=self.tune, shared=fact), name="mlp")  # fmt: skip
        ssf1, ssf2 = after_norm(self.tune, "norm1"), after_norm(self.tune, "norm2")
        n1, n2 = norm(name="norm1"), norm(name="norm2")
        norm1, norm2 = (lambda y: ssf1(n1(y))), (lambda y: ssf2(n2(y)))
        dp1, dp2 = DropPath(self.drop_path), DropPath(self.drop_path)
        if cfg.block == "res_post":
            return (
                lambda y: dp1(norm1(attn(y, train, fact)), train),
                lambda y: dp2(norm2(mlp(y, train)), train),
            )
        ls1 = ls2 = lambda y: y  # noqa: E731
        if cfg.init_values is not None:
            ls1 = LayerScale(cfg.init_values, name="ls1")
            ls2 = LayerScale(cfg.init_values, name="ls2")
        return (
            lambda y: dp1(ls1(attn(norm1(y), train, fact)), train),
            lambda y: dp2(ls2(mlp(norm2(y), train)), train),
        )

    def _write_prompt(self, x: jax.Array, train: bool) -> jax.Array:
        """Replace the prompt slots (right after the prefix tokens) with this block's prompts."""
        cfg, t = self.config, self.prompt.num_tokens
        prompt = self.param("prompt", prompt_init(t, cfg.patch_size), (t, x.shape[-1]))
        prompt = jnp.broadcast_to(prompt.astype(x.dtype), (x.shape[0], t, x.shape[-1]))
        prompt = nn.Dropout(self.prompt.dropout)(prompt, deterministic=not train)
        start = cfg.num_prefix_tokens
        return jnp.concatenate([x[:, :start], prompt, x[:, start + t :]], axis=1)


class VisionTransformer(nn.Module):
    """timm VisionTransformer with optional Adapter / LoRA / VPT modules.

    Attributes:
      config: the architecture.
      adapter, lora, prompt: PEFT specs (see `peft.py`); None for a plain ViT.
      tune: a method that changes the backbone's own layers (`tuning.py`: LoRA on any linear
        layer, DoRA, (IA)3, VeRA, SSF); None for none.
      dtype: compute dtype of the matmuls (e.g. jnp.bfloat16); parameters stay float32,
        LayerNorm, softmax and the residual stream run in float32.
      remat: recompute block activations in the backward pass (saves memory, costs time).
      attention: 'xla' (default: the einsums of `layers.attend`) or 'cudnn' (cuDNN's fused
        attention; NVIDIA GPUs with a 16-bit dtype and no attention dropout only).
        `create_model` picks one for its 'auto' (`backend.resolve_attention`).
    """

    config: ViTConfig
    adapter: AdapterSpec | None = None
    lora: LoRASpec | None = None
    prompt: PromptSpec | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "xla"
    tune: TuneSpec | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, pre_logits: bool = False):
        """images: [batch, height, width, channels] -> logits [batch, num_classes]
        (or pre-logit features [batch, embed_dim] with `pre_logits=True`)."""
        cfg = self.config
        expected = (*cfg.img_size, cfg.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected images of shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(NHWC), got {tuple(images.shape)}. Resize the inputs, or build the model for "
                "this size (load_pretrained(..., img_size=...) resamples position embeddings)."
            )
        x = self._embed(images.astype(self.dtype), train)
        # remat recomputes each block's activations in the backward pass instead of storing them.
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        shared = None
        if self.tune is not None and self.tune.kind in fact_lib.KINDS:
            if cfg.mlp_dim != 4 * cfg.embed_dim:
                raise ValueError(
                    f"FacT splits the MLP into 4 chunks of the width: it needs mlp_dim = 4 x "
                    f"embed_dim, and this ViT has {cfg.mlp_dim} and {cfg.embed_dim}."
                )
            shared = fact_lib.FactShared(self.tune.kind, self.tune.dim, cfg.embed_dim, cfg.depth,
                                         name="fact")()  # fmt: skip
        for i in range(cfg.depth):
            # Stochastic depth rises linearly over depth, as in timm.
            rate = float(np.linspace(0.0, cfg.drop_path_rate, cfg.depth)[i])
            prompt = self.prompt if self.prompt and (self.prompt.deep or i == 0) else None
            specs = (self.adapter, self.lora, prompt)
            block = block_cls(cfg, rate, *specs, self.dtype, self.attention, self.tune,
                              name=f"blocks_{i}")  # fmt: skip
            x = block(x, train, shared and fact_lib.for_block(shared, i))
        norm = functools.partial(nn.LayerNorm, epsilon=cfg.norm_eps)
        if cfg.final_norm and not cfg.fc_norm:
            x = after_norm(self.tune, "norm")(norm(name="norm")(x))
        x = self._pool(x)
        if cfg.final_norm and cfg.fc_norm:
            x = after_norm(self.tune, "fc_norm")(norm(name="fc_norm")(x))
        x = nn.Dropout(cfg.drop_rate)(x, deterministic=not train)
        if pre_logits or cfg.num_classes == 0:
            return x
        return dense(cfg.num_classes, "head", self.dtype)(x).astype(jnp.float32)

    def _embed(self, images: jax.Array, train: bool) -> jax.Array:
        """Patchify, add position embeddings, prepend class/register tokens (and prompt slots)."""
        cfg, d = self.config, self.config.embed_dim
        x = nn.Conv(
            d,
            cfg.patch_size,
            strides=cfg.patch_size,
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=self.dtype,
            name="patch_embed",
        )(images)
        b = x.shape[0]
        x = after_norm(self.tune, "patch_embed")(x.reshape(b, -1, d).astype(jnp.float32))
        prefix = []
        if cfg.class_token:
            cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
            prefix.append(jnp.broadcast_to(cls, (b, 1, d)))
        if cfg.reg_tokens:
            reg = self.param("reg_token", nn.initializers.normal(1e-6), (1, cfg.reg_tokens, d))
            prefix.append(jnp.broadcast_to(reg, (b, cfg.reg_tokens, d)))
        if cfg.pos_embed:
            n_pos = x.shape[1] + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
            pos = self.param("pos_embed", trunc_normal(0.02, cutoff=100.0), (1, n_pos, d))
        if cfg.pos_embed and cfg.no_embed_class:
            x = x + pos
        x = jnp.concatenate([*prefix, x], axis=1)
        if cfg.pos_embed and not cfg.no_embed_class:
            x = x + pos
        x = nn.Dropout(cfg.pos_drop_rate)(x, deterministic=not train)
        if cfg.pre_norm:
            x = nn.LayerNorm(epsilon=cfg.norm_eps, name="norm_pre")(x)
        if self.prompt is not None:
            # Empty slots after the prefix tokens; each prompted block writes its prompts there.
            slots = jnp.zeros((b, self.prompt.num_tokens, d), x.dtype)
            start = cfg.num_prefix_tokens
            x = jnp.concatenate([x[:, :start], slots, x[:, start:]], axis=1)
        return x

    def _pool(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        pool = cfg.global_pool
        if pool == "map":
            return AttentionPool(
                cfg.num_heads, cfg.mlp_dim, cfg.norm_eps, self.dtype, name="attn_pool"
            )(x)
        if pool == "token":
            return x[:, 0]
        if not pool:
            return x
        # Prompts are pooled with the patch tokens, as in the reference (timm's pool skips only
        # its own prefix tokens).
        patches = x[:, cfg.num_prefix_tokens :]
        if pool == "avg":
            return patches.mean(axis=1)
        if pool == "max":
            return patches.max(axis=1)
        return 0.5 * (patches.max(axis=1) + patches.mean(axis=1))
