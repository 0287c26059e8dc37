"""Classical engines: zero-filled, CG-SENSE and compressed-sensing TV (primal-dual).

Engines follow the :class:`~semrecon_core.engines.base.Engine` protocol
``engine(problem, config, *, prior, callback)``; the problem's k-space is scaled so that the zero-filled
image has max magnitude 1, so λ is relative to that scale. The solvers
(:func:`~semrecon_core.solvers.cg.conjugate_gradient`, :func:`~semrecon_core.solvers.pdhg.pdhg`) know nothing
of MRI; each iteration's status goes to the trace and to the callback, which can stop the solver early.

- ``zero_filled``: coil-combined adjoint ``Aᴴy`` with the maps.
- ``sense`` + prior ``none``: CG-SENSE, CG on ``(AᴴA + λI) x = Aᴴy`` (``config.lam``, ``config.iterations``).
- ``sense`` + prior ``tv``: ``min_x 0.5‖Ax − y‖² + λ·TV(x)`` (isotropic TV) by Chambolle–Pock with
  ``K = ∇``; the data term's proximal map ``(AᴴA + I/τ)⁻¹(Aᴴy + v/τ)`` is solved by a few warm-started
  CG iterations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from semrecon_core.engines.base import ReconProblem, ReconResult
from semrecon_core.physics.coils import rss
from semrecon_core.physics.fft import ifft2c
from semrecon_core.physics.sense import SenseOp
from semrecon_core.priors.tv import GRADIENT, TVPrior
from semrecon_core.solvers.cg import conjugate_gradient
from semrecon_core.solvers.pdhg import pdhg
from semrecon_core.solvers.status import Callback, SolverStatus, chain

if TYPE_CHECKING:
    from semrecon_core.config import ResolvedConfig
    from semrecon_core.priors.base import Prior

# Primal step of the TV solver relative to the image scale (max |zero-filled| = 1); σ = 1 / (τ‖∇‖²).
TV_PRIMAL_STEP = 3.0
# Warm-started CG iterations for the data-term proximal map per primal-dual iteration.
TV_INNER_CG = 2


def zero_filled(
    problem: ReconProblem, config: ResolvedConfig, *, prior: Prior | None, callback: Callback | None
) -> ReconResult:
    """Coil-combined zero-filled image; no iterations, so no callback calls.

    ``Aᴴy`` (the maps-weighted adjoint), or with ``combine=rss`` the root-sum-of-squares of the coil images.
    """
    if config.combine == "rss":
        with torch.no_grad():
            coil_images = ifft2c(problem.kspace * problem.mask[:, None])
            image = rss(coil_images).to(torch.complex64)
        return ReconResult(image=image, label="zero-filled (root-sum-of-squares of the coil images)")
    op = SenseOp(problem.maps, problem.mask)
    with torch.no_grad():
        image = op.adjoint(problem.kspace)
    return ReconResult(image=image, label="zero-filled (coil-combined adjoint)")


def sense(
    problem: ReconProblem, config: ResolvedConfig, *, prior: Prior | None, callback: Callback | None
) -> ReconResult:
    """CG-SENSE (prior ``none``) or compressed-sensing TV (prior ``tv``) as ``config`` says.

    For prior ``tv`` the regulariser is ``config.lam · TV``; a built ``prior`` (a
    :class:`~semrecon_core.priors.tv.TVPrior`, as :func:`semrecon_core.priors.factory.build_prior` makes with
    weight 1) multiplies that by its own weight, like λ·prior in the deep engines.
    """
    if config.prior == "none":
        return _cg_sense(problem, config, callback)
    if config.prior == "tv":
        if prior is not None and not isinstance(prior, TVPrior):
            raise ValueError(f"backbone 'sense' with prior 'tv': expected a TVPrior, found {type(prior).__name__}")
        scale = 1.0 if prior is None else prior.weight
        tv = TVPrior(weight=float(config.lam) * scale)
        return _tv_pdhg(problem, config, tv, callback)
    raise ValueError(f"property 'prior': backbone 'sense' supports none or tv, found {config.prior!r}")


def _recorder(trace: list[dict[str, Any]]) -> Callback:
    """A callback that appends each status's record to ``trace``."""

    def record(status: SolverStatus) -> None:
        trace.append(status.record())

    return record


def _cg_sense(problem: ReconProblem, config: ResolvedConfig, callback: Callback | None) -> ReconResult:
    op = SenseOp(problem.maps, problem.mask)
    trace: list[dict[str, Any]] = []
    with torch.no_grad():
        rhs = op.adjoint(problem.kspace)
        image = conjugate_gradient(
            op.normal,
            rhs,
            lam=float(config.lam),
            max_iter=int(config.iterations),
            tol=1e-6,
            callback=chain([_recorder(trace), callback]),
        )
    return ReconResult(
        image=image,
        label=f"CG-SENSE (λ {config.lam:g}, {len(trace)} iterations)",
        info={"iterations": len(trace)},
        trace=trace,
    )


def _tv_pdhg(problem: ReconProblem, config: ResolvedConfig, tv: TVPrior, callback: Callback | None) -> ReconResult:
    op = SenseOp(problem.maps, problem.mask)
    trace: list[dict[str, Any]] = []
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

        image = pdhg(
            rhs,
            operator=GRADIENT,
            prox_primal=prox_data,
            prox_dual=lambda w, sigma: tv.project_dual(w),
            iterations=int(config.iterations),
            tau=TV_PRIMAL_STEP,
            operator_norm=math.sqrt(GRADIENT.NORM_SQUARED),
            objective=objective if callback is not None else None,
            callback=chain([_recorder(trace), callback]),
        )
    return ReconResult(
        image=image,
        label=f"CS-TV primal-dual (λ {tv.weight:g}, {len(trace)} iterations)",
        info={"iterations": len(trace)},
        trace=trace,
    )
