"""adapter_plus_jax: Adapter+ (Steitz & Roth, CVPR 2024) for timm ViTs in JAX/Flax.

    import adapter_plus_jax as apj

    module, variables = apj.create_model(
        "ported/vit_b16_in21k", num_classes=47, adapter=apj.AdapterSpec(), rng=jax.random.key(0))
    mask = apj.trainable_mask(variables["params"])            # adapters and head: True
    x = apj.normalize(uint8_images, module.config.mean, module.config.std)
    logits = module.apply(variables, x)

Importing it needs neither torch nor TensorFlow: only converting live torch models
(`from_timm`, `to_adapter_plus`) and porting timm weights need the `port` extra, and the
experiment runner's data pipelines the `data` extra.
"""

from adapter_plus_jax import backend, nnx, train  # submodules: apj.backend, apj.nnx, apj.train
from adapter_plus_jax.convert import from_timm, to_adapter_plus
from adapter_plus_jax.errors import SetupError
from adapter_plus_jax.factory import create_model
from adapter_plus_jax.hf_peft import to_peft
from adapter_plus_jax.images import normalize
from adapter_plus_jax.model import VisionTransformer, ViTConfig
from adapter_plus_jax.params import merge_lora, trainable_count, trainable_mask
from adapter_plus_jax.peft import METHODS, AdapterSpec, LoRASpec, Method, PromptSpec
from adapter_plus_jax.pretrained import PretrainedError, load_pretrained, save_pretrained
from adapter_plus_jax.serving import TaskSet
from adapter_plus_jax.task import Task, load_backbone, read_task, write_task
from adapter_plus_jax.timm_arch import ConversionError
from adapter_plus_jax.train import decay_mask
from adapter_plus_jax.tuning import TuneSpec

__all__ = [
    "METHODS",
    "AdapterSpec",
    "ConversionError",
    "LoRASpec",
    "Method",
    "PretrainedError",
    "PromptSpec",
    "SetupError",
    "Task",
    "TaskSet",
    "TuneSpec",
    "ViTConfig",
    "VisionTransformer",
    "backend",
    "create_model",
    "decay_mask",
    "from_timm",
    "load_backbone",
    "load_pretrained",
    "merge_lora",
    "nnx",
    "normalize",
    "read_task",
    "save_pretrained",
    "to_adapter_plus",
    "to_peft",
    "trainable_count",
    "train",
    "trainable_mask",
    "write_task",
]
