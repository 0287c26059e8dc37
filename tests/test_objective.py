"""The presets' loss scaling: the authors' formulas literally, and λ that means the same for any slice batch.

The literal re-implementations below follow the authors' ``loss_function.py`` / ``INR_demo.py`` line by line
(unnormalised FFT, ``torch.nn.L1Loss`` on stacked real/imaginary parts, ``compute_TV_loss``), on data in the
authors' units: their k-space is ours times √(ny·nx) (REFERENCE.md §7).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from semrecon_core.engines.objective import data_term
from semrecon_core.engines.unrolled import stage_data_term
from semrecon_core.physics.sense import SenseOp
from semrecon_core.priors.tv import TVPrior
from tests.helpers import random_tensor

SLICES, COILS, NY, NX = 1, 4, 16, 12


@pytest.fixture
def scan() -> tuple[SenseOp, torch.Tensor, torch.Tensor]:
    """``(op, measured k-space, image)``: random maps, a random mask, random data (our units)."""
    generator = torch.Generator().manual_seed(0)
    maps = random_tensor((SLICES, COILS, NY, NX), seed=1)
    mask = torch.rand(SLICES, NY, NX, generator=generator) < 0.4
    op = SenseOp(maps, mask)
    measured = op(random_tensor((SLICES, NY, NX), seed=2)) + 0.1 * random_tensor((SLICES, COILS, NY, NX), seed=3)
    return op, measured * mask.unsqueeze(1), random_tensor((SLICES, NY, NX), seed=4)


def _authors_kspace(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``fftshift(fft2(fftshift(img · csm)))`` without normalisation, as ``compute_cost_ksp``."""
    dims = (-1, -2)
    return torch.fft.fftshift(
        torch.fft.fft2(torch.fft.fftshift(image.unsqueeze(1) * maps, dim=dims), dim=dims), dim=dims
    )


def _authors_l1(image: torch.Tensor, op: SenseOp, measured: torch.Tensor, *, sampled: bool) -> torch.Tensor:
    target = measured * math.sqrt(NY * NX)  # the authors' k-space units
    predicted = _authors_kspace(image, op.maps)
    mask = op.mask.unsqueeze(1).expand_as(predicted)
    if sampled:  # INR_demo.py: tensor[SamMask == 1]
        return torch.nn.L1Loss()(torch.view_as_real(predicted[mask]), torch.view_as_real(target[mask]))
    return torch.nn.L1Loss()(torch.view_as_real(predicted * mask), torch.view_as_real(target * mask))


def _authors_tv(image: torch.Tensor) -> torch.Tensor:
    """``compute_TV_loss(x.real) + compute_TV_loss(x.imag)`` of one ``(N1, N2)`` image."""

    def compute_tv_loss(x: torch.Tensor) -> torch.Tensor:
        n1, n2 = x.shape[0], x.shape[1]
        return (
            torch.sum(torch.abs(x[1:, :, :] - x[: n1 - 1, :, :]))
            + torch.sum(torch.abs(x[:, 1:, :] - x[:, : n2 - 1, :]))
        ) / ((n1 - 1) * (n2 - 1))

    plane = image[0].unsqueeze(-1)
    return compute_tv_loss(plane.real) + compute_tv_loss(plane.imag)


def _value_and_gradient(function, image: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = image.clone().requires_grad_(True)
    value = function(x)
    value.backward()
    assert x.grad is not None
    return float(value), x.grad


@pytest.mark.parametrize("sampled", [False, True], ids=["U-Net: whole masked array", "INR: sampled entries"])
def test_public_code_l1_is_the_authors_loss_in_value_and_gradient(scan, sampled: bool) -> None:
    op, measured, image = scan
    reduction = "sampled" if sampled else "whole"
    ours = _value_and_gradient(
        lambda x: data_term(op(x), measured, op.mask, preset="public-code", reduction=reduction), image
    )
    theirs = _value_and_gradient(lambda x: _authors_l1(x, op, measured, sampled=sampled), image)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)


def test_public_code_tv_is_the_authors_tv_in_value_and_gradient(scan) -> None:
    _, _, image = scan
    ours = _value_and_gradient(TVPrior(3.0, scaling="authors").loss, image)
    theirs = _value_and_gradient(lambda x: 3.0 * _authors_tv(x), image)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)


def test_unrolled_data_term_sums_every_stage_output_like_compute_cost_ksp(scan) -> None:
    op, measured, image = scan
    outputs = [image * (k + 1) / 3 for k in range(9)]  # the input, 4 U-Net and 4 data-consistency outputs
    ours = stage_data_term(outputs, op, measured, "public-code")
    theirs = sum(_authors_l1(x, op, measured, sampled=False) for x in outputs)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_paper_data_term_is_the_per_pixel_mean_of_half_the_squared_residual(scan) -> None:
    op, measured, image = scan
    residual = op(image) - measured
    expected = 0.5 * float((residual.abs() ** 2).sum()) / (SLICES * NY * NX)
    assert float(data_term(op(image), measured, op.mask, preset="paper")) == pytest.approx(expected, rel=1e-6)


def test_prior_to_data_gradient_ratio_equals_the_authors(scan) -> None:
    """INR phase 1 at a fixed image: 3·TV against the sampled-entries L1, ours vs the literal formulas."""
    op, measured, image = scan
    data_ours = _value_and_gradient(
        lambda x: data_term(op(x), measured, op.mask, preset="public-code", reduction="sampled"), image
    )[1]
    tv_ours = _value_and_gradient(TVPrior(3.0, scaling="authors").loss, image)[1]
    data_theirs = _value_and_gradient(lambda x: _authors_l1(x, op, measured, sampled=True), image)[1]
    tv_theirs = _value_and_gradient(lambda x: 3.0 * _authors_tv(x), image)[1]
    ours = float(tv_ours.norm() / data_ours.norm())
    theirs = float(tv_theirs.norm() / data_theirs.norm())
    assert ours == pytest.approx(theirs, rel=0.01)


def _ratios(prior_loss, data_function, image: torch.Tensor) -> tuple[float, float]:
    """``(prior/data loss ratio, prior/data gradient-norm ratio)`` at ``image``."""
    prior_value, prior_gradient = _value_and_gradient(prior_loss, image)
    data_value, data_gradient = _value_and_gradient(data_function, image)
    return prior_value / data_value, float(prior_gradient.norm() / data_gradient.norm())


@pytest.mark.parametrize(
    ("preset", "reduction", "scaling"),
    [("paper", "whole", "mean"), ("public-code", "whole", "authors"), ("public-code", "sampled", "authors")],
    ids=["paper", "public-code U-Net/unrolled", "public-code INR"],
)
def test_tv_to_data_balance_does_not_depend_on_the_slice_batch(scan, preset, reduction, scaling) -> None:
    op, measured, image = scan
    copies = 3
    batch_op = SenseOp(op.maps.repeat(copies, 1, 1, 1), op.mask.repeat(copies, 1, 1))
    tv = TVPrior(1.0, scaling=scaling).loss
    alone = _ratios(tv, lambda x: data_term(op(x), measured, op.mask, preset=preset, reduction=reduction), image)
    batch = _ratios(
        tv,
        lambda x: data_term(
            batch_op(x), measured.repeat(copies, 1, 1, 1), batch_op.mask, preset=preset, reduction=reduction
        ),
        image.repeat(copies, 1, 1),
    )
    assert batch[0] == pytest.approx(alone[0], rel=1e-5)
    # the gradient norm of B copies is √B times one copy's for both terms: their ratio is unchanged
    assert batch[1] == pytest.approx(alone[1], rel=1e-5)


@pytest.mark.parametrize("preset", ["paper", "public-code"])
def test_semantic_to_data_balance_does_not_depend_on_the_slice_batch(
    scan, preset: str, tiny_janus_bank: tuple[Path, Path]
) -> None:
    from semrecon_core.encoders.janus import JanusImageEncoder
    from semrecon_core.priors.bank import load_bank
    from semrecon_core.priors.semantic import SemanticPrior

    directory, bank_path = tiny_janus_bank
    encoder = JanusImageEncoder.from_pretrained(str(directory), device="cpu")
    prior = SemanticPrior(encoder, load_bank(bank_path, encoder, device="cpu"), variant=preset)
    op, measured, image = scan
    copies = 2
    batch_op = SenseOp(op.maps.repeat(copies, 1, 1, 1), op.mask.repeat(copies, 1, 1))
    alone = _ratios(prior.loss, lambda x: data_term(op(x), measured, op.mask, preset=preset), image)  # type: ignore[arg-type]
    batch = _ratios(
        prior.loss,
        lambda x: data_term(batch_op(x), measured.repeat(copies, 1, 1, 1), batch_op.mask, preset=preset),  # type: ignore[arg-type]
        image.repeat(copies, 1, 1),
    )
    assert batch[0] == pytest.approx(alone[0], rel=1e-4)
    assert batch[1] == pytest.approx(alone[1], rel=1e-4)
