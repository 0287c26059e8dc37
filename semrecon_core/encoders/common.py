"""Pieces shared by the HuggingFace-based encoders (Janus, generic vision transformers).

Weight precision and autocast (bfloat16 on CUDA when asked, float32 otherwise), validation of the
hidden-state layers, the model's input size and the preprocessing part of a bank identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from semrecon_core.encoders.preprocess import PREPROCESSING_VERSION


def load_dtype(device: torch.device, autocast: bool) -> torch.dtype:
    """The dtype to load weights in: bfloat16 on CUDA with autocast, else float32."""
    return torch.bfloat16 if (autocast and device.type == "cuda") else torch.float32


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled``; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def checked_layers(layers: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    """``layers`` as ints after checking each is a hidden-state index ``0..depth`` of model ``name``."""
    if not layers or any(not 0 <= k <= depth for k in layers):
        raise ValueError(f"property 'layers': expected indices in 0..{depth} for {name}, found {tuple(layers)}")
    return tuple(int(k) for k in layers)


def input_size(size: Any) -> tuple[int, int]:
    """A config's ``image_size`` (an int for square inputs, or ``(H, W)``) as ``(H, W)``."""
    return (size, size) if isinstance(size, int) else tuple(size)


def preprocessing_identity(size: tuple[int, int]) -> str:
    """The preprocessing recipe and input size, as recorded in an embedding bank's identity."""
    return f"{PREPROCESSING_VERSION};size={size[0]}x{size[1]}"
