"""The reference in torch, for the tests and the benchmarks: adapter-plus 0.1.0 models with the
paper's PEFT configs, its freezing rule, its AdamW parameter groups, and its learning-rate
schedule as Lightning steps it.

Written from the recipe (docs/recipe.md), not from our implementation, so that the tests compare
two independent versions. benchmarks/ import this module too (it puts tests/ on sys.path).
"""

from __future__ import annotations

import warnings

import adapter_plus
import torch

NO_DECAY = {"pos_embed", "cls_token", "dist_token"}  # timm's VisionTransformer.no_weight_decay()

# The paper's configs, in the reference's field names (docs/recipe.md, section 8).
ADAPTER_PLUS = dict(
    config="post", dim=8, act_layer=True, norm_layer=False, bias=True, init="houlsby",
    scaling="channel", attn_adapter=False, dropout=0.0, drop_path=0.1,
)  # fmt: skip
LORA = dict(  # its `init: lora` never reaches the branches
    config="attention", location="qk", dim=8, act_layer=False, norm_layer=False, bias=False,
    init="lora", scaling=1.0, dropout=0.1, pre_dropout=True, drop_path=0.0,
)  # fmt: skip
VPT = dict(num_tokens=50, dropout=0.1)


def reference_vit(
    adapter: dict | None = None,
    lora: dict | None = None,
    prompt: dict | None = None,
    seed: int = 0,
    **vit_kwargs,
) -> torch.nn.Module:
    """adapter-plus's VisionTransformerAdapter with these PEFT configs (reference field names)
    and timm ViT arguments, initialised from torch seed `seed`."""
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    configs = {
        f"{name}_config": OmegaConf.create(cfg)
        for name, cfg in (("adapter", adapter), ("lora", lora), ("prompt", prompt))
        if cfg is not None
    }
    return adapter_plus.VisionTransformerAdapter(**configs, **vit_kwargs)


def reference_trains(name: str) -> bool:
    """The reference's trainable set: the head, every Adapter module (LoRA branches are Adapters
    under `attn.adapters`) and the prompt tokens."""
    return name.startswith("head.") or "adapter" in name or name.endswith(".prompt")


def freeze_like_reference(model: torch.nn.Module) -> set[str]:
    """Freeze everything, then unfreeze as the reference's training script does; returns the
    names of the trainable parameters."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, adapter_plus.Adapter):
            m.requires_grad_(True)
    for name, p in model.named_parameters():
        if name.endswith(".prompt"):
            p.requires_grad_(True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if reference_trains(n)}
    return names


def reference_adamw(
    model: torch.nn.Module, lr: float, weight_decay: float = 1e-4
) -> torch.optim.AdamW:
    """torch AdamW over the trainable parameters in the reference's two groups: no decay for
    1-D tensors, biases, scalings and timm's no_weight_decay names; decay for the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith((".bias", ".scaling")) or name in NO_DECAY
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def reference_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_epochs: int,
    epochs: int,
    start_factor: float = 100.0,
    min_factor: float = 1000.0,
):
    """lightning-bolts' LinearWarmupCosineAnnealingLR as the reference configures it. Step it as
    the reference's LightningModule does: `step(epoch=e)` at the end of every epoch e."""
    # record=True swallows pl_bolts' "under review" notices, which it lets through with filters
    # of its own (a plain "ignore" filter loses to them).
    with warnings.catch_warnings(record=True):
        from pl_bolts.optimizers.lr_scheduler import LinearWarmupCosineAnnealingLR

        base_lr = optimizer.param_groups[0]["lr"]
        return LinearWarmupCosineAnnealingLR(
            optimizer,
            warmup_epochs=warmup_epochs,
            max_epochs=epochs,
            warmup_start_lr=base_lr / start_factor,
            eta_min=base_lr / min_factor,
        )


def reference_epoch_lrs(
    base_lr: float,
    warmup_epochs: int,
    epochs: int,
    start_factor: float = 100.0,
    min_factor: float = 1000.0,
) -> list[float]:
    """The learning rate of every epoch of a reference run."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = reference_scheduler(optimizer, warmup_epochs, epochs, start_factor, min_factor)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # a no-op (no gradients), in the order a training epoch has
        scheduler.step(epoch=epoch)
    return lrs
