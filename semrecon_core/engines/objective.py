"""How each preset scales the terms of Eq. (7): the one place that says it.

Inside semrecon the k-space is scaled so that the zero-filled image has max magnitude 1 and the FFT is centred
and orthonormal. On that data:

``paper`` (the default): the paper's data term ``0.5·Σ|A x − y|²`` divided by the number of pixels and slices,
    ``D = 0.5·‖A x − y‖² / (B·ny·nx)``, and TV as a per-pixel mean (:class:`~semrecon_core.priors.tv.TVPrior`
    ``scaling="mean"``). λ then means the same at any matrix size and slice batch: the deep backbones with TV
    minimise the same objective (up to the factor ``1/(B·ny·nx)``) as the classical CS-TV with the same λ.
    Coil count: with ESPIRiT maps normalised to ``Σ_c |C_c|² = 1`` the signal part of ``‖A x − y‖²`` does not
    grow with the coils.
``public-code``: the authors' definitions exactly (REFERENCE.md §7). Their forward model uses an unnormalised
    FFT, so their residuals are ``√(ny·nx)`` times ours; the L1 of the stacked real and imaginary parts is a
    mean over the whole masked array (U-Net, unrolled: ``whole``) or over the sampled entries only (INR:
    ``sampled``); the unrolled network sums it over every stage output (:mod:`semrecon_core.engines.unrolled`);
    TV is ``scaling="authors"`` (:data:`semrecon_core.priors.tv.DEEP_TV_SCALING` maps a preset to its TV form).

Both presets reduce data and prior over the slices of a batch the same way (a mean), so a batch of B copies of
one slice has the same prior/data balance, in loss and gradient, as that slice alone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from semrecon_core.config import Preset

L1Reduction = Literal["whole", "sampled"]


def data_term(
    predicted: torch.Tensor,
    measured: torch.Tensor,
    mask: torch.Tensor,
    *,
    preset: Preset,
    reduction: L1Reduction = "whole",
) -> torch.Tensor:
    """The data term of ``preset`` between predicted and measured masked k-space ``(slices, coils, ky, kx)``.

    Args:
        predicted: ``A x`` (zero outside ``mask``).
        measured: the measured samples (zero outside ``mask``).
        mask: bool ``(slices, ky, kx)`` of the samples the term compares.
        preset: ``paper`` (``0.5·Σ|r|² / (B·ny·nx)``) or ``public-code`` (the authors' L1).
        reduction: ``public-code`` only: mean over the ``whole`` masked array or over the ``sampled`` entries.
    """
    residual = predicted - measured
    slices, coils, rows, cols = residual.shape
    pixels = rows * cols
    if preset == "paper":
        return 0.5 * residual.abs().square().sum() / (slices * pixels)
    if preset != "public-code":
        raise ValueError(f"data term: expected preset paper or public-code, found {preset!r}")
    absolute = torch.view_as_real(residual).abs().sum() * math.sqrt(pixels)  # unnormalised-FFT residuals
    if reduction == "whole":
        return absolute / residual.numel() / 2
    if reduction == "sampled":
        return absolute / (2 * coils * mask.sum().clamp_min(1))
    raise ValueError(f"data term: expected reduction whole or sampled, found {reduction!r}")
