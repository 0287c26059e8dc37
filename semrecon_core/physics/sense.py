"""The multicoil SENSE forward model ``A = M F C`` as an ``nn.Module``.

Shapes: image ``(slices, y, x)``, k-space ``(slices, coils, ky, kx)``, maps ``(slices, coils, y, x)``,
mask ``(slices, ky, kx)`` (or broadcastable, e.g. ``(1, ky, kx)``). All complex64 except the mask.
"""

from __future__ import annotations

import torch
from torch import nn

from semrecon_core.physics.fft import fft2c, ifft2c


class SenseOp(nn.Module):
    """Sampling mask ∘ centred FFT ∘ coil sensitivities; maps and mask move with ``.to(device)``."""

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        if maps.ndim != 4:
            raise ValueError(f"coil maps: expected (slices, coils, y, x), found shape {tuple(maps.shape)}")
        if mask.ndim != 3 or mask.shape[-2:] != maps.shape[-2:]:
            raise ValueError(
                f"mask: expected (slices, {maps.shape[-2]}, {maps.shape[-1]}), found shape {tuple(mask.shape)}"
            )
        self.register_buffer("maps", maps.to(torch.complex64))
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(slices, y, x)`` image → ``(slices, coils, ky, kx)`` masked k-space."""
        kspace = fft2c(self.maps * image.unsqueeze(-3))
        return kspace * self.mask.unsqueeze(-3)

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """``(slices, coils, ky, kx)`` k-space → ``(slices, y, x)`` coil-combined image."""
        coil_images = ifft2c(kspace * self.mask.unsqueeze(-3))
        return (self.maps.conj() * coil_images).sum(dim=-3)

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        """``AᴴA`` applied to an image (the mask is idempotent, so it is applied once)."""
        kspace = fft2c(self.maps * image.unsqueeze(-3)) * self.mask.unsqueeze(-3)
        return (self.maps.conj() * ifft2c(kspace)).sum(dim=-3)
