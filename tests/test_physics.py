"""Physics: FFT, every linear operator (adjointness, composition, gram, autograd), masks, ESPIRiT."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from semrecon_core.data.kspace import KSpace
from semrecon_core.physics.coils import espirit_maps, rss
from semrecon_core.physics.fft import fft2c, ifft2c
from semrecon_core.physics.linop import FFTOp, GradientOp, LinearOperator, MaskOp, SensitivityOp
from semrecon_core.physics.masks import MASK_KINDS, sampling_mask
from semrecon_core.physics.sense import SenseOp
from tests.helpers import brain_scan, check_linear_operator, phantom_scan, random_tensor

# --- FFT and linear operators -------------------------------------------------------------------


def test_fft_is_unitary_and_centred() -> None:
    x = random_tensor((2, 16, 12))
    k = fft2c(x)
    assert torch.allclose(ifft2c(k), x, atol=1e-5)
    assert torch.allclose(k.norm(), x.norm(), rtol=1e-5)
    delta = torch.zeros(16, 12, dtype=torch.complex64)
    delta[8, 6] = 1.0  # the image centre maps to a flat, real, positive k-space
    assert torch.allclose(fft2c(delta), torch.full((16, 12), 1 / np.sqrt(16 * 12), dtype=torch.complex64))


def _maps() -> torch.Tensor:
    return random_tensor((2, 4, 16, 12), seed=3)


def _mask() -> torch.Tensor:
    return sampling_mask("random", (16, 12), 2, acs_width=4, seed=3)[None].expand(2, -1, -1)


IMAGE, KSPACE = (2, 16, 12), (2, 4, 16, 12)
OPERATORS: dict[str, tuple[Callable[[], LinearOperator], tuple[int, ...], tuple[int, ...]]] = {
    "fft": (FFTOp, KSPACE, KSPACE),
    "mask": (lambda: MaskOp(_mask().unsqueeze(-3)), KSPACE, KSPACE),
    "coils": (lambda: SensitivityOp(_maps()), IMAGE, KSPACE),
    "gradient": (GradientOp, IMAGE, (2, 2, 16, 12)),
    "sense": (lambda: SenseOp(_maps(), _mask()), IMAGE, KSPACE),
    "sense adjoint": (lambda: SenseOp(_maps(), _mask()).H, KSPACE, IMAGE),
    "sense gram": (lambda: SenseOp(_maps(), _mask()).gram, IMAGE, IMAGE),
    "fft @ gradient": (lambda: FFTOp() @ GradientOp(), IMAGE, (2, 2, 16, 12)),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_linear_operator(name: str) -> None:
    build, x_shape, y_shape = OPERATORS[name]
    check_linear_operator(build(), x_shape, y_shape)


def test_sense_operator_is_mask_fft_coils_with_buffers_that_move() -> None:
    maps, mask = _maps(), _mask()
    op = SenseOp(maps, mask)
    x = random_tensor(IMAGE, seed=4)
    composed = MaskOp(mask.unsqueeze(-3)) @ FFTOp() @ SensitivityOp(maps)
    assert torch.equal(op(x), composed(x))
    assert torch.equal(op.maps, maps) and torch.equal(op.mask, mask)
    op.to("meta")
    assert op.maps.device.type == "meta" and op.mask.device.type == "meta"


def test_sense_operator_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="coil maps"):
        SenseOp(random_tensor((4, 16, 12)), torch.ones(1, 16, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        SenseOp(random_tensor((1, 4, 16, 12)), torch.ones(1, 12, 16, dtype=torch.bool))


def test_gradient_norm_is_below_its_bound() -> None:
    norm = GradientOp().operator_norm(torch.zeros(1, 32, 32, dtype=torch.complex64), iterations=100, seed=7)
    assert 7.9 < norm**2 <= GradientOp.NORM_SQUARED


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
    scan = brain_scan(shared_data)
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
