"""Checks shared by the tests (a plain module, imported by test modules)."""

from __future__ import annotations

import torch

from semrecon_core.physics.linop import LinearOperator


def random_tensor(shape: tuple[int, ...], *, seed: int = 0, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """Standard normal samples of ``shape``, reproducible from ``seed``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    """``⟨a, b⟩ = Σ conj(a)·b``."""
    return complex((a.conj() * b).sum())


def check_linear_operator(
    op: LinearOperator,
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    dtype: torch.dtype = torch.complex64,
    *,
    rtol: float = 1e-4,
) -> None:
    """Assert that ``op`` maps ``x_shape`` to ``y_shape`` and behaves as a linear operator with its adjoint.

    Checks the dot-product test ``⟨Ax, y⟩ = ⟨x, Aᴴy⟩``, that ``A.H`` applies ``Aᴴ`` and ``A.H.H`` applies ``A``,
    that ``A.gram`` and ``A.normal`` apply ``AᴴA`` (and ``A.gram`` is self-adjoint), and that autograd's
    vector-Jacobian products through ``A`` and ``Aᴴ`` are ``Aᴴ`` and ``A`` (so gradients flow through both).
    """
    x, y = random_tensor(x_shape, seed=1, dtype=dtype), random_tensor(y_shape, seed=2, dtype=dtype)
    ax, ahy = op(x), op.adjoint(y)
    assert tuple(ax.shape) == tuple(y_shape) and tuple(ahy.shape) == tuple(x_shape)

    lhs, rhs = inner(ax, y), inner(x, ahy)
    assert abs(lhs) > 0 and abs(lhs - rhs) < rtol * abs(lhs), f"not adjoint: ⟨Ax, y⟩ = {lhs}, ⟨x, Aᴴy⟩ = {rhs}"

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        scale = float(expected.abs().max())
        assert torch.allclose(actual, expected, rtol=rtol, atol=rtol * scale), what

    close(op.H(y), ahy, "A.H does not apply the adjoint")
    close(op.H.H(x), ax, "A.H.H does not apply A")
    close(op.H.adjoint(x), ax, "the adjoint of A.H does not apply A")
    normal = op.adjoint(ax)
    close(op.gram(x), normal, "A.gram is not AᴴA")
    close(op.normal(x), normal, "A.normal is not AᴴA")
    close(op.gram.H(x), normal, "A.gram is not self-adjoint")

    x_leaf, y_leaf = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    (vjp_forward,) = torch.autograd.grad(op(x_leaf), x_leaf, grad_outputs=y)
    (vjp_adjoint,) = torch.autograd.grad(op.adjoint(y_leaf), y_leaf, grad_outputs=x)
    close(vjp_forward, ahy, "autograd through A does not give Aᴴ")
    close(vjp_adjoint, ax, "autograd through Aᴴ does not give A")
