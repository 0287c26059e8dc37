"""Classical reconstructions: zero-filled, CG-SENSE and compressed-sensing TV (primal-dual).

Engines follow the :mod:`semrecon_core.recon` contract ``engine(problem, config, *, callback, prior)``;
the problem's k-space is scaled so that the zero-filled image has max magnitude 1, so λ is relative
to that scale. The solvers (:func:`pdhg` here, :func:`semrecon_core.physics.cg.conjugate_gradient`)
take callables and know nothing of MRI; progress goes through the callback as status dicts.

- ``zero_filled``: coil-combined adjoint ``Aᴴy`` with the maps.
- ``sense`` + prior ``none``: CG-SENSE, CG on ``(AᴴA + λI) x = Aᴴy`` (``config.lam``, ``config.iterations``).
- ``sense`` + prior ``tv``: ``min_x 0.5‖Ax − y‖² + λ·TV(x)`` (isotropic TV) by Chambolle–Pock with
  ``K = ∇``; the data term's proximal map ``(AᴴA + I/τ)⁻¹(Aᴴy + v/τ)`` is solved by a few warm-started
  CG iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from semrecon_core.config import ReconConfig
from semrecon_core.physics.cg import conjugate_gradient
from semrecon_core.physics.sense import SenseOp
from semrecon_core.priors.tv import GRADIENT_NORM_SQUARED, TVPrior, gradient, gradient_adjoint
from semrecon_core.recon import ReconProblem, ReconResult

Status = dict[str, Any]

# Primal step of the TV solver relative to the image scale (max |zero-filled| = 1); σ = 1 / (τ‖∇‖²).
TV_PRIMAL_STEP = 3.0
# Warm-started CG iterations for the data-term proximal map per primal-dual iteration.
TV_INNER_CG = 2


def pdhg(
    x0: torch.Tensor,
    *,
    prox_primal: Callable[[torch.Tensor, float], torch.Tensor],
    prox_dual: Callable[[torch.Tensor, float], torch.Tensor],
    operator: Callable[[torch.Tensor], torch.Tensor],
    adjoint: Callable[[torch.Tensor], torch.Tensor],
    operator_norm: float,
    iterations: int,
    tau: float,
    objective: Callable[[torch.Tensor], float] | None = None,
    callback: Callable[[Status], None] | None = None,
) -> torch.Tensor:
    """Chambolle–Pock primal-dual iterations for ``min_x G(x) + F(Kx)`` (θ = 1).

    Args:
        x0: initial primal point.
        prox_primal: ``(v, τ) ↦ prox_{τG}(v)``.
        prox_dual: ``(w, σ) ↦ prox_{σF*}(w)``.
        operator: ``K``; ``adjoint``: ``Kᴴ``.
        operator_norm: an upper bound of ``‖K‖``; the dual step is ``σ = 1 / (τ‖K‖²)``.
        iterations: number of iterations.
        tau: primal step size τ.
        objective: optional ``x ↦ G(x) + F(Kx)`` reported in the status.
        callback: receives ``{"iteration", "primal_change", ["objective"]}`` after every iteration.

    Returns:
        The last primal iterate.
    """
    if tau <= 0 or operator_norm <= 0:
        raise ValueError(f"pdhg: expected positive tau and operator_norm, found {tau!r}, {operator_norm!r}")
    sigma = 1.0 / (tau * operator_norm**2)
    x = x0
    x_bar = x0
    dual = torch.zeros_like(operator(x0))
    for iteration in range(iterations):
        dual = prox_dual(dual + sigma * operator(x_bar), sigma)
        x_new = prox_primal(x - tau * adjoint(dual), tau)
        x_bar = 2 * x_new - x
        change = float((x_new - x).norm() / x_new.norm().clamp_min(1e-30))
        x = x_new
        if callback is not None:
            status: Status = {"iteration": iteration, "primal_change": change}
            if objective is not None:
                status["objective"] = objective(x)
            callback(status)
    return x


def zero_filled(
    problem: ReconProblem,
    config: ReconConfig,
    *,
    callback: Callable[[Status], None] | None = None,
    prior: Any = None,
) -> ReconResult:
    """Coil-combined zero-filled image ``Aᴴy`` (maps-weighted adjoint)."""
    op = SenseOp(problem.maps, problem.mask)
    with torch.no_grad():
        image = op.adjoint(problem.kspace)
    return ReconResult(image=image, label="zero-filled (coil-combined adjoint)")


def sense(
    problem: ReconProblem,
    config: ReconConfig,
    *,
    callback: Callable[[Status], None] | None = None,
    prior: Any = None,
) -> ReconResult:
    """CG-SENSE (prior ``none``) or compressed-sensing TV (prior ``tv``) as ``config`` says.

    For prior ``tv`` the regulariser is ``config.lam · TV``; a prebuilt ``prior`` (a
    :class:`~semrecon_core.priors.tv.TVPrior`, as :func:`semrecon_core.priors.build_prior` makes with
    weight 1) multiplies that by its own weight, like λ·prior in the deep engines.
    """
    config = config.resolved()
    if config.prior == "none":
        return _cg_sense(problem, config, callback)
    if config.prior == "tv":
        if prior is not None and not isinstance(prior, TVPrior):
            raise ValueError(f"backbone 'sense' with prior 'tv': expected a TVPrior, found {type(prior).__name__}")
        scale = 1.0 if prior is None else prior.weight
        tv = TVPrior(weight=float(config.lam) * scale)
        return _tv_pdhg(problem, config, tv, callback)
    raise ValueError(f"property 'prior': backbone 'sense' supports none or tv, found {config.prior!r}")


def _cg_sense(problem: ReconProblem, config: ReconConfig, callback: Callable[[Status], None] | None) -> ReconResult:
    op = SenseOp(problem.maps, problem.mask)
    trace: list[Status] = []

    def report(iteration: int, x: torch.Tensor, residual: torch.Tensor) -> None:
        status = {"iteration": iteration, "residual": float(residual.max())}
        trace.append(status)
        if callback is not None:
            callback(status)

    with torch.no_grad():
        rhs = op.adjoint(problem.kspace)
        image = conjugate_gradient(
            op.normal, rhs, lam=float(config.lam), max_iter=int(config.iterations), tol=1e-6, callback=report
        )
    return ReconResult(
        image=image,
        label=f"CG-SENSE (λ {config.lam:g}, {len(trace)} iterations)",
        info={"iterations": len(trace)},
        trace=trace,
    )


def _tv_pdhg(
    problem: ReconProblem, config: ReconConfig, tv: TVPrior, callback: Callable[[Status], None] | None
) -> ReconResult:
    op = SenseOp(problem.maps, problem.mask)
    trace: list[Status] = []
    with torch.no_grad():
        rhs = op.adjoint(problem.kspace)
        state = {"x": rhs}

        def prox_data(v: torch.Tensor, tau: float) -> torch.Tensor:
            # argmin_x 0.5‖Ax − y‖² + ‖x − v‖²/(2τ), warm-started at the previous solution.
            state["x"] = conjugate_gradient(
                op.normal, rhs + v / tau, lam=1.0 / tau, x0=state["x"], max_iter=TV_INNER_CG, tol=1e-7
            )
            return state["x"]

        def objective(x: torch.Tensor) -> float:
            residual = op(x) - problem.kspace
            return float(0.5 * residual.abs().square().sum() + tv.loss(x))

        def report(status: Status) -> None:
            trace.append(status)
            if callback is not None:
                callback(status)

        image = pdhg(
            rhs,
            prox_primal=prox_data,
            prox_dual=lambda w, sigma: tv.project_dual(w),
            operator=gradient,
            adjoint=gradient_adjoint,
            operator_norm=math.sqrt(GRADIENT_NORM_SQUARED),
            iterations=int(config.iterations),
            tau=TV_PRIMAL_STEP,
            objective=objective if callback is not None else None,
            callback=report,
        )
    return ReconResult(
        image=image,
        label=f"CS-TV primal-dual (λ {tv.weight:g}, {len(trace)} iterations)",
        info={"iterations": len(trace)},
        trace=trace,
    )
