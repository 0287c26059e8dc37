"""Differentiable image preprocessing for the vision towers (public code's recipe, REFERENCE.md §1).

complex ``(slices, y, x)`` → magnitude → divide by the per-slice maximum → ``(x − mean) / std``
(Janus: mean = std = 0.5, so [0, 1] → [−1, 1]) → centre crop / zero-pad to the model's input size
without any resampling (padding happens after the mapping, so the pad value is 0) → repeat to
3 channels. Gradients flow back to the complex input and stay finite where ``|x| = 0``.
"""

from __future__ import annotations

import torch

# Squared-magnitude floor: keeps d|x|/dx finite at x = 0 (the gradient there is 0 instead of NaN).
_EPS = 1e-12

PREPROCESSING_VERSION = "magnitude/max;(x-mean)/std;centre-crop-pad-no-resample;3ch;v1"


def magnitude(image: torch.Tensor) -> torch.Tensor:
    """``|image|`` for complex or real input with a gradient that is finite (zero) at 0."""
    squared = image.real.square() + image.imag.square() if image.is_complex() else image.square()
    return torch.sqrt(squared + _EPS) - _EPS**0.5


def crop_or_pad(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop or zero-pad the last two axes of ``image`` to ``size`` (no resampling)."""
    out = image
    for axis, target in zip((-2, -1), size, strict=True):
        current = out.shape[axis]
        if current > target:
            start = (current - target) // 2
            out = out.narrow(axis, start, target)
        elif current < target:
            before = (target - current) // 2
            after = target - current - before
            pad = [0, 0, 0, 0]
            pad_index = 0 if axis == -1 else 2
            pad[pad_index], pad[pad_index + 1] = before, after
            out = torch.nn.functional.pad(out, pad)
    return out


def to_pixels(
    image: torch.Tensor,
    size: tuple[int, int],
    *,
    mean: float = 0.5,
    std: float = 0.5,
    channels: int = 3,
) -> torch.Tensor:
    """Map a complex ``(slices, y, x)`` image to model pixels ``(slices, channels, *size)``.

    Each slice is divided by its own maximum magnitude (a zero slice stays zero), mapped with
    ``(x − mean) / std``, then centre-cropped or zero-padded to ``size``.
    """
    if image.dim() != 3:
        raise ValueError(f"image: expected shape (slices, y, x), found {tuple(image.shape)}")
    mag = magnitude(image).float()
    peak = mag.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    mapped = (mag / peak - mean) / std
    fitted = crop_or_pad(mapped, size)
    return fitted.unsqueeze(1).expand(-1, channels, -1, -1)
