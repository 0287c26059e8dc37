"""Physics: FFT, SENSE operator adjointness, TV gradient adjointness, CG (incl. autograd), masks, ESPIRiT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semrecon_core.data.kspace import Geometry, KSpace
from semrecon_core.physics.cg import conjugate_gradient
from semrecon_core.physics.coils import espirit_maps, rss
from semrecon_core.physics.fft import fft2c, ifft2c
from semrecon_core.physics.masks import MASK_KINDS, sampling_mask
from semrecon_core.physics.sense import SenseOp
from semrecon_core.priors.tv import gradient, gradient_adjoint


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    return complex((a.conj() * b).sum())


def phantom_scan(n: int = 64, coils: int = 8, acceleration: float = 1.0, acs: int = 24) -> tuple[KSpace, torch.Tensor]:
    """A Shepp-Logan phantom with birdcage coils and a smooth phase, sampled with a gaussian 1-D mask."""
    import sigpy.mri

    image = np.abs(sigpy.shepp_logan((n, n))).astype(np.complex64)
    yy, xx = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    image = image * np.exp(1j * (0.8 * xx + 0.4 * yy**2)).astype(np.complex64)
    maps = sigpy.mri.birdcage_maps((coils, n, n)).astype(np.complex64)
    full = fft2c(torch.from_numpy(maps * image))[None]
    mask = sampling_mask("gaussian", (n, n), acceleration, acs, seed=1)[None] if acceleration > 1 else None
    mask = torch.ones(1, n, n, dtype=torch.bool) if mask is None else mask
    start = n // 2 - acs // 2
    scan = KSpace(
        data=full * mask.unsqueeze(1),
        mask=mask,
        calibration=full[:, :, start : start + acs, :].clone(),
        geometry=Geometry((n, n, 1), (n, n, 1), (200.0, 200.0, 5.0), (200.0, 200.0, 5.0)),
        ground_truth=torch.from_numpy(image)[None],
        source="phantom",
    )
    return scan, torch.from_numpy(maps)[None]


# --- FFT and SENSE -------------------------------------------------------------------------------


def test_fft_is_unitary_and_centred() -> None:
    x = _randn(2, 16, 12)
    k = fft2c(x)
    assert torch.allclose(ifft2c(k), x, atol=1e-5)
    assert torch.allclose(k.norm(), x.norm(), rtol=1e-5)
    delta = torch.zeros(16, 12, dtype=torch.complex64)
    delta[8, 6] = 1.0  # the image centre maps to a flat, real, positive k-space
    assert torch.allclose(fft2c(delta), torch.full((16, 12), 1 / np.sqrt(16 * 12), dtype=torch.complex64))


def test_sense_operator_is_adjoint_and_normal() -> None:
    maps = _randn(2, 4, 16, 12, seed=1)
    mask = sampling_mask("random", (16, 12), 2, acs_width=4, seed=3)[None].expand(2, -1, -1)
    op = SenseOp(maps, mask)
    x, y = _randn(2, 16, 12, seed=2), _randn(2, 4, 16, 12, seed=4)
    lhs, rhs = _inner(op(x), y), _inner(x, op.adjoint(y))
    assert abs(lhs - rhs) < 1e-4 * abs(lhs)
    assert torch.allclose(op.normal(x), op.adjoint(op(x)), atol=1e-4)


def test_sense_operator_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="coil maps"):
        SenseOp(_randn(4, 16, 12), torch.ones(1, 16, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        SenseOp(_randn(1, 4, 16, 12), torch.ones(1, 12, 16, dtype=torch.bool))


def test_tv_gradient_is_adjoint_with_norm_below_8() -> None:
    x, w = _randn(2, 9, 7, seed=5), _randn(2, 2, 9, 7, seed=6)
    lhs, rhs = _inner(gradient(x), w), _inner(x, gradient_adjoint(w))
    assert abs(lhs - rhs) < 1e-4 * abs(lhs)
    v = _randn(1, 32, 32, seed=7)
    for _ in range(100):  # power iteration on ∇ᴴ∇
        v = gradient_adjoint(gradient(v))
        v = v / v.norm()
    assert float(gradient(v).norm() ** 2) <= 8.0


# --- conjugate gradient --------------------------------------------------------------------------


def _spd_system(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b = _randn(n, n, seed=8, dtype=dtype)
    matrix = b.conj().T @ b + 0.1 * torch.eye(n, dtype=dtype)
    return matrix, _randn(1, n, seed=9, dtype=dtype)


def test_cg_solves_known_spd_system() -> None:
    matrix, rhs = _spd_system(12, torch.complex128)
    lam = 0.3
    x = conjugate_gradient(lambda v: v @ matrix.T, rhs, lam=lam, max_iter=100, tol=1e-12)
    expected = torch.linalg.solve(matrix + lam * torch.eye(12, dtype=matrix.dtype), rhs[0])
    assert torch.allclose(x[0], expected, atol=1e-9)
    residuals: list[float] = []
    conjugate_gradient(lambda v: v @ matrix.T, rhs, max_iter=5, callback=lambda i, x, r: residuals.append(float(r)))
    assert len(residuals) == 5 and residuals[-1] < residuals[0]


def test_cg_gradients_flow_to_rhs_and_lambda() -> None:
    matrix, rhs = _spd_system(4, torch.complex128)
    rhs = rhs.clone().requires_grad_(True)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def solve(b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conjugate_gradient(lambda v: v @ matrix.T, b, lam=weight, max_iter=4, tol=0.0)

    assert torch.autograd.gradcheck(solve, (rhs, lam), eps=1e-6, atol=1e-5)


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks_have_requested_acceleration_and_acs(kind: str) -> None:
    shape, accel, acs = ((128, 112) if kind == "poisson" else (180, 230)), 4.0, 24
    mask = sampling_mask(kind, shape, accel, acs_width=acs, seed=3)
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    achieved = mask.numel() / int(mask.sum())
    assert abs(achieved - accel) / accel < (0.1 if kind == "poisson" else 0.01)
    start = shape[0] // 2 - acs // 2
    if kind == "poisson":
        start_x = shape[1] // 2 - acs // 2
        assert mask[start : start + acs, start_x : start_x + acs].all()
    else:
        assert mask[start : start + acs].all()
        assert (mask == mask[:, :1]).all(), "1-D masks sample whole ky lines"
    assert torch.equal(mask, sampling_mask(kind, shape, accel, acs_width=acs, seed=3))
    assert not torch.equal(mask, sampling_mask(kind, shape, accel, acs_width=acs, seed=4))


def test_equispaced_lines_are_evenly_spaced_outside_acs() -> None:
    lines = torch.nonzero(sampling_mask("equispaced", (200, 8), 5, acs_width=10)[:, 0]).flatten()
    outside = lines[(lines < 95) | (lines >= 105)]
    gaps = torch.diff(outside[outside < 95])
    assert int(gaps.max()) - int(gaps.min()) <= 1


def test_gaussian_mask_is_denser_near_the_centre() -> None:
    lines = sampling_mask("gaussian", (320, 4), 6, acs_width=24)[:, 0].float()
    assert lines[120:200].mean() > 2 * torch.cat((lines[:40], lines[-40:])).mean()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("spiral", (64, 64), 4), "kind"),
        (("random", (64, 64), 0.5), "R >= 1"),
        (("random", (64, 64), 4, 80), "do not fit"),
        (("random", (64, 64), 4, 20), "exceed"),
        (("random", (64, 0), 4), "shape"),
        (("random", (64, 64), 4, -1), "acs_width"),
    ],
)
def test_masks_reject_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sampling_mask(*args)


# --- coil maps -----------------------------------------------------------------------------------


def test_espirit_maps_match_simulated_coils() -> None:
    scan, true_maps = phantom_scan(acceleration=3.0, acs=16)
    maps = espirit_maps(scan)
    assert maps.dtype == torch.complex64 and maps.shape == scan.shape
    inside = scan.ground_truth.abs()[0] > 0.05
    # Maps are unique up to a per-pixel phase: compare the coil-space direction.
    overlap = (maps[0].conj() * true_maps[0]).sum(0).abs()
    cosine = overlap / (maps[0].abs().square().sum(0).sqrt() * true_maps[0].abs().square().sum(0).sqrt())
    assert float(cosine[inside].median()) > 0.99
    # Combining fully sampled coil images with the maps recovers the magnitude (maps have unit norm).
    coil_images = true_maps * scan.ground_truth.unsqueeze(1)
    combined = (maps.conj() * coil_images).sum(1).abs()
    error = (combined - rss(coil_images))[0][inside].abs().mean() / rss(coil_images)[0][inside].mean()
    assert float(error) < 0.02


def test_espirit_rejects_calibration_smaller_than_kernel() -> None:
    scan, _ = phantom_scan(n=32, acs=24)
    small = KSpace(
        data=scan.data,
        mask=scan.mask,
        calibration=scan.calibration[:, :, 10:14, :],
        geometry=scan.geometry,
        source="tiny-acs.h5",
    )
    with pytest.raises(ValueError, match=r"tiny-acs.h5: calibration region 4×32 .* smaller than the ESPIRiT"):
        espirit_maps(small)
    with pytest.raises(ValueError, match="calib_width 30 exceeds"):
        espirit_maps(scan, calib_width=30)


def test_espirit_on_real_brain_calibration(shared_data) -> None:
    full = torch.from_numpy(np.load(shared_data / "brain_t1_8coil" / "kspace.npy")).permute(0, 2, 1)[None]
    start = full.shape[-2] // 2 - 12
    scan = KSpace(
        data=full,
        mask=torch.ones(1, *full.shape[-2:], dtype=torch.bool),
        calibration=full[:, :, start : start + 24, :].contiguous(),
        geometry=Geometry((230, 180, 1), (230, 180, 1), (230.0, 180.0, 5.0), (230.0, 180.0, 5.0)),
    )
    maps = espirit_maps(scan)
    norms = maps.abs().square().sum(1).sqrt()[0]
    support = norms > 0
    assert 0.4 < float(support.float().mean()) < 0.95  # the head, not the background
    assert torch.allclose(norms[support], torch.ones(()), atol=0.05)


@pytest.mark.cuda
def test_espirit_on_cuda_matches_cpu() -> None:
    scan, _ = phantom_scan(n=48, acs=16)
    cpu = espirit_maps(scan)
    gpu = espirit_maps(scan, device="cuda")
    assert gpu.device.type == "cpu" and gpu.dtype == torch.complex64
    assert float((gpu - cpu).abs().max()) < 1e-3
