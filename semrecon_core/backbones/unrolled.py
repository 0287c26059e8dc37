"""The unrolled network: U-Net denoisers alternating with conjugate-gradient data consistency.

Stage k computes ``z_k = D_k(x_{k-1})`` with its own (unshared) U-Net and then solves
``(AᴴA + λ_k I) x_k = Aᴴy + λ_k z_k`` with ``semrecon_core.solvers.cg.conjugate_gradient`` started from zero,
as in the authors' code (differentiable, so gradients reach the U-Nets and the learnable per-stage ``λ_k``,
initialised at 0.01, or 0.001 for image-language banks). Self-supervised training splits the measured samples
SSDU-style (:func:`ssdu_split`): the network sees one part for data consistency, the loss uses the held-out part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from semrecon_core.backbones.unet import UNet, UNetSpec
from semrecon_core.solvers.cg import conjugate_gradient

if TYPE_CHECKING:
    from semrecon_core.physics.sense import SenseOp


@dataclass
class UnrolledOutputs:
    """Every stage's outputs: ``denoised[k] = z_k`` (U-Net) and ``consistent[k] = x_k`` (data consistency)."""

    denoised: list[torch.Tensor]
    consistent: list[torch.Tensor]


class UnrolledNet(nn.Module):
    """``stages`` × (U-Net, CG data consistency), each stage with its own learnable weight ``λ_k``.

    The default denoisers are residual paper U-Nets (``UNetSpec(residual=True)``).

    ``forward(image, kspace, op)``: ``image`` complex ``(slices, y, x)`` start (the zero-filled image),
    ``kspace`` the measured samples ``(slices, coils, ky, kx)`` seen by the network, ``op`` the
    :class:`SenseOp` with the matching mask; :meth:`run` returns every stage's outputs.
    """

    def __init__(
        self,
        spec: UNetSpec | None = None,
        *,
        stages: int = 4,
        lam_init: float = 0.01,
        cg_iterations: int = 20,
    ) -> None:
        super().__init__()
        if stages < 1:
            raise ValueError(f"unrolled network: expected at least one stage, found {stages}")
        self.spec = spec or UNetSpec(residual=True)
        self.stages = stages
        self.cg_iterations = cg_iterations
        self.denoisers = nn.ModuleList(UNet(self.spec) for _ in range(stages))
        self.lams = nn.ParameterList(nn.Parameter(torch.tensor(float(lam_init))) for _ in range(stages))

    def run(self, image: torch.Tensor, kspace: torch.Tensor, op: SenseOp) -> UnrolledOutputs:
        """Run the stages and keep every intermediate image."""
        rhs = op.adjoint(kspace)
        outputs = UnrolledOutputs(denoised=[], consistent=[])
        x = image
        for denoiser, weight in zip(self.denoisers, self.lams, strict=True):
            lam = weight.abs().clamp_min(1e-6)
            z = denoiser(x)
            x = conjugate_gradient(op.normal, rhs + lam * z, lam=lam, max_iter=self.cg_iterations)
            outputs.denoised.append(z)
            outputs.consistent.append(x)
        return outputs

    def forward(self, image: torch.Tensor, kspace: torch.Tensor, op: SenseOp) -> torch.Tensor:
        """The complex ``(slices, y, x)`` image of the last data-consistency step."""
        return self.run(image, kspace, op).consistent[-1]


def ssdu_split(
    mask: torch.Tensor,
    *,
    holdout: float = 0.4,
    keep_centre: tuple[int, int] = (4, 4),
    generator: torch.Generator | None = None,
    gaussian_sigma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a sampling mask into disjoint (network, loss) masks, SSDU-style.

    ``holdout`` of the measured samples outside a small centre block (``keep_centre`` ky × kx, always kept
    for the network so it sees the low frequencies) go to the loss mask, drawn uniformly at random, or, with
    ``gaussian_sigma``, with probabilities weighted by a Gaussian of that width (in k-space normalised to
    [-1, 1]) around the centre, as the authors draw it (σ = 0.5).

    Args:
        mask: bool ``(slices, ky, kx)``.
        holdout: fraction of the measured samples held out for the loss (0.4 in the public code).
        keep_centre: size of the centre block never held out.
        generator: random generator (seeded by the caller for determinism).
        gaussian_sigma: width of the Gaussian weighting of the hold-out draw (``None``: uniform).

    Returns:
        ``(theta, lam)``: masks with ``theta | lam == mask`` and ``theta & lam`` empty.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"SSDU split: holdout must be in (0, 1), found {holdout}")
    candidates = mask.clone()
    ky, kx = mask.shape[-2:]
    cy, cx = keep_centre
    candidates[..., ky // 2 - cy // 2 : ky // 2 + (cy + 1) // 2, kx // 2 - cx // 2 : kx // 2 + (cx + 1) // 2] = False
    scores = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
    if gaussian_sigma is not None:
        # weighted sampling without replacement: sort by u^(1/w) (Efraimidis–Spirakis), i.e. by -log(u)/w
        ny = torch.linspace(-1.0, 1.0, ky, device=mask.device)
        nx = torch.linspace(-1.0, 1.0, kx, device=mask.device)
        weight = torch.exp(-(ny[:, None] ** 2 + nx[None, :] ** 2) / (2 * gaussian_sigma**2))
        scores = -torch.log(scores.clamp_min(1e-12)) / weight
    held = torch.zeros_like(mask)
    for s in range(mask.shape[0]):
        index = candidates[s].flatten().nonzero().squeeze(1)
        count = int(round(holdout * int(mask[s].sum())))
        count = min(count, index.numel())
        chosen = index[scores[s].flatten()[index].argsort()[:count]]
        held[s].view(-1)[chosen] = True
    return mask & ~held, held
