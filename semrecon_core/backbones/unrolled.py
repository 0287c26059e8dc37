"""The unrolled network: U-Net denoisers alternating with conjugate-gradient data consistency.

Stage k computes ``z = D_k(x)`` with its own (unshared) U-Net and then solves
``(AᴴA + λ I) x = Aᴴy + λ z`` with ``semrecon_core.solvers.cg.conjugate_gradient`` (differentiable, so
gradients reach the U-Nets and the learnable ``λ``, initialised at 0.01 as in the public code).
Self-supervised training splits the measured samples SSDU-style (:func:`ssdu_split`): the network sees one
part for data consistency, the loss is computed on the held-out part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from semrecon_core.backbones.unet import UNet, UNetSpec
from semrecon_core.solvers.cg import conjugate_gradient

if TYPE_CHECKING:
    from semrecon_core.physics.sense import SenseOp


class UnrolledNet(nn.Module):
    """``stages`` × (U-Net, CG data consistency) with a learnable, shared data-consistency weight λ.

    The default denoisers are residual paper U-Nets (``UNetSpec(residual=True)``).

    ``forward(image, kspace, op)``: ``image`` complex ``(slices, y, x)`` start (the zero-filled image),
    ``kspace`` the measured samples ``(slices, coils, ky, kx)`` seen by the network, ``op`` the
    :class:`SenseOp` with the matching mask.
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
        self.lam = nn.Parameter(torch.tensor(float(lam_init)))

    def forward(self, image: torch.Tensor, kspace: torch.Tensor, op: SenseOp) -> torch.Tensor:
        """Run the stages; returns the complex ``(slices, y, x)`` image of the last data-consistency step."""
        rhs = op.adjoint(kspace)
        lam = self.lam.abs().clamp_min(1e-6)
        x = image
        for denoiser in self.denoisers:
            z = denoiser(x)
            x = conjugate_gradient(op.normal, rhs + lam * z, lam=lam, x0=z, max_iter=self.cg_iterations)
        return x


def ssdu_split(
    mask: torch.Tensor,
    *,
    holdout: float = 0.4,
    keep_centre: tuple[int, int] = (4, 4),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a sampling mask into disjoint (network, loss) masks, SSDU-style.

    ``holdout`` of the measured samples outside a small centre block (``keep_centre`` ky × kx, always kept
    for the network so it sees the low frequencies) go to the loss mask, drawn uniformly at random.

    Args:
        mask: bool ``(slices, ky, kx)``.
        holdout: fraction of the measured samples held out for the loss (0.4 in the public code).
        keep_centre: size of the centre block never held out.
        generator: random generator (seeded by the caller for determinism).

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
    held = torch.zeros_like(mask)
    for s in range(mask.shape[0]):
        index = candidates[s].flatten().nonzero().squeeze(1)
        count = int(round(holdout * int(mask[s].sum())))
        count = min(count, index.numel())
        chosen = index[scores[s].flatten()[index].argsort()[:count]]
        held[s].view(-1)[chosen] = True
    return mask & ~held, held
