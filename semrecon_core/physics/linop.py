"""Linear operators that compose: ``A.H`` (adjoint), ``A @ B`` (composition), ``A.gram`` (``AᴴA``).

An operator is an ``nn.Module`` whose ``forward`` applies ``A`` and whose :meth:`~LinearOperator.adjoint`
applies ``Aᴴ``; tensors it holds (coil maps, masks) are buffers, so they move with ``.to(device)``. The MRI
forward model is assembled from the small operators here in :mod:`semrecon_core.physics.sense`.

Operators work on complex (or real) tensors and inside autograd; leading axes (slices) are batch axes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from semrecon_core.physics.fft import fft2c, ifft2c


class LinearOperator(nn.Module, ABC):
    """A linear map ``A`` with its adjoint ``Aᴴ``: ``A(x)``, ``A.adjoint(y)``, ``A.H``, ``A @ B``, ``A.gram``."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``."""

    @abstractmethod
    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᴴ y``."""

    @property
    def H(self) -> LinearOperator:
        """The adjoint ``Aᴴ`` as an operator (``A.H.H`` is ``A``)."""
        return AdjointLinearOperator(self)

    @property
    def gram(self) -> LinearOperator:
        """The normal operator ``AᴴA`` as a (self-adjoint) operator; it applies :meth:`normal`."""
        return GramOperator(self)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``AᴴA x``; subclasses override it with a cheaper equivalent where one exists."""
        return self.adjoint(self(x))

    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        """The composition ``self ∘ other`` (``other`` applied first)."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return LinearOperatorComposition(self, other)

    @torch.no_grad()
    def operator_norm(self, like: torch.Tensor, *, iterations: int = 30, seed: int = 0) -> float:
        """Estimate ``‖A‖`` by power iteration on ``AᴴA`` from a random start shaped like ``like``.

        The estimate approaches ``‖A‖`` from below; it is the largest over the batch (all slices at once).
        """
        generator = torch.Generator(device=like.device).manual_seed(seed)
        v = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
        v = v / v.norm()
        eigenvalue = 0.0
        for _ in range(iterations):
            w = self.normal(v)
            eigenvalue = float(w.norm())
            if eigenvalue == 0.0:
                break
            v = w / eigenvalue
        return math.sqrt(eigenvalue)


class AdjointLinearOperator(LinearOperator):
    """``Aᴴ`` of an operator ``A``: forward and adjoint swapped; its adjoint is ``A`` itself."""

    def __init__(self, operator: LinearOperator) -> None:
        super().__init__()
        self.operator = operator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Aᴴ x``."""
        return self.operator.adjoint(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A y``."""
        return self.operator(y)

    @property
    def H(self) -> LinearOperator:
        """``A``."""
        return self.operator


class GramOperator(LinearOperator):
    """``AᴴA`` of an operator ``A`` (self-adjoint); it applies ``A.normal``."""

    def __init__(self, operator: LinearOperator) -> None:
        super().__init__()
        self.operator = operator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``AᴴA x``."""
        return self.operator.normal(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``AᴴA y`` (the same as :meth:`forward`)."""
        return self.operator.normal(y)

    @property
    def H(self) -> LinearOperator:
        """The operator itself."""
        return self


class LinearOperatorComposition(LinearOperator):
    """``outer ∘ inner``: ``inner`` applied first; the adjoint is ``innerᴴ ∘ outerᴴ``."""

    outer: LinearOperator
    inner: LinearOperator

    def __init__(self, outer: LinearOperator, inner: LinearOperator) -> None:
        super().__init__()
        self.outer = outer
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``outer(inner(x))``."""
        return self.outer(self.inner(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``innerᴴ(outerᴴ(y))``."""
        return self.inner.adjoint(self.outer.adjoint(y))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``innerᴴ(outer.normal(inner(x)))``, so that a cheaper normal of ``outer`` (e.g. a mask's) is used."""
        return self.inner.adjoint(self.outer.normal(self.inner(x)))


class FFTOp(LinearOperator):
    """Centred orthonormal 2-D FFT over the last two axes (unitary: the adjoint is the inverse FFT)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., y, x)`` image → ``(..., ky, kx)`` k-space."""
        return fft2c(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(..., ky, kx)`` k-space → ``(..., y, x)`` image."""
        return ifft2c(y)


class MaskOp(LinearOperator):
    """Multiplication by a boolean sampling mask (self-adjoint and idempotent: ``MᴴM = M``).

    Args:
        mask: bool mask that broadcasts against the data, e.g. ``(slices, 1, ky, kx)`` for multicoil k-space.
    """

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with unsampled positions set to zero."""
        return x * self.mask

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`forward`."""
        return self.forward(y)

    @property
    def H(self) -> LinearOperator:
        """The operator itself."""
        return self

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`forward` (``MᴴM = M`` for a 0/1 mask)."""
        return self.forward(x)


class SensitivityOp(LinearOperator):
    """Coil sensitivities: image ``(slices, y, x)`` ↔ coil images ``(slices, coils, y, x)``.

    Args:
        maps: complex coil maps ``(slices, coils, y, x)``.
    """

    maps: torch.Tensor

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("maps", maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Coil images ``maps · image``."""
        return self.maps * x.unsqueeze(-3)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Coil combination ``Σ_coils conj(maps) · coil image``."""
        return (self.maps.conj() * y).sum(dim=-3)


class GradientOp(LinearOperator):
    """Forward differences ``∇``: ``(slices, y, x)`` → ``(slices, 2, y, x)`` (``∂y``, ``∂x``).

    The difference at the last row/column is zero (Neumann boundary); ``‖∇‖² ≤`` :attr:`NORM_SQUARED`.
    """

    NORM_SQUARED = 8.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The field of forward differences along y and x."""
        dy = torch.zeros_like(x)
        dx = torch.zeros_like(x)
        dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
        dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
        return torch.stack((dy, dx), dim=-3)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Minus the divergence of a field ``(slices, 2, y, x)`` → ``(slices, y, x)``."""
        py, px = y[..., 0, :, :], y[..., 1, :, :]
        out = torch.zeros_like(py)
        out[..., 1:, :] += py[..., :-1, :]
        out[..., :-1, :] -= py[..., :-1, :]
        out[..., :, 1:] += px[..., :, :-1]
        out[..., :, :-1] -= px[..., :, :-1]
        return out
