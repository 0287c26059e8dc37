"""Image-quality metrics on magnitude images: PSNR, SSIM, HaarPSI, VIF, Tenengrad, near-Nyquist energy and LPIPS.

Inputs are magnitude (or complex, whose magnitude is taken) ``(slices, y, x)`` or ``(y, x)`` NumPy
arrays or torch tensors. Full-reference metrics divide both images by the reference's maximum (per slice), so
the data range is 1 and the image must be in the reference's units. Multi-slice inputs give the
mean over slices.

HaarPSI (Reisenhofer et al. 2018) and VIF in the pixel domain (VIF-p, Sheikh & Bovik 2006) need no
learned weights. Both are written here in NumPy from their papers: piq 0.8.0 implements them too, but it
declares torchvision as a dependency, and installing it pulls a torchvision that needs another torch build
(torch 2.14.1 with CUDA in place of the pinned 2.13.0 CPU wheel). Their constants are for a 0–255 scale
(HaarPSI C = 30, alpha = 4.2; VIF σ_n² = 2), so both map the normalised images to 0–255 after clamping the
image into the reference's range [0, 1] (an overshoot above the reference's maximum is scored as the maximum).
``tests/test_metrics.py`` checks them against the authors' HaarPSI code and sewar's ``vifp`` on knee slices.

LPIPS (Zhang et al. 2018) runs through the maintained ``lpips`` package (AlexNet backbone), which needs
torchvision and AlexNet weights in a local torch hub cache; nothing is downloaded. When either is
missing :class:`LPIPSUnavailable` says what to install or where to put the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

# torchvision's AlexNet checkpoint, looked up in <torch hub dir>/checkpoints/.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot run here: the ``lpips`` package, torchvision or the backbone weights are missing."""


def _magnitude(image: ArrayLike, name: str) -> np.ndarray:
    """``(slices, y, x)`` float64 magnitude of a 2-D or 3-D array or tensor."""
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu").numpy()
    array = np.abs(np.asarray(image)).astype(np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a (slices, y, x) or (y, x) image, found shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or Inf values")
    return array


def _normalised_pair(reference: ArrayLike, image: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ref = _magnitude(reference, "reference")
    img = _magnitude(image, "image")
    if ref.shape != img.shape:
        raise ValueError(f"image: expected the reference's shape {ref.shape}, found {img.shape}")
    peak = ref.max(axis=(-2, -1), keepdims=True)
    if not (peak > 0).all():
        raise ValueError("reference: a slice is all zero, cannot normalise to its maximum")
    return ref / peak, img / peak


def psnr(reference: ArrayLike, image: ArrayLike) -> float:
    """Peak signal-to-noise ratio in dB (data range 1 after normalising to the reference max)."""
    ref, img = _normalised_pair(reference, image)
    mse = ((ref - img) ** 2).mean(axis=(-2, -1))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-30))))


def ssim(reference: ArrayLike, image: ArrayLike) -> float:
    """Structural similarity (scikit-image ``structural_similarity``, data range 1), mean over slices."""
    from skimage.metrics import structural_similarity

    ref, img = _normalised_pair(reference, image)
    values = [structural_similarity(r, i, data_range=1.0) for r, i in zip(ref, img, strict=True)]
    return float(np.mean(values))


def haarpsi(reference: ArrayLike, image: ArrayLike) -> float:
    """HaarPSI perceptual similarity in [0, 1] (1: identical), grey-scale, mean over slices.

    As the authors' reference code (Reisenhofer et al. 2018; MATLAB ``HaarPSI.m``, its Python port
    ``haarPsi.py``), with its default preprocessing: both images on a 0–255 scale (the reference / its max,
    the image clamped into [0, 1] first), a 2 × 2 mean filter and dyadic subsampling, three scales of Haar
    filters, C = 30, alpha = 4.2. Convolutions are MATLAB's ``conv2(..., 'same')`` (zero padding).
    """
    ref, img = _normalised_pair(reference, image)
    img = np.clip(img, 0.0, 1.0)
    return float(np.mean([_haarpsi_plane(255 * r, 255 * i) for r, i in zip(ref, img, strict=True)]))


def vif(reference: ArrayLike, image: ArrayLike) -> float:
    """Visual information fidelity in the pixel domain (VIF-p), mean over slices; 1 for identical images.

    Sheikh & Bovik 2006, the pixel-domain version of their MATLAB ``vifvec``: four scales of Gaussian windows
    (17, 9, 5, 3 pixels, σ = size / 5, 'valid' filtering, subsampling by 2 between scales), noise variance
    σ_n² = 2 on a 0–255 scale (the reference / its max, the image clamped into [0, 1] first). The ratio of the
    information the image keeps to the reference's; above 1 only for a contrast enhancement.
    """
    ref, img = _normalised_pair(reference, image)
    img = np.clip(img, 0.0, 1.0)
    return float(np.mean([_vif_plane(255 * r, 255 * i) for r, i in zip(ref, img, strict=True)]))


def _conv2_same(plane: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """MATLAB's ``conv2(plane, kernel, 'same')``: the full convolution's centre, offset ``kernel size // 2``."""
    from scipy.signal import convolve2d

    full = convolve2d(plane, kernel, mode="full")
    top, left = kernel.shape[0] // 2, kernel.shape[1] // 2
    return full[top : top + plane.shape[0], left : left + plane.shape[1]]


def _haarpsi_plane(ref: np.ndarray, img: np.ndarray, c: float = 30.0, alpha: float = 4.2) -> float:
    """HaarPSI of one pair of 2-D images on a 0–255 scale."""
    mean2 = np.full((2, 2), 0.25)
    ref, img = _conv2_same(ref, mean2)[::2, ::2], _conv2_same(img, mean2)[::2, ::2]
    similarities, weights = [], []
    for transpose in (False, True):  # horizontal then vertical Haar filters
        coefficients = []
        for scale in (1, 2, 3):
            size = 2**scale
            kernel = np.full((size, size), 2.0**-scale)
            kernel[: size // 2] *= -1
            if transpose:
                kernel = kernel.T
            coefficients.append((np.abs(_conv2_same(ref, kernel)), np.abs(_conv2_same(img, kernel))))
        # Local similarity from the two finest scales, its weight from the coarsest.
        similarities.append(np.mean([(2 * r * i + c) / (r**2 + i**2 + c) for r, i in coefficients[:2]], axis=0))
        weights.append(np.maximum(*coefficients[2]))
    similarity, weight = np.stack(similarities), np.stack(weights)
    pooled = np.sum(weight / (1 + np.exp(-alpha * similarity))) / weight.sum()
    return float((np.log(pooled / (1 - pooled)) / alpha) ** 2)


def _gaussian_window(size: int) -> np.ndarray:
    """MATLAB's ``fspecial('gaussian', size, size / 5)`` as a 1-D factor (the window is its outer product)."""
    x = np.arange(size) - (size - 1) / 2
    window = np.exp(-(x**2) / (2 * (size / 5) ** 2))
    return window / window.sum()


def _filter_valid(plane: np.ndarray, window: np.ndarray) -> np.ndarray:
    """MATLAB's ``filter2(w ⊗ w, plane, 'valid')`` for a symmetric separable window ``w``."""
    from scipy.ndimage import correlate1d

    half = (window.size - 1) // 2
    filtered = correlate1d(correlate1d(plane, window, axis=0), window, axis=1)
    return filtered[half : plane.shape[0] - half, half : plane.shape[1] - half]


def _vif_plane(ref: np.ndarray, img: np.ndarray, sigma_n_sq: float = 2.0, eps: float = 1e-10) -> float:
    """VIF-p of one pair of 2-D images on a 0–255 scale."""
    numerator = denominator = 0.0
    for scale in range(4):
        window = _gaussian_window(2 ** (4 - scale) + 1)
        if scale > 0:
            ref, img = _filter_valid(ref, window)[::2, ::2], _filter_valid(img, window)[::2, ::2]
        mu_ref, mu_img = _filter_valid(ref, window), _filter_valid(img, window)
        var_ref = np.maximum(_filter_valid(ref * ref, window) - mu_ref**2, 0.0)
        var_img = np.maximum(_filter_valid(img * img, window) - mu_img**2, 0.0)
        cov = _filter_valid(ref * img, window) - mu_ref * mu_img
        # The distortion channel image = gain · reference + noise of variance sv_sq, fitted locally.
        gain = cov / (var_ref + eps)
        sv_sq = var_img - gain * cov
        flat_ref = var_ref < eps
        gain[flat_ref], sv_sq[flat_ref], var_ref[flat_ref] = 0.0, var_img[flat_ref], 0.0
        flat_img = var_img < eps
        gain[flat_img], sv_sq[flat_img] = 0.0, 0.0
        negative = gain < 0
        sv_sq[negative], gain[negative] = var_img[negative], 0.0
        sv_sq = np.maximum(sv_sq, eps)
        numerator += np.sum(np.log10(1 + gain**2 * var_ref / (sv_sq + sigma_n_sq)))
        denominator += np.sum(np.log10(1 + var_ref / sigma_n_sq))
    if denominator == 0:
        raise ValueError("reference: a slice is constant, it carries no information and VIF is undefined")
    return float(numerator / denominator)


def tenengrad(image: ArrayLike) -> float:
    """Tenengrad sharpness (Krotkov 1988): mean squared Sobel gradient magnitude of the image / its max."""
    from scipy.ndimage import sobel

    array = _magnitude(image, "image")
    values = []
    for plane in array:
        peak = plane.max()
        if peak <= 0:
            raise ValueError("image: a slice is all zero, Tenengrad is undefined")
        plane = plane / peak
        values.append(np.mean(sobel(plane, axis=0) ** 2 + sobel(plane, axis=1) ** 2))
    return float(np.mean(values))


NEAR_NYQUIST = 0.75
"""Fraction of the Nyquist frequency above which :func:`near_nyquist_energy` counts the power."""


def near_nyquist_energy(image: ArrayLike, fraction: float = NEAR_NYQUIST) -> float:
    """log10 of the power of the image / its max at spatial frequencies above ``fraction`` × Nyquist on either axis.

    The orthonormal 2-D DFT's squared magnitudes are summed over the frequencies (cycles per pixel) whose row or
    column frequency exceeds ``fraction`` × ½; the mean over slices of the log10. Checkerboards and straight
    lines along the pixel grid put power there that anatomy and noise-free smooth images do not.
    """
    array = _magnitude(image, "image")
    rows, cols = (np.abs(np.fft.fftfreq(n)) > fraction * 0.5 for n in array.shape[-2:])
    band = rows[:, None] | cols[None, :]
    values = []
    for plane in array:
        peak = plane.max()
        if peak <= 0:
            raise ValueError("image: a slice is all zero, its near-Nyquist energy is undefined")
        power = np.abs(np.fft.fft2(plane / peak, norm="ortho")) ** 2
        values.append(np.log10(power[band].sum()))
    return float(np.mean(values))


def lpips(reference: ArrayLike, image: ArrayLike, weights: str | os.PathLike | None = None) -> float:
    """LPIPS distance (AlexNet) between magnitude images normalised to the reference max; lower is better.

    Args:
        reference: magnitude ``(slices, y, x)`` or ``(y, x)`` reference image.
        image: magnitude image of the same shape.
        weights: a torch hub directory holding ``checkpoints/alexnet-owt-7be5be79.pth`` (torchvision's
            AlexNet weights); default the torch hub directory (``$TORCH_HOME/hub``).

    Raises:
        LPIPSUnavailable: when ``lpips``/torchvision do not import or the weights file is absent.
    """
    ref, img = _normalised_pair(reference, image)
    hub_dir = Path(weights) if weights is not None else Path(torch.hub.get_dir())
    checkpoint = hub_dir / "checkpoints" / ALEXNET_WEIGHTS
    if not checkpoint.is_file():
        raise LPIPSUnavailable(
            f"LPIPS needs torchvision's AlexNet weights at {checkpoint} (none are downloaded); copy "
            f"{ALEXNET_WEIGHTS} there or pass weights=<torch hub directory>"
        )
    try:
        import lpips as lpips_package
    except Exception as exc:  # torchvision may fail to import with an unmatched torch build
        raise LPIPSUnavailable(
            f"LPIPS needs the 'lpips' package and a torchvision matching torch {torch.__version__} "
            f"(pip install lpips torchvision==<matching version>); import failed: {exc}"
        ) from exc
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub_dir))
    try:
        model = lpips_package.LPIPS(net="alex", verbose=False).eval()
    finally:
        torch.hub.set_dir(previous)
    with torch.inference_mode():
        distances = model(_lpips_input(ref), _lpips_input(img))
    return float(distances.mean())


def _lpips_input(array: np.ndarray) -> torch.Tensor:
    """``(slices, y, x)`` in [0, 1] → ``(slices, 3, y, x)`` float32 in [-1, 1], as LPIPS expects."""
    return torch.from_numpy(2 * array - 1).float()[:, None].repeat(1, 3, 1, 1)
