"""Image-quality metrics on magnitude images: PSNR, SSIM, Tenengrad and LPIPS.

Inputs are magnitude (or complex, whose magnitude is taken) ``(slices, y, x)`` or ``(y, x)`` NumPy
arrays or torch tensors. Full-reference metrics divide both images by the reference's maximum (per slice), so
the data range is 1 and the image must be in the reference's units. Multi-slice inputs give the
mean over slices.

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
