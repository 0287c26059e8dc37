"""Conjugate gradient for ``(AᴴA + λI) x = b``, batched over the leading (slice) axis.

Works inside autograd (used as the data-consistency step of the unrolled network: gradients flow
through the iterations to ``b`` and ``λ``) and standalone (CG-SENSE). The solver knows nothing of MRI:
it takes the normal operator as a callable (e.g. ``A.normal`` of a
:class:`~semrecon_core.physics.linop.LinearOperator`) and reports a
:class:`~semrecon_core.solvers.status.SolverStatus` per iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from semrecon_core.solvers.status import Callback, SolverStatus, notify

if TYPE_CHECKING:
    from collections.abc import Callable


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-slice real inner product ``Re<a, b>`` of ``(slices, ...)`` tensors → ``(slices, 1, ...)``."""
    prod = (a.conj() * b).real if a.is_complex() else a * b
    value = prod.reshape(prod.shape[0], -1).sum(dim=1)
    return value.reshape((-1,) + (1,) * (a.ndim - 1))


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    lam: float | torch.Tensor = 0.0,
    x0: torch.Tensor | None = None,
    max_iter: int = 30,
    tol: float = 1e-6,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Solve ``(normal + lam·I) x = rhs`` slice by slice (each slice has its own step sizes).

    Args:
        normal: Hermitian positive semi-definite operator ``x ↦ AᴴA x``.
        rhs: right-hand side ``b``, shape ``(slices, ...)``.
        lam: Tikhonov weight (float or a differentiable scalar tensor).
        x0: initial guess (zeros when ``None``).
        max_iter: maximum number of iterations.
        tol: stop when every slice's residual norm is below ``tol`` times its ``‖b‖``.
        callback: receives ``SolverStatus(iteration, solution=x, values={"residual": r})`` after each
            iteration, ``r`` the largest residual norm over the slices; returning ``False`` stops the loop.

    Returns:
        The approximate solution, same shape as ``rhs``.
    """

    def system(v: torch.Tensor) -> torch.Tensor:
        return normal(v) + lam * v

    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs - system(x) if x0 is not None else rhs.clone()
    p = r
    rr = _dot(r, r)
    threshold = (tol**2) * _dot(rhs, rhs)
    tiny = torch.finfo(rr.dtype).tiny
    for iteration in range(max_iter):
        if bool((rr <= threshold).all()):
            break
        ap = system(p)
        alpha = rr / _dot(p, ap).clamp_min(tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r)
        p = r + (rr_new / rr.clamp_min(tiny)) * p
        rr = rr_new
        if callback is not None:
            status = SolverStatus(iteration, solution=x, values={"residual": float(rr.max().sqrt())})
            if notify(callback, status):
                break
    return x
