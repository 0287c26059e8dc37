"""Pieces shared by the HuggingFace-based encoders (Janus, generic vision transformers).

Precision: each encoder has a requested precision, ``float32`` or ``bfloat16``. The image-only encoders
(Janus vision tower, generic HF vision) request ``float32`` unless told otherwise, as the authors run
image-only extraction and reconstruction in fp32; the image-language encoder requests ``bfloat16``, as the
authors' LLM path. ``bfloat16`` takes effect on CUDA only (bf16 weights and autocast); elsewhere, or when
the caller turns autocast off, the encoder computes in ``float32``. A ``float32`` encoder disables any
autocast around its forward, so an engine's bf16 autocast cannot reach it. The dtype the encoder computes
in is part of its bank identity (``dtype``).

Also: validation of the hidden-state layers, the model's input size and the preprocessing part of a bank
identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import torch

from semrecon_core.encoders.preprocess import PREPROCESSING_VERSION

Precision = Literal["float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")


def checked_precision(precision: str, name: str) -> Precision:
    """``precision`` after checking it is ``float32`` or ``bfloat16``."""
    if precision == "float32":
        return "float32"
    if precision == "bfloat16":
        return "bfloat16"
    raise ValueError(f"encoder '{name}': precision: expected float32 or bfloat16, found {precision!r}")


def requested_precision(precision: str, autocast: bool) -> str:
    """The precision an encoder asks for: ``precision``, or ``float32`` when autocast is off."""
    return precision if autocast else "float32"


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype an encoder with ``precision`` computes in on ``device`` (bfloat16 only on CUDA)."""
    return torch.bfloat16 if (precision == "bfloat16" and device.type == "cuda") else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` / ``bfloat16``: the name recorded in bank identities."""
    return str(dtype).removeprefix("torch.")


def precision_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast for a bf16 encoder; autocast switched off (whatever encloses it) for a fp32 one."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
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
