"""Coil sensitivities: ESPIRiT maps and root-sum-of-squares.

Maps are estimated from the fully sampled calibration block ``KSpace.calibration``
``(slices, coils, cy, cx)`` with a square calibration width ``min(cy, cx)`` (or ``calib_width``), by one of
two implementations of the same algorithm:

- ``sigpy`` (the default): ``sigpy.mri.app.EspiritCalib`` slice by slice on the block zero-padded to the k-space
  grid, the reference the torch version is tested against; on a CUDA device it runs through CuPy when CuPy is
  installed, else on the CPU;
- ``torch``: :func:`semrecon_core.physics.espirit.espirit`, all slices at once on the requested device (CPU or
  CUDA); its maps equal sigpy's to ~3e-5 in 0.84 × ``bart ecalib``'s time (``benchmarks/results/espirit.md``).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from semrecon_core.physics.espirit import check_calibration, espirit

if TYPE_CHECKING:
    from semrecon_core.data.kspace import KSpace

log = logging.getLogger(__name__)

EspiritMethod = Literal["torch", "sigpy"]
#: the implementations :func:`espirit_maps` accepts as ``method``
ESPIRIT_METHODS: tuple[EspiritMethod, ...] = ("torch", "sigpy")


def espirit_maps(
    kspace: KSpace,
    *,
    calib_width: int | None = None,
    kernel_width: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
    device: str | torch.device = "cpu",
    method: EspiritMethod = "sigpy",
) -> torch.Tensor:
    """ESPIRiT coil sensitivities (one set of maps) for every slice of ``kspace``.

    Args:
        kspace: the scan; its ``calibration`` block ``(slices, coils, cy, cx)`` is used.
        calib_width: side of the square calibration region; default ``min(cy, cx)``.
        kernel_width: ESPIRiT kernel size (sigpy default 6).
        threshold: singular-value threshold of the calibration matrix (sigpy default 0.02).
        crop: eigenvalue threshold below which maps are set to zero (sigpy default 0.95).
        device: where the maps are computed: ``cpu`` or a CUDA device (for ``sigpy``: through CuPy when
            installed, else on the CPU).
        method: ``torch`` (batched, :mod:`semrecon_core.physics.espirit`) or ``sigpy`` (the reference).

    Returns:
        complex64 maps ``(slices, coils, ky, kx)`` on the CPU, the size of the k-space grid.

    Raises:
        ValueError: when the calibration block is smaller than the kernel, its shape does not match the
            k-space (slices, coils) or is larger than the grid, it contains NaN/Inf or a slice of zeros, or
            ``method`` is unknown.
    """
    if method not in ESPIRIT_METHODS:
        raise ValueError(f"ESPIRiT method {method!r}: expected one of {', '.join(ESPIRIT_METHODS)}")
    slices, coils, ny, nx = kspace.shape
    calib = kspace.calibration
    name = kspace.source or "k-space"
    if calib.ndim != 4 or tuple(calib.shape[:2]) != (slices, coils):
        raise ValueError(f"{name}: calibration expected shape ({slices}, {coils}, cy, cx), found {tuple(calib.shape)}")
    width = check_calibration(calib, (ny, nx), calib_width=calib_width, kernel_width=kernel_width, name=name)
    empty = (calib.reshape(slices, -1) == 0).all(dim=1).nonzero()
    if len(empty):
        raise ValueError(f"{name}: calibration data of slice {int(empty[0])} are all zero")
    if method == "sigpy":
        return _sigpy_maps(
            kspace, width=width, kernel_width=kernel_width, threshold=threshold, crop=crop, device=device
        )
    result = espirit(
        calib.to(device), (ny, nx), calib_width=width, kernel_width=kernel_width, threshold=threshold, crop=crop
    )
    return result.maps.cpu()


def _sigpy_maps(
    kspace: KSpace, *, width: int, kernel_width: int, threshold: float, crop: float, device: str | torch.device
) -> torch.Tensor:
    """ESPIRiT through ``sigpy.mri.app.EspiritCalib``, slice by slice on the zero-padded block (CPU maps)."""
    from sigpy.mri.app import EspiritCalib

    slices, coils, ny, nx = kspace.shape
    calib = kspace.calibration.cpu()
    cy, cx = int(calib.shape[-2]), int(calib.shape[-1])
    sp_device, xp = _sigpy_device(device)
    maps = np.zeros((slices, coils, ny, nx), dtype=np.complex64)
    start_y, start_x = ny // 2 - cy // 2, nx // 2 - cx // 2
    for s in range(slices):
        grid = np.zeros((coils, ny, nx), dtype=np.complex64)
        grid[:, start_y : start_y + cy, start_x : start_x + cx] = calib[s].numpy()
        app = EspiritCalib(
            xp.asarray(grid),
            calib_width=width,
            thresh=threshold,
            kernel_width=kernel_width,
            crop=crop,
            device=sp_device,
            show_pbar=False,
        )
        result = app.run()
        maps[s] = result.get() if hasattr(result, "get") else result
    return torch.from_numpy(maps)


def rss(coil_images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root-sum-of-squares over the coil axis (default ``-3`` of ``(slices, coils, y, x)``)."""
    return coil_images.abs().square().sum(dim=dim).sqrt()


def _sigpy_device(device: str | torch.device) -> tuple[Any, ModuleType]:
    """The sigpy device and array module: CuPy on CUDA when installed, else NumPy on the CPU."""
    import sigpy as sp

    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        try:
            import cupy
        except ImportError:
            log.info("CuPy is not installed: ESPIRiT calibration runs on the CPU")
        else:
            return sp.Device(torch_device.index or 0), cupy
    return sp.cpu_device, np
