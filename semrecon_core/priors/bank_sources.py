"""The images an embedding bank is built from: reading source files and simulating negatives.

Sources are files or directories of them: ISMRMRD raw (``.h5``/``.mrd``), fastMRI ``.h5``, BART
``.cfl``, ``.npy`` k-space (complex, ``(coils, ky, kx)`` / ``(slices, coils, ky, kx)``) or ``.npy``
magnitude images (real, ``(y, x)`` / ``(slices, y, x)``). Positives from k-space are the RSS of the
fully sampled data. Without given negatives, negatives are made from each positive slice as in the
public code: zero-filled RSS after a 1-D Gaussian-density mask with R drawn uniformly from [3, 8] and
24 ACS lines (magnitude images are treated as single-coil k-space for this). ``semrecon bank build``
(:mod:`semrecon_core.commands.bank`) embeds what :func:`gather_images` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE_SUFFIXES = (".h5", ".mrd", ".npy", ".cfl")


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
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES)
            if not found:
                raise ValueError(f"--{role}: directory {path} holds no {', '.join(SOURCE_SUFFIXES)} files")
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


def undersampled_versions(
    source: Source, rng: np.random.Generator, acs_width: int = 24
) -> Iterator[tuple[torch.Tensor, float]]:
    """Zero-filled RSS ``(1, y, x)`` of each slice with a Gaussian 1-D mask at R ~ U[3, 8], and R."""
    from semrecon_core.physics.coils import rss
    from semrecon_core.physics.fft import fft2c, ifft2c
    from semrecon_core.physics.masks import sampling_mask

    kspace = source.kspace if source.kspace is not None else fft2c(source.images).unsqueeze(1)
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


def gather_images(
    positive_files: Sequence[Path], negative_files: Sequence[Path], rng: np.random.Generator
) -> BankImages:
    """Read every source; without ``negative_files`` simulate negatives from each positive slice.

    Each record names the file, its role, SHA-256 and slice count (and the R of simulated negatives).
    """
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
            for image, acceleration in undersampled_versions(source, rng):
                gathered.negatives.append(image)
                accelerations.append(round(acceleration, 3))
            record["simulated_negatives_R"] = accelerations
        gathered.records.append(record)
    for path in tqdm(negative_files, desc="reading negatives", unit="file", disable=None):
        source = read_source(path, "negatives")
        gathered.negatives.extend(source.images.split(1))
        gathered.records.append(
            {"role": "negative", "path": str(path), "sha256": source.sha256, "slices": len(source.images)}
        )
    return gathered
