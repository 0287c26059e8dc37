"""Metrics: PSNR, SSIM, Tenengrad against known values and independent implementations; LPIPS availability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semrecon_core import metrics


def _image(seed: int = 0, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blob = np.exp(-((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2) / 150.0)
    return blob + 0.05 * rng.random(shape)


def test_psnr_known_value_and_normalisation() -> None:
    ref = _image() + 0.1  # positive everywhere, so the magnitude keeps the ±1 % error
    peak = ref.max()
    noisy = ref + 0.01 * peak * np.where(np.indices(ref.shape).sum(0) % 2 == 0, 1.0, -1.0)
    assert metrics.psnr(ref, noisy) == pytest.approx(40.0, abs=1e-6)  # MSE = 1e-4 of a unit peak
    # Normalised to the reference max: scaling both by the same factor changes nothing.
    assert metrics.psnr(5 * ref, 5 * noisy) == pytest.approx(40.0, abs=1e-6)
    assert metrics.psnr(ref, ref) > 200


def test_psnr_and_ssim_match_scikit_image_and_accept_complex_tensors() -> None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref, img = _image(0), _image(1)
    phase = np.exp(1j * np.linspace(0, 3, ref.size)).reshape(ref.shape)
    ref_c = torch.from_numpy(ref * phase).to(torch.complex64)[None]
    img_c = torch.from_numpy(img * phase).to(torch.complex64)[None]
    expected_psnr = peak_signal_noise_ratio(ref / ref.max(), img / ref.max(), data_range=1.0)
    expected_ssim = structural_similarity(ref / ref.max(), img / ref.max(), data_range=1.0)
    assert metrics.psnr(ref_c, img_c) == pytest.approx(expected_psnr, abs=1e-3)
    assert metrics.ssim(ref_c, img_c) == pytest.approx(expected_ssim, abs=1e-4)
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)
    assert metrics.ssim(ref, img) < 0.99


def test_multislice_metrics_are_slice_means() -> None:
    ref = np.stack([_image(0), _image(2)])
    img = np.stack([_image(1), _image(3)])
    per_slice = [metrics.psnr(ref[i], img[i]) for i in range(2)]
    assert metrics.psnr(ref, img) == pytest.approx(np.mean(per_slice))


def test_tenengrad_prefers_sharp_images() -> None:
    from scipy.ndimage import gaussian_filter

    sharp = np.zeros((40, 40))
    sharp[10:30, 10:30] = 1.0
    blurred = gaussian_filter(sharp, 2.0)
    assert metrics.tenengrad(sharp) > 2 * metrics.tenengrad(blurred)
    assert metrics.tenengrad(np.full((16, 16), 3.0)) == pytest.approx(0.0)
    assert metrics.tenengrad(10 * sharp) == pytest.approx(metrics.tenengrad(sharp))  # normalised


@pytest.mark.parametrize(
    ("reference", "image", "message"),
    [
        (np.ones((8, 8)), np.ones((8, 9)), "shape"),
        (np.zeros((8, 8)), np.ones((8, 8)), "all zero"),
        (np.ones((8, 8)), np.full((8, 8), np.nan), "NaN"),
        (np.ones(8), np.ones(8), "expected a"),
    ],
)
def test_metrics_reject_bad_input(reference: np.ndarray, image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.psnr(reference, image)


def test_lpips_without_weights_names_the_missing_file(tmp_path) -> None:
    with pytest.raises(metrics.LPIPSUnavailable, match=str(tmp_path / "checkpoints")):
        metrics.lpips(_image(0), _image(1), weights=tmp_path)


def test_lpips_orders_degradations() -> None:
    from scipy.ndimage import gaussian_filter

    ref = _image(0, (64, 64))
    try:
        slight = metrics.lpips(ref, gaussian_filter(ref, 0.5))
    except metrics.LPIPSUnavailable as exc:
        pytest.skip(str(exc))
    assert slight < metrics.lpips(ref, gaussian_filter(ref, 3.0))
    assert metrics.lpips(ref, ref) == pytest.approx(0.0, abs=1e-6)
