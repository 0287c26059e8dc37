"""The images an embedding bank is built from: reading source files and simulating negatives.

Sources are files or directories of them. K-space: ISMRMRD raw (``.h5``/``.mrd``), fastMRI ``.h5``, BART
``.cfl``, ``.npy`` (complex, ``(coils, ky, kx)`` / ``(slices, coils, ky, kx)``); positives from k-space are the RSS
of the fully sampled data. Images (magnitudes, one slice per 2-D image): ``.npy`` (real, ``(y, x)`` /
``(slices, y, x)``), PNG and TIFF (grey levels; a multi-page TIFF is a stack), DICOM (``.dcm`` or any file with the
DICOM preamble, through pydicom, rescaled by its modality LUT; multi-frame is a stack), ISMRMRD image files (every
image group of an ``.h5`` without raw data: ``dataset/<group>/data``, channels combined by RSS) and fastMRI ``.h5``
files that hold only ``reconstruction_rss``. Without given negatives, negatives are made from each positive slice as
in the public code: zero-filled RSS after a 1-D Gaussian-density mask with R drawn uniformly from [3, 8] and
24 ACS lines, or the ``lines / 8`` R = 8 allows on smaller images (magnitude images are treated as single-coil
k-space for this); :data:`SIMULATED_NEGATIVES` of them per positive slice by default. ``semrecon bank build``
(:mod:`semrecon_core.commands.bank`) embeds what :func:`gather_images` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE_SUFFIXES = (".h5", ".mrd", ".npy", ".cfl", ".png", ".tif", ".tiff", ".dcm")
PICTURE_SUFFIXES = (".png", ".tif", ".tiff")
MAX_PIXELS = 2**28
SIMULATED_NEGATIVES = 4
"""Simulated negatives per positive slice (``bank build --simulated-negatives``). The leave-one-out AUC of the DINOv2
knee PD bank (7 positives at 160²) was 0.64 with one per positive and 0.94 with four."""
"""Largest image stack (pixels) a source may claim; checked before its pixels are read."""


@dataclass
class Source:
    """Images read from one file: ``images`` ``(slices, y, x)`` complex64; ``kspace`` when known."""

    path: Path
    images: torch.Tensor
    kspace: torch.Tensor | None
    sha256: str


def expand_sources(paths: Sequence[str | Path], role: str) -> list[Path]:
    """Files named by ``paths``; directories contribute their source files (recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.name.upper() != "DICOMDIR"  # a DICOM media index, no image
                and (p.suffix.lower() in SOURCE_SUFFIXES or _is_dicom(p))
            )
            if not found:
                raise ValueError(f"--{role}: directory {path} holds no {', '.join(SOURCE_SUFFIXES)} or DICOM files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--{role}: {path}: no such file or directory")
    return files


def read_source(path: Path, role: str) -> Source:
    """Read one source; positives from k-space must be fully sampled."""
    from semrecon_core.physics.coils import rss
    from semrecon_core.physics.fft import ifft2c
    from semrecon_core.priors.bank import file_sha256

    pictures = _read_image_file(path)
    if pictures is not None:
        if pictures.ndim != 3 or pictures.shape[0] == 0 or min(pictures.shape[-2:]) < 8:
            raise ValueError(f"{path}: expected 2-D images of at least 8×8 pixels, found shape {pictures.shape}")
        if not np.isfinite(pictures).all():
            raise ValueError(f"{path}: image contains NaN or Inf")
        magnitudes = torch.from_numpy(np.ascontiguousarray(pictures, dtype=np.float32)).to(torch.complex64)
        return Source(path, magnitudes, None, file_sha256(path))
    if path.suffix.lower() == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if not np.iscomplexobj(array):
            if array.ndim not in (2, 3):
                raise ValueError(
                    f"{path}: expected a magnitude image (y, x) or (slices, y, x), found shape {array.shape}"
                )
            images = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(-1, *array.shape[-2:])
            if not torch.isfinite(images).all():
                raise ValueError(f"{path}: image contains NaN or Inf")
            return Source(path, images.to(torch.complex64), None, file_sha256(path))
    from semrecon_core.data.readers import load_kspace

    kspace = load_kspace(path)
    if role == "positives" and not bool(kspace.mask.all()):
        raise ValueError(
            f"--positives: {path}: k-space is undersampled (R = {kspace.acceleration:.2f}); "
            f"positives must be fully sampled (pass undersampled data as --negatives)"
        )
    images = rss(ifft2c(kspace.data)).to(torch.complex64)
    return Source(path, images, kspace.data, file_sha256(path))


def _read_image_file(path: Path) -> np.ndarray | None:
    """Magnitudes ``(slices, y, x)`` of a picture, DICOM, ISMRMRD image or fastMRI RSS file; ``None`` otherwise."""
    suffix = path.suffix.lower()
    if suffix in PICTURE_SUFFIXES:
        return _read_picture(path)
    if suffix == ".dcm" or (suffix not in SOURCE_SUFFIXES and _is_dicom(path)):
        return _read_dicom(path)
    if suffix in (".h5", ".mrd") and path.is_file():
        return _read_hdf5_images(path)
    return None


def _is_dicom(path: Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble (128 bytes, then ``DICM``)."""
    try:
        with path.open("rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _check_claimed(path: Path, shape: tuple[int, ...]) -> None:
    if any(n <= 0 for n in shape) or int(np.prod(shape)) > MAX_PIXELS:
        raise ValueError(f"{path}: claims images of shape {shape}; expected positive sizes and ≤ {MAX_PIXELS} pixels")


def _read_picture(path: Path) -> np.ndarray:
    """A PNG or TIFF as grey levels; every page of a multi-page TIFF is a slice."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            _check_claimed(path, (getattr(picture, "n_frames", 1), picture.height, picture.width))
            pages = []
            for page in ImageSequence.Iterator(picture):
                if page.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                    page = page.convert("L")  # colour or palette: luminance
                pages.append(np.asarray(page, dtype=np.float32))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot be read as an image: {exc}") from None
    if len({page.shape for page in pages}) > 1:
        raise ValueError(f"{path}: pages of different sizes {sorted({page.shape for page in pages})}")
    return np.stack(pages)


def _read_dicom(path: Path) -> np.ndarray:
    """A DICOM image (single or multi-frame) in its modality's units (RescaleSlope / RescaleIntercept)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        raise ValueError(f"{path}: reading DICOM needs pydicom (pip install 'semrecon[semantic]')") from None
    try:
        dataset = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable DICOM file: {exc}") from None
    if "PixelData" not in dataset:
        raise ValueError(f"{path}: DICOM file without pixel data (PixelData)")
    samples = int(dataset.get("SamplesPerPixel", 1))
    if samples != 1:
        raise ValueError(f"{path}: DICOM SamplesPerPixel {samples}; expected 1 (grey-level MR images)")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    _check_claimed(path, (frames, int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))))
    try:
        pixels = np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float32)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as exc:  # unsupported/broken
        raise ValueError(f"{path}: cannot decode the DICOM pixel data: {exc}") from None
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":  # white is 0: make it the maximum
        pixels = pixels.max() - pixels
    return pixels.reshape(-1, *pixels.shape[-2:])


def _read_hdf5_images(path: Path) -> np.ndarray | None:
    """Magnitudes of an ISMRMRD image file or of a fastMRI file with only ``reconstruction_rss``.

    ``None`` for files with raw data (ISMRMRD acquisitions, fastMRI ``kspace``): those are read as k-space.
    """
    import h5py

    from semrecon_core.data.readers import _is_hdf5, _open_hdf5
    from semrecon_core.physics.coils import rss

    if not _is_hdf5(path):
        return None
    with _open_hdf5(path) as file:
        raw = any(
            isinstance(group.get("data"), h5py.Dataset) for group in file.values() if isinstance(group, h5py.Group)
        )
        if "kspace" in file or raw:
            return None
        if "reconstruction_rss" in file:
            stored = file["reconstruction_rss"]
            _check_claimed(path, tuple(stored.shape))
            return np.abs(np.asarray(stored[()], dtype=np.float32)).reshape(-1, *stored.shape[-2:])
        groups = {
            f"{top}/{name}": item["data"].shape
            for top, parent in file.items()
            if isinstance(parent, h5py.Group)
            for name, item in parent.items()
            if isinstance(item, h5py.Group) and {"header", "data"} <= set(item.keys())
        }
        if not groups:
            return None
        for shape in groups.values():
            _check_claimed(path, tuple(shape))
        slices: list[np.ndarray] = []
        for name in sorted(groups):
            data = np.asarray(file[name]["data"][()])  # (images, channels, z, y, x)
            if data.dtype.names:  # complex images: ISMRMRD's compound of real and imag
                data = data["real"] + 1j * data["imag"]
            magnitude = rss(torch.from_numpy(data.astype(np.complex64)), dim=1)  # in floating point: no int wrap
            slices.extend(magnitude.reshape(-1, *magnitude.shape[-2:]).numpy())
    return np.stack(slices)


def undersampled_versions(
    source: Source, rng: np.random.Generator, acs_width: int = 24
) -> Iterator[tuple[torch.Tensor, float]]:
    """Zero-filled RSS ``(1, y, x)`` of each slice with a Gaussian 1-D mask at R ~ U[3, 8], and R.

    The ACS band is ``acs_width`` lines, or the ``lines / 8`` that R = 8 leaves when the image has fewer than
    ``8 · acs_width`` phase-encoding lines.
    """
    from semrecon_core.physics.coils import rss
    from semrecon_core.physics.fft import fft2c, ifft2c
    from semrecon_core.physics.masks import sampling_mask

    kspace = source.kspace if source.kspace is not None else fft2c(source.images).unsqueeze(1)
    acs_width = min(acs_width, kspace.shape[-2] // 8)
    for slice_kspace in kspace:
        acceleration = float(rng.uniform(3.0, 8.0))
        mask = sampling_mask(
            "gaussian",
            tuple(slice_kspace.shape[-2:]),
            acceleration,
            acs_width=acs_width,
            seed=int(rng.integers(2**31)),
        )
        yield rss(ifft2c(slice_kspace * mask)).unsqueeze(0).to(torch.complex64), acceleration


@dataclass
class BankImages:
    """Positive and negative images ``(1, y, x)`` complex64 for a bank, and one provenance record per file."""

    positives: list[torch.Tensor]
    negatives: list[torch.Tensor]
    records: list[dict[str, Any]]
    negative_parents: list[int] = field(default_factory=list)
    """Per negative, the index of the positive slice it was simulated from (−1: a given negative)."""


def gather_images(
    positive_files: Sequence[Path],
    negative_files: Sequence[Path],
    rng: np.random.Generator,
    *,
    simulated: int = SIMULATED_NEGATIVES,
) -> BankImages:
    """Read every source; without ``negative_files`` simulate ``simulated`` negatives from each positive slice.

    Each record names the file, its role, SHA-256 and slice count (and the R of simulated negatives: ``simulated``
    rounds over the file's slices).
    """
    if simulated < 1 and not negative_files:
        raise ValueError(f"--simulated-negatives: expected at least 1 per positive slice, found {simulated}")
    from tqdm import tqdm

    gathered = BankImages([], [], [])
    for path in tqdm(positive_files, desc="reading positives", unit="file", disable=None):
        source = read_source(path, "positives")
        gathered.positives.extend(source.images.split(1))
        record: dict[str, Any] = {
            "role": "positive",
            "path": str(path),
            "sha256": source.sha256,
            "slices": len(source.images),
        }
        if not negative_files:
            accelerations = []
            for _ in range(simulated):
                first = len(gathered.positives) - len(source.images)
                for offset, (image, acceleration) in enumerate(undersampled_versions(source, rng)):
                    gathered.negatives.append(image)
                    gathered.negative_parents.append(first + offset)
                    accelerations.append(round(acceleration, 3))
            record["simulated_negatives_R"] = accelerations
        gathered.records.append(record)
    for path in tqdm(negative_files, desc="reading negatives", unit="file", disable=None):
        source = read_source(path, "negatives")
        gathered.negatives.extend(source.images.split(1))
        gathered.negative_parents.extend([-1] * len(source.images))
        gathered.records.append(
            {"role": "negative", "path": str(path), "sha256": source.sha256, "slices": len(source.images)}
        )
    return gathered
