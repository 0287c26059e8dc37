"""Low-rank adaptation of convolutions and linear layers through ``peft``.

The public code's minLoRA touched ``nn.Linear`` only, which adds nothing to a convolutional U-Net;
here every ``nn.Conv2d`` / ``nn.Linear`` gets a rank-``r`` adapter, the base
weights are frozen, and only the adapters train.
"""

from __future__ import annotations

import re

from torch import nn


def lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Conv2d`` and ``nn.Linear`` layers of ``model``."""
    kinds = (nn.Conv2d, nn.Linear)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def apply_lora(model: nn.Module, rank: int, *, alpha: int | None = None) -> nn.Module:
    """Inject LoRA adapters of ``rank`` into every conv/linear layer of ``model`` in place.

    Only the adapter weights stay trainable (BatchNorm affine parameters and biases are frozen too).
    ``alpha`` defaults to ``rank`` (scaling 1). Returns ``model``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA: rank must be at least 1, found {rank}")
    targets = lora_targets(model)
    if not targets:
        raise ValueError(f"LoRA: {type(model).__name__} has no Conv2d or Linear layer to adapt")
    # a regular expression matches qualified names exactly (a list would match name suffixes too)
    pattern = "|".join(re.escape(name) for name in targets)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": m}`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}
