"""Simulated multicoil scans from magnitude images, in memory or as realistic ISMRMRD raw files.

A magnitude image gets a smooth synthetic phase and birdcage coil sensitivities (``sigpy.mri.birdcage_maps``,
normalised to unit root-sum-of-squares), is Fourier transformed (centred, orthonormal), receives
correlated complex Gaussian coil noise and is undersampled with
:func:`semrecon_core.physics.masks.sampling_mask`.

:func:`write_ismrmrd_raw` (behind ``semrecon simulate OUT.h5``) writes the scan as a scanner would: a
schema-valid ISMRMRD XML header without ``<version>`` (libismrmrd refuses a version other than its own when
it re-serializes the header, as Gadgetron does for every ``<external>`` node) with encoded/recon spaces,
encoding limits and the parallel-imaging block, an optional noise scan, optional 2× readout oversampling,
several slices along the slice normal, acquisition flags (first/last in slice, last in repetition/measurement,
calibration flags) and the ground truth in ``dataset/ground_truth``, inside the ISMRMRD group as
ismrmrd-tools keeps its ``phantom`` (readers that open a file's last group, such as mrpro, find the scan).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from semrecon_core.data.kspace import KSpace

DWELL_TIME_US = 5.0
RECEIVER_NOISE_BANDWIDTH = 0.793
NOISE_SCAN_LINES = 16
#: zeros added on each side of both axes of a simulated image, as a fraction of its side (:func:`place_in_fov`)
FOV_MARGIN = 1 / 16
LINE_MASK_KINDS = ("equispaced", "random", "gaussian")
#: the ISMRMRD group of simulated files; it also holds the ground truth (``ground_truth``)
GROUP = "dataset"


def builtin_anatomy(shape: tuple[int, int], slices: int = 1) -> np.ndarray:
    """Shepp–Logan magnitude phantoms ``(slices, y, x)`` in [0, 1], smaller towards the outer slices."""
    import sigpy

    ny, nx = shape
    out = np.zeros((slices, ny, nx), dtype=np.float32)
    for s in range(slices):
        shrink = 1.0 - 0.08 * abs(s - (slices - 1) / 2)
        py, px = max(int(ny * shrink), 8), max(int(nx * shrink), 8)
        phantom = np.abs(sigpy.shepp_logan((py, px))).astype(np.float32)
        top, left = (ny - py) // 2, (nx - px) // 2
        out[s, top : top + py, left : left + px] = phantom
    return out / out.max()


def place_in_fov(images: np.ndarray, margin: float = FOV_MARGIN) -> np.ndarray:
    """``(slices, y, x)`` images zero-padded by ``round(margin · side)`` pixels on each side of both axes.

    A scan's field of view is prescribed to hold the object. Images cropped to the anatomy (the fastMRI knee
    slices are such crops) put the object against every edge; multiplied by coil sensitivities that are not
    periodic across the field of view, each coil image then jumps at the border, which no smooth sensitivity
    estimated from the k-space centre (ESPIRiT, in semrecon, sigpy or BART) can follow. On a 160² PD knee slice
    (15 coils, R = 4, 20 ACS lines) CG-SENSE with ESPIRiT maps was 5 dB *below* zero-filled without a margin and
    above it with one (``benchmarks/results/fair_cases.md``, ``benchmarks/bench_fair_cases.py``).
    """
    if not 0 <= margin <= 1:
        raise ValueError(f"fov_margin: expected a fraction of the image side in [0, 1], found {margin!r}")
    _, ny, nx = images.shape
    pad_y, pad_x = round(margin * ny), round(margin * nx)
    return np.pad(images, ((0, 0), (pad_y, pad_y), (pad_x, pad_x)))


def coil_maps(coils: int, shape: tuple[int, int]) -> np.ndarray:
    """Birdcage sensitivities ``(coils, y, x)`` normalised to unit root-sum-of-squares."""
    import sigpy.mri

    maps = sigpy.mri.birdcage_maps((coils, *shape), r=1.5).astype(np.complex64)
    return maps / np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator, amplitude: float = np.pi / 2) -> np.ndarray:
    """A smooth random phase map (2nd-order polynomial), radians, ``(y, x)``."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    terms = np.stack([np.ones_like(x), x, y, x * y, x**2, y**2])
    coefficients = rng.uniform(-1, 1, size=len(terms))
    phase = np.tensordot(coefficients, terms, axes=1)
    return (amplitude * phase / max(np.abs(phase).max(), 1e-6)).astype(np.float32)


def _as_images(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    array = np.abs(array).astype(np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"image: expected a magnitude image (y, x) or (slices, y, x), found shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("image: contains NaN or Inf values")
    peak = float(array.max())
    if peak == 0:
        raise ValueError("image: all values are zero")
    return array / peak


# Largest simulated matrix side (a 4096² scan with 8 coils and 2× oversampling already needs ~2 GiB).
MAX_MATRIX = 4096


def _check_sizes(shape: tuple[int, int], acs_width: int, coils: int) -> None:
    if coils < 1:
        raise ValueError(f"coils: expected at least 1, found {coils}")
    if min(shape) < 8 or max(shape) > MAX_MATRIX:
        raise ValueError(f"matrix: expected 8 to {MAX_MATRIX} per side, found {shape[0]}×{shape[1]}")
    if acs_width > shape[0]:
        raise ValueError(
            f"matrix {shape[0]}×{shape[1]} is smaller than the ACS region ({acs_width} lines); "
            "use a larger matrix or a smaller --acs"
        )


def _check_noise(noise_std: float) -> None:
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise: expected a finite standard deviation >= 0, found {noise_std!r}")


def _noise_mixing(coils: int, rng: np.random.Generator) -> np.ndarray:
    """A coil noise mixing matrix (covariance ``M Mᴴ``) with realistic correlations and level spread."""
    mixing = np.eye(coils) + 0.15 * (rng.standard_normal((coils, coils)) + 1j * rng.standard_normal((coils, coils)))
    return (mixing * rng.uniform(0.8, 1.2, size=(coils, 1))).astype(np.complex64)


def _noise(shape: tuple[int, ...], mixing: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Complex Gaussian noise of ``shape`` ``(coils, ...)``, coils correlated by ``mixing``."""
    white = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * (std / np.sqrt(2))
    return np.tensordot(mixing, white, axes=(1, 0)).astype(np.complex64)


def _coil_kspace(images: np.ndarray, coils: int, rng: np.random.Generator, oversampling: int = 1) -> np.ndarray:
    """Noise-free k-space ``(slices, coils, y, oversampling·x)``; the readout FOV is zero padded."""
    import torch

    from semrecon_core.physics.fft import fft2c

    slices, ny, nx = images.shape
    width = nx * oversampling
    maps = coil_maps(coils, (ny, width))
    padded = np.zeros((slices, ny, width), dtype=np.complex64)
    left = (width - nx) // 2
    for s in range(slices):
        padded[s, :, left : left + nx] = images[s] * np.exp(1j * smooth_phase((ny, nx), rng))
    return fft2c(torch.from_numpy(maps[None] * padded[:, None])).numpy()


def simulate_kspace(
    image: Any,
    *,
    coils: int = 8,
    acceleration: float = 4,
    acs_width: int = 24,
    mask_kind: str = "gaussian",
    noise_std: float = 0.005,
    fov_margin: float = FOV_MARGIN,
    seed: int = 0,
) -> KSpace:
    """Simulate an undersampled multicoil scan of a magnitude image, keeping the ground truth.

    Args:
        image: magnitude ``(y, x)`` or ``(slices, y, x)`` (array or tensor); normalised to max 1.
        coils: number of birdcage coils.
        acceleration: R of the sampling mask.
        acs_width: fully sampled centre lines (square side for ``poisson``).
        mask_kind: ``equispaced``, ``random``, ``gaussian`` or ``poisson`` (see ``sampling_mask``).
        noise_std: std of the complex k-space noise relative to the image maximum (before coil correlation).
        fov_margin: zeros around the image on each side, as a fraction of its side (:func:`place_in_fov`); the
            k-space grid is the image's size plus the margins.
        seed: seeds phase, noise and mask.

    Returns:
        A ``KSpace`` with ``ground_truth`` = the normalised magnitude image inside its margins.
    """
    from semrecon_core.data.kspace import Geometry
    from semrecon_core.data.readers import from_arrays
    from semrecon_core.physics.masks import sampling_mask

    images = place_in_fov(_as_images(image), fov_margin)
    slices, ny, nx = images.shape
    _check_sizes((ny, nx), acs_width, coils)
    _check_noise(noise_std)
    rng = np.random.default_rng(seed)
    full = _coil_kspace(images, coils, rng)
    noise = _noise((coils, slices, ny, nx), _noise_mixing(coils, rng), noise_std, rng)
    full = full + noise.transpose(1, 0, 2, 3)
    mask = sampling_mask(mask_kind, (ny, nx), acceleration, acs_width=acs_width, seed=seed).numpy()
    geometry = Geometry((nx, ny, 1), (nx, ny, 1), (float(nx), float(ny), 1.0), (float(nx), float(ny), 1.0))
    return from_arrays(
        full,
        np.broadcast_to(mask, (slices, ny, nx)),
        geometry,
        source=f"simulated {slices}×{ny}×{nx}, {coils} coils, R={acceleration:g} {mask_kind}",
        ground_truth=images,
        info={"noise_std": noise_std, "fov_margin": fov_margin, "seed": seed},
    )


def _header_xml(
    *,
    ny: int,
    nx: int,
    slices: int,
    coils: int,
    oversampling: int,
    fov_mm: tuple[float, float],
    slice_thickness_mm: float,
    acceleration: float,
    calibration: str,
) -> str:
    fov_y, fov_x = fov_mm
    return f"""<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <measurementInformation>
    <patientPosition>HFS</patientPosition>
    <protocolName>semrecon simulate</protocolName>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>semrecon</systemVendor>
    <systemModel>simulator</systemModel>
    <relativeReceiverNoiseBandwidth>{RECEIVER_NOISE_BANDWIDTH}</relativeReceiverNoiseBandwidth>
    <receiverChannels>{coils}</receiverChannels>
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>127740000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{nx * oversampling}</x><y>{ny}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_x * oversampling}</x><y>{fov_y}</y><z>{slice_thickness_mm}</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_x}</x><y>{fov_y}</y><z>{slice_thickness_mm}</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1>
        <minimum>0</minimum><maximum>{ny - 1}</maximum><center>{ny // 2}</center>
      </kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center></kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>{slices - 1}</maximum><center>0</center></slice>
      <repetition><minimum>0</minimum><maximum>0</maximum><center>0</center></repetition>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
    <parallelImaging>
      <accelerationFactor>
        <kspace_encoding_step_1>{max(round(acceleration), 1)}</kspace_encoding_step_1>
        <kspace_encoding_step_2>1</kspace_encoding_step_2>
      </accelerationFactor>
      <calibrationMode>{calibration}</calibrationMode>
    </parallelImaging>
  </encoding>
  <sequenceParameters><TR>5.0</TR><TE>2.5</TE><flipAngle_deg>15</flipAngle_deg></sequenceParameters>
</ismrmrdHeader>
"""


def write_ismrmrd_raw(
    path: str | Path,
    image: Any = None,
    *,
    matrix: tuple[int, int] = (128, 128),
    slices: int = 1,
    coils: int = 8,
    acceleration: float = 4,
    acs_width: int = 24,
    mask_kind: str = "gaussian",
    noise_std: float = 0.005,
    noise_scan: bool = True,
    oversampling: int = 2,
    fov_margin: float = FOV_MARGIN,
    calibration: str = "embedded",
    fov_mm: tuple[float, float] = (220.0, 220.0),
    slice_thickness_mm: float = 5.0,
    slice_gap_mm: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write a simulated ISMRMRD raw file (atomically) and return its path.

    Args:
        path: output ``.h5``.
        image: magnitude ``(y, x)`` / ``(slices, y, x)``; ``None`` uses the built-in Shepp–Logan anatomy
            with ``matrix`` and ``slices``.
        matrix: ``(y, x)`` of the built-in anatomy.
        slices: slices of the built-in anatomy.
        coils: as :func:`simulate_kspace`.
        acceleration: as :func:`simulate_kspace`.
        acs_width: as :func:`simulate_kspace`.
        mask_kind: a 1-D line mask kind (``equispaced``, ``random``, ``gaussian``).
        noise_std: as :func:`simulate_kspace`; also the noise scan's level.
        noise_scan: write a noise-only acquisition block first (enables prewhitening).
        oversampling: readout oversampling factor (1 or 2); the encoded readout FOV is that much wider.
        fov_margin: as :func:`simulate_kspace`, for an ``image`` (the built-in anatomy lies inside ``matrix``).
        calibration: ``embedded`` (ACS lines flagged PARALLEL_CALIBRATION_AND_IMAGING) or ``separate``
            (ACS lines acquired again as PARALLEL_CALIBRATION before the imaging lines).
        fov_mm: recon field of view ``(y, x)``.
        slice_thickness_mm: slice thickness; slice positions are spaced by thickness + gap along the normal.
        slice_gap_mm: gap between slices.
        seed: as :func:`simulate_kspace`.
    """
    import ismrmrd

    from semrecon_core.data.images import atomic_path
    from semrecon_core.physics.masks import sampling_mask

    path = Path(path)
    if mask_kind not in LINE_MASK_KINDS:
        raise ValueError(
            f"mask: an ISMRMRD 2-D scan acquires whole lines; expected one of "
            f"{', '.join(LINE_MASK_KINDS)}, found {mask_kind!r}"
        )
    if calibration not in ("embedded", "separate"):
        raise ValueError(f"calibration: expected embedded or separate, found {calibration!r}")
    if oversampling not in (1, 2):
        raise ValueError(f"oversampling: expected 1 or 2, found {oversampling}")
    _check_noise(noise_std)
    if noise_std == 0 and noise_scan:
        raise ValueError("noise: a noise scan needs noise_std > 0 (the noise covariance would be singular)")
    if image is None:
        _check_sizes(tuple(matrix), acs_width, coils)  # type: ignore[arg-type]
    images = builtin_anatomy(matrix, slices) if image is None else place_in_fov(_as_images(image), fov_margin)
    slices, ny, nx = images.shape
    _check_sizes((ny, nx), acs_width, coils)
    rng = np.random.default_rng(seed)
    mixing = _noise_mixing(coils, rng)
    full = _coil_kspace(images, coils, rng, oversampling)  # (slices, coils, ny, nx·os)
    lines = sampling_mask(mask_kind, (ny, nx), acceleration, acs_width=acs_width, seed=seed).numpy().any(axis=1)
    acs = np.zeros(ny, dtype=bool)
    acs[ny // 2 - acs_width // 2 : ny // 2 - acs_width // 2 + acs_width] = True
    samples = nx * oversampling

    xml = _header_xml(
        ny=ny,
        nx=nx,
        slices=slices,
        coils=coils,
        oversampling=oversampling,
        fov_mm=fov_mm,
        slice_thickness_mm=slice_thickness_mm,
        acceleration=acceleration,
        calibration=calibration,
    )
    counter = 0

    def acquisition(data: np.ndarray, flags: list[int], line: int = 0, slice_index: int = 0) -> Any:
        nonlocal counter
        spacing = slice_thickness_mm + slice_gap_mm
        acq = ismrmrd.Acquisition.from_array(
            np.ascontiguousarray(data, dtype=np.complex64),
            scan_counter=counter,
            center_sample=samples // 2,
            sample_time_us=DWELL_TIME_US,
            position=(0.0, 0.0, float((slice_index - (slices - 1) / 2) * spacing)),
            read_dir=(1.0, 0.0, 0.0),
            phase_dir=(0.0, 1.0, 0.0),
            slice_dir=(0.0, 0.0, 1.0),
        )
        acq.idx.kspace_encode_step_1 = line
        acq.idx.slice = slice_index
        for flag in flags:
            acq.setFlag(flag)
        counter += 1
        return acq

    acquisitions = []
    if noise_scan:
        acquisitions += [
            acquisition(_noise((coils, samples), mixing, noise_std, rng), [ismrmrd.ACQ_IS_NOISE_MEASUREMENT])
            for _ in range(NOISE_SCAN_LINES)
        ]
    for s in range(slices):
        plan: list[tuple[int, list[int]]] = []
        if calibration == "separate":
            plan += [(int(y), [ismrmrd.ACQ_IS_PARALLEL_CALIBRATION]) for y in np.flatnonzero(acs)]
            plan += [(int(y), []) for y in np.flatnonzero(lines)]
        else:
            plan += [
                (int(y), [ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING] if acs[y] else [])
                for y in np.flatnonzero(lines | acs)
            ]
        for number, (y, flags) in enumerate(plan):
            flags = list(flags)
            if number == 0:
                flags += [ismrmrd.ACQ_FIRST_IN_SLICE, ismrmrd.ACQ_FIRST_IN_ENCODE_STEP1]
            if number == len(plan) - 1:
                flags += [ismrmrd.ACQ_LAST_IN_SLICE, ismrmrd.ACQ_LAST_IN_ENCODE_STEP1]
                if s == slices - 1:
                    flags += [ismrmrd.ACQ_LAST_IN_REPETITION, ismrmrd.ACQ_LAST_IN_MEASUREMENT]
            line = full[s, :, y] + _noise((coils, samples), mixing, noise_std, rng)
            acquisitions.append(acquisition(line, flags, int(y), s))

    with atomic_path(path) as temp:
        dataset = ismrmrd.Dataset(str(temp), GROUP, mode="w")
        try:
            dataset.write_xml_header(xml.encode("utf-8"))
            for acq in acquisitions:
                dataset.append_acquisition(acq)
            dataset._file.create_dataset(f"{GROUP}/ground_truth", data=images)
        finally:
            dataset.close()
    return path
