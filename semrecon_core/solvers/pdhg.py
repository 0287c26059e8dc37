"""Chambolle–Pock primal-dual hybrid gradient (PDHG) for ``min_x G(x) + F(Kx)``.

The solver knows nothing of MRI: ``K`` is a :class:`~semrecon_core.physics.linop.LinearOperator` (it needs
``K`` and ``Kᴴ``), ``G`` and ``F`` enter through their proximal maps, and each iteration is reported as a
:class:`~semrecon_core.solvers.status.SolverStatus` to a callback that can stop the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from semrecon_core.solvers.status import Callback, SolverStatus, notify

if TYPE_CHECKING:
    from collections.abc import Callable

    from semrecon_core.physics.linop import LinearOperator

# A power-iteration estimate of ‖K‖ approaches it from below; this margin keeps σ·τ·‖K‖² ≤ 1.
NORM_ESTIMATE_MARGIN = 1.01


def pdhg(
    x0: torch.Tensor,
    *,
    operator: LinearOperator,
    prox_primal: Callable[[torch.Tensor, float], torch.Tensor],
    prox_dual: Callable[[torch.Tensor, float], torch.Tensor],
    iterations: int,
    tau: float,
    operator_norm: float | None = None,
    objective: Callable[[torch.Tensor], float] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Chambolle–Pock primal-dual iterations for ``min_x G(x) + F(Kx)`` (θ = 1).

    Args:
        x0: initial primal point.
        operator: ``K``.
        prox_primal: ``(v, τ) ↦ prox_{τG}(v)``.
        prox_dual: ``(w, σ) ↦ prox_{σF*}(w)``.
        iterations: maximum number of iterations.
        tau: primal step size τ; the dual step is ``σ = 1 / (τ‖K‖²)``.
        operator_norm: an upper bound of ``‖K‖``; estimated by power iteration on ``KᴴK`` when ``None``.
        objective: optional ``x ↦ G(x) + F(Kx)`` reported in the status as ``objective``.
        callback: receives ``SolverStatus(iteration, solution=x, values={"primal_change", ["objective"]})``
            after every iteration (``primal_change`` = ``‖xₖ₊₁ − xₖ‖ / ‖xₖ₊₁‖``); returning ``False`` stops the loop.

    Returns:
        The last primal iterate.
    """
    if operator_norm is None:
        operator_norm = NORM_ESTIMATE_MARGIN * operator.operator_norm(x0)
    if tau <= 0 or operator_norm <= 0:
        raise ValueError(f"pdhg: expected positive tau and operator_norm, found {tau!r}, {operator_norm!r}")
    sigma = 1.0 / (tau * operator_norm**2)
    x = x0
    x_bar = x0
    dual = torch.zeros_like(operator(x0))
    for iteration in range(iterations):
        dual = prox_dual(dual + sigma * operator(x_bar), sigma)
        x_new = prox_primal(x - tau * operator.adjoint(dual), tau)
        x_bar = 2 * x_new - x
        x, previous = x_new, x
        if callback is not None:
            values = {"primal_change": float((x - previous).norm() / x.norm().clamp_min(1e-30))}
            if objective is not None:
                values["objective"] = objective(x)
            if notify(callback, SolverStatus(iteration, solution=x, values=values)):
                break
    return x
