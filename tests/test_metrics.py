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


# --- HaarPSI and VIF-p ---------------------------------------------------------------------------------------

KNEE_SLICES = ("pd_00", "pd_01")  # ../shared/data/knee_fastmri_rss: 320² fastMRI PD knee RSS images


def _degraded(reference: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A magnitude image degraded by Gaussian noise, Gaussian blur or Cartesian undersampling (R ≈ 3, 24 ACS)."""
    from scipy.ndimage import gaussian_filter

    peak = reference.max()
    if kind in ("noise", "strong noise"):
        sigma = 0.05 if kind == "noise" else 0.15
        return np.abs(reference + sigma * peak * np.random.default_rng(seed).standard_normal(reference.shape))
    if kind in ("blur", "strong blur"):
        return gaussian_filter(reference, 1.5 if kind == "blur" else 3.0)
    if kind == "undersampling":
        nx = reference.shape[1]
        mask = np.zeros(nx, dtype=bool)
        mask[::4] = True
        mask[nx // 2 - 12 : nx // 2 + 12] = True
        kspace = np.fft.fftshift(np.fft.fft2(reference)) * mask[None]
        return np.abs(np.fft.ifft2(np.fft.ifftshift(kspace)))
    raise AssertionError(kind)


def _knee(shared_data, name: str) -> np.ndarray:
    return np.load(shared_data / "knee_fastmri_rss" / f"{name}.npy").astype(np.float64)


# The authors' reference code (github.com/rgcda/haarpsi, haarPsi.py at commit 2c27931, haar_psi_numpy with its
# default subsampling), run outside this project on the reference / its max × 255 and the _degraded image / the
# reference's max, clamped into [0, 1], × 255 (seed 0), for the knee slices above.
HAARPSI_REFERENCE = {
    ("pd_00", "noise"): 0.7082522190,
    ("pd_00", "blur"): 0.8446612514,
    ("pd_00", "undersampling"): 0.4743717853,
    ("pd_01", "noise"): 0.7402067307,
    ("pd_01", "blur"): 0.7513882520,
    ("pd_01", "undersampling"): 0.4571341542,
}


@pytest.mark.parametrize(("name", "kind"), list(HAARPSI_REFERENCE))
def test_haarpsi_matches_the_authors_code_on_knee_slices(shared_data, name: str, kind: str) -> None:
    reference = _knee(shared_data, name)
    assert metrics.haarpsi(reference, _degraded(reference, kind)) == pytest.approx(
        HAARPSI_REFERENCE[name, kind], abs=1e-6
    )


@pytest.mark.parametrize("kind", ["noise", "blur", "undersampling"])
def test_vif_matches_sewar_on_knee_slices(shared_data, kind: str) -> None:
    sewar = pytest.importorskip("sewar.full_ref", reason="sewar (the test extra) is not installed")
    references = np.stack([_knee(shared_data, name) for name in KNEE_SLICES])
    images = np.stack([_degraded(reference, kind) for reference in references])
    expected = []
    for reference, image in zip(references, images, strict=True):
        peak = reference.max()
        expected.append(sewar.vifp(255 * reference / peak, 255 * np.clip(image / peak, 0, 1)))
    assert metrics.vif(references, images) == pytest.approx(np.mean(expected), abs=1e-6)  # the slices' mean
    assert 0.1 < metrics.vif(references, images) < 0.6


@pytest.mark.parametrize("metric", [metrics.haarpsi, metrics.vif])
def test_perceptual_metrics_score_identity_one_and_order_degradations_on_knee(shared_data, metric) -> None:
    reference = _knee(shared_data, KNEE_SLICES[0])
    assert metric(reference, reference) == pytest.approx(1.0, abs=1e-6)
    assert metric(reference, np.zeros_like(reference)) < 0.1  # measured: HaarPSI 0.058, VIF 0
    assert metric(reference, _degraded(reference, "noise")) > 0.25  # a noisy, usable image: HaarPSI 0.71, VIF 0.29
    assert metric(reference, _degraded(reference, "strong noise")) < metric(reference, _degraded(reference, "noise"))
    assert metric(reference, _degraded(reference, "strong blur")) < metric(reference, _degraded(reference, "blur"))


@pytest.mark.parametrize("metric", [metrics.haarpsi, metrics.vif])
def test_perceptual_metrics_without_data(metric) -> None:
    ref = _image(0, (64, 64))
    assert metric(ref, ref) == pytest.approx(1.0, abs=1e-6)
    assert metric(3 * ref, 3 * ref) == pytest.approx(1.0, abs=1e-6)  # normalised to the reference max
    assert metric(ref, np.zeros_like(ref)) < 0.2
    assert metric(ref, _degraded(ref, "strong noise")) < metric(ref, _degraded(ref, "noise")) < 1
    # The image is clamped into the reference's range: an overshoot scores as the reference's maximum.
    assert metric(ref, 2 * ref) == pytest.approx(metric(ref, np.minimum(2 * ref, ref.max())), abs=1e-12)
    stack = np.stack([ref, _image(2, (64, 64))])
    noisy = np.stack([_degraded(plane, "noise") for plane in stack])
    assert metric(stack, noisy) == pytest.approx(np.mean([metric(r, i) for r, i in zip(stack, noisy, strict=True)]))
