"""Total variation of complex ``(slices, y, x)`` images, in the three scalings semrecon uses.

With the forward differences of :class:`~semrecon_core.physics.linop.GradientOp` (zero difference at the last
row/column, Neumann boundary):

- ``sum``: ``Σ_pixels,slices sqrt(|∂y x|² + |∂x x|²)``, isotropic, the sum convention of the classical
  CS-TV objective ``0.5·‖Ax − y‖² + λ·TV`` (with :meth:`TVPrior.prox` and :meth:`TVPrior.project_dual`);
- ``mean``: the same divided by the number of pixels and slices, the ``paper`` preset's prior for the deep
  backbones, matching its per-pixel data term (so λ means what it means for CS-TV, at any size and batch);
- ``authors``: the public code's ``compute_TV_loss`` on the real and the imaginary part, summed:
  ``(Σ|∂y Re| + Σ|∂x Re| + Σ|∂y Im| + Σ|∂x Im|) / ((N1 − 1)(N2 − 1))``, anisotropic, averaged over slices.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from semrecon_core.physics.linop import GradientOp

GRADIENT = GradientOp()
"""The finite-difference operator ``∇`` of TV (it holds no tensors, so one instance serves every device)."""


def _magnitude(field: torch.Tensor) -> torch.Tensor:
    """Pointwise Euclidean norm over the direction axis (and real/imaginary parts): ``(slices, 1, y, x)``."""
    return field.abs().square().sum(dim=-3, keepdim=True).sqrt()


TVScaling = Literal["sum", "mean", "authors"]

DEEP_TV_SCALING: dict[str, TVScaling] = {"paper": "mean", "public-code": "authors"}
"""The TV form the deep backbones use under each preset (:mod:`semrecon_core.engines.objective`)."""


class TVPrior:
    """Total variation as a prior: differentiable ``loss``, exact ``prox`` and dual projection (``sum`` form).

    Args:
        weight: multiplies the TV value in :meth:`loss` and the step in :meth:`prox`.
        scaling: ``sum``, ``mean`` or ``authors`` (see the module docstring).
        eps: smoothing inside the square root of the isotropic forms so their gradient is finite at flat regions.
    """

    def __init__(self, weight: float = 1.0, *, scaling: TVScaling = "sum", eps: float = 1e-12) -> None:
        if not weight >= 0:
            raise ValueError(f"TV weight: expected a non-negative number, found {weight!r}")
        if scaling not in ("sum", "mean", "authors"):
            raise ValueError(f"TV scaling: expected sum, mean or authors, found {scaling!r}")
        self.weight = float(weight)
        self.scaling = scaling
        self.eps = float(eps)

    @property
    def label(self) -> str:
        """Human-readable name for image comments and logs."""
        form = "" if self.scaling == "sum" else f", {self.scaling}"
        return f"TV (weight {self.weight:g}{form})"

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        """``weight · TV(image)`` as a differentiable scalar for a complex ``(slices, y, x)`` image."""
        field = GRADIENT(image)
        if self.scaling == "authors":
            rows, cols = image.shape[-2:]
            anisotropic = torch.view_as_real(field).abs().sum() if field.is_complex() else field.abs().sum()
            return self.weight * anisotropic / ((rows - 1) * (cols - 1) * image.shape[0])
        isotropic = (field.abs().square().sum(dim=-3) + self.eps).sqrt().sum()
        if self.scaling == "mean":
            isotropic = isotropic / image.numel()
        return self.weight * isotropic

    def status(self, image: torch.Tensor) -> dict[str, Any]:
        """Nothing to add to a trace beyond the loss terms."""
        return {}

    def project_dual(self, field: torch.Tensor, radius: float | None = None) -> torch.Tensor:
        """Project a dual field ``(slices, 2, y, x)`` pointwise onto the ``radius`` ball (default ``weight``).

        This is the proximal map of the convex conjugate of ``radius·‖·‖₂,₁`` (for any step size).
        """
        radius = self.weight if radius is None else radius
        if radius == 0:
            return torch.zeros_like(field)
        return field / (_magnitude(field) / radius).clamp_min(1.0)

    @torch.no_grad()
    def prox(self, image: torch.Tensor, step: float, *, iterations: int = 50) -> torch.Tensor:
        """``argmin_x 0.5‖x − image‖² + step·weight·TV(x)`` by fast dual projected gradient (Beck–Teboulle).

        Args:
            image: complex or real ``(slices, y, x)`` image.
            step: proximal step size (≥ 0).
            iterations: dual iterations.
        """
        radius = step * self.weight
        if radius == 0:
            return image.clone()
        dual = torch.zeros_like(GRADIENT(image))
        momentum = dual
        t = 1.0
        for _ in range(iterations):
            primal = image - GRADIENT.adjoint(momentum)
            new_dual = self.project_dual(momentum + GRADIENT(primal) / GRADIENT.NORM_SQUARED, radius)
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            momentum = new_dual + ((t - 1) / t_next) * (new_dual - dual)
            dual, t = new_dual, t_next
        return image - GRADIENT.adjoint(dual)
