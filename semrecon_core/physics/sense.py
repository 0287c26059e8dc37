"""The multicoil SENSE forward model ``A = M F C``: sampling mask ∘ centred FFT ∘ coil sensitivities.

Shapes: image ``(slices, y, x)``, k-space ``(slices, coils, ky, kx)``, maps ``(slices, coils, y, x)``,
mask ``(slices, ky, kx)`` (or broadcastable, e.g. ``(1, ky, kx)``). All complex64 except the mask.
"""

from __future__ import annotations

from typing import cast

import torch

from semrecon_core.physics.linop import FFTOp, LinearOperatorComposition, MaskOp, SensitivityOp


class SenseOp(LinearOperatorComposition):
    """``MaskOp @ FFTOp @ SensitivityOp``; maps and mask move with ``.to(device)``.

    ``op(image)`` gives masked k-space, ``op.adjoint(kspace)`` the coil-combined image and ``op.normal(image)``
    applies ``AᴴA = Cᴴ Fᴴ M F C`` (the mask once).
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor) -> None:
        if maps.ndim != 4:
            raise ValueError(f"coil maps: expected (slices, coils, y, x), found shape {tuple(maps.shape)}")
        if mask.ndim != 3 or mask.shape[-2:] != maps.shape[-2:]:
            raise ValueError(
                f"mask: expected (slices, {maps.shape[-2]}, {maps.shape[-1]}), found shape {tuple(mask.shape)}"
            )
        super().__init__(MaskOp(mask.unsqueeze(-3)) @ FFTOp(), SensitivityOp(maps.to(torch.complex64)))

    @property
    def maps(self) -> torch.Tensor:
        """Coil maps ``(slices, coils, y, x)``: the buffer of the sensitivity operator (applied first)."""
        return cast("SensitivityOp", self.inner).maps

    @property
    def mask(self) -> torch.Tensor:
        """Sampling mask ``(slices, ky, kx)``: the buffer of the mask operator (applied last)."""
        return cast("MaskOp", cast("LinearOperatorComposition", self.outer).outer).mask.squeeze(-3)
