"""Solvers: conjugate gradient (accuracy, autograd, callback), PDHG (TV denoising against the TV prox, callback)."""

from __future__ import annotations

import torch

from semrecon_core.physics.linop import GradientOp
from semrecon_core.priors.tv import TVPrior
from semrecon_core.solvers.cg import conjugate_gradient
from semrecon_core.solvers.pdhg import pdhg
from semrecon_core.solvers.status import Callback, SolverStatus
from tests.helpers import phantom_scan, random_tensor


def _stop_after(iteration: int, statuses: list[SolverStatus]) -> Callback:
    """A callback that records every status and stops the loop after ``iteration``."""

    def callback(status: SolverStatus) -> bool:
        statuses.append(status)
        return status.iteration < iteration

    return callback


# --- conjugate gradient --------------------------------------------------------------------------


def _spd_system(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b = random_tensor((n, n), seed=8, dtype=dtype)
    matrix = b.conj().T @ b + 0.1 * torch.eye(n, dtype=dtype)
    return matrix, random_tensor((1, n), seed=9, dtype=dtype)


def test_cg_solves_known_spd_system() -> None:
    matrix, rhs = _spd_system(12, torch.complex128)
    lam = 0.3
    x = conjugate_gradient(lambda v: v @ matrix.T, rhs, lam=lam, max_iter=100, tol=1e-12)
    expected = torch.linalg.solve(matrix + lam * torch.eye(12, dtype=matrix.dtype), rhs[0])
    assert torch.allclose(x[0], expected, atol=1e-9)
    statuses: list[SolverStatus] = []
    conjugate_gradient(lambda v: v @ matrix.T, rhs, max_iter=5, callback=statuses.append)
    residuals = [status.values["residual"] for status in statuses]
    assert [status.iteration for status in statuses] == list(range(5)) and residuals[-1] < residuals[0]
    assert statuses[-1].solution is not None and statuses[-1].solution.shape == rhs.shape


def test_cg_gradients_flow_to_rhs_and_lambda() -> None:
    matrix, rhs = _spd_system(4, torch.complex128)
    rhs = rhs.clone().requires_grad_(True)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def solve(b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conjugate_gradient(lambda v: v @ matrix.T, b, lam=weight, max_iter=4, tol=0.0)

    assert torch.autograd.gradcheck(solve, (rhs, lam), eps=1e-6, atol=1e-5)


def test_cg_stops_when_the_callback_returns_false() -> None:
    matrix, rhs = _spd_system(12, torch.complex128)
    statuses: list[SolverStatus] = []
    stopped = conjugate_gradient(lambda v: v @ matrix.T, rhs, max_iter=10, tol=0.0, callback=_stop_after(3, statuses))
    assert [status.iteration for status in statuses] == [0, 1, 2, 3]
    assert torch.equal(stopped, conjugate_gradient(lambda v: v @ matrix.T, rhs, max_iter=4, tol=0.0))


# --- PDHG ----------------------------------------------------------------------------------------


def _denoising_problem() -> tuple[torch.Tensor, TVPrior]:
    """A noisy 32×32 phantom and the TV prior to denoise it with."""
    scan, _ = phantom_scan(n=32)
    gen = torch.Generator().manual_seed(0)
    noisy = scan.ground_truth + 0.1 * torch.randn(1, 32, 32, dtype=torch.complex64, generator=gen)
    return noisy, TVPrior(weight=0.08)


def _denoise_objective(x: torch.Tensor, noisy: torch.Tensor, tv: TVPrior) -> float:
    return float(0.5 * (x - noisy).abs().square().sum() + tv.loss(x))


def _denoise_by_pdhg(noisy: torch.Tensor, tv: TVPrior, **options) -> torch.Tensor:
    """``argmin_x 0.5‖x − noisy‖² + TV(x)`` by PDHG with ``K = ∇``."""
    return pdhg(
        noisy,
        operator=GradientOp(),
        prox_primal=lambda v, tau: (v + tau * noisy) / (1 + tau),
        prox_dual=lambda w, sigma: tv.project_dual(w),
        tau=0.35,
        objective=lambda x: _denoise_objective(x, noisy, tv),
        **options,
    )


def test_tv_prox_agrees_with_pdhg_and_is_optimal() -> None:
    noisy, tv = _denoising_problem()
    prox = tv.prox(noisy, 1.0, iterations=300)
    statuses: list[SolverStatus] = []
    solved = _denoise_by_pdhg(noisy, tv, operator_norm=8**0.5, iterations=300, callback=statuses.append)
    assert len(statuses) == 300 and statuses[-1].values["objective"] < statuses[0].values["objective"]
    assert "primal_change" in statuses[-1].values
    assert float((prox - solved).norm() / prox.norm()) < 1e-2
    best = _denoise_objective(prox, noisy, tv)
    assert best < _denoise_objective(noisy, noisy, tv)
    for seed in range(3):
        step = 1e-2 * torch.randn(prox.shape, dtype=prox.dtype, generator=torch.Generator().manual_seed(seed))
        assert best <= _denoise_objective(prox + step, noisy, tv) + 1e-6


def test_pdhg_stops_when_the_callback_returns_false() -> None:
    noisy, tv = _denoising_problem()
    statuses: list[SolverStatus] = []
    stopped = _denoise_by_pdhg(noisy, tv, iterations=20, callback=_stop_after(4, statuses))
    assert [status.iteration for status in statuses] == [0, 1, 2, 3, 4]
    assert torch.equal(stopped, _denoise_by_pdhg(noisy, tv, iterations=5))
    assert torch.equal(stopped, statuses[-1].solution)


def test_adam_uses_the_fused_kernel_where_it_applies_and_computes_the_loops_update() -> None:
    import torch

    from semrecon_core.solvers.adam import adam_optimizer

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    loop_weights = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = adam_optimizer([(weights, 1e-2)], betas=(0.9, 0.99))
    loop = torch.optim.Adam(loop_weights, lr=1e-2, betas=(0.9, 0.99), foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(5):
        for optimizer, params in ((fused, weights), (loop, loop_weights)):
            optimizer.zero_grad()
            sum(((p - step) ** 2).sum() for p in params).backward()
            optimizer.step()
    for a, b in zip(weights, loop_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    complex_weight = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    assert not adam_optimizer([([complex_weight], 1e-2)]).defaults["fused"]  # no fused kernel for complex
