"""adapter_plus_jax: Adapter+ (Steitz & Roth, CVPR 2024) for timm ViTs in JAX/Flax."""

from adapter_plus_jax.convert import ConversionError, from_timm, to_adapter_plus
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.peft import AdapterSpec, LoRASpec, PromptSpec

__all__ = [
    "AdapterSpec",
    "ConversionError",
    "LoRASpec",
    "PromptSpec",
    "ViTConfig",
    "VisionTransformer",
    "from_timm",
    "to_adapter_plus",
]
