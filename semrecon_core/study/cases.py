"""The cases of a study: which files they are, and the undersampled scan of each at an acceleration.

A case is one file. Three kinds are understood:

- a **magnitude image** ``.npy`` (real ``(y, x)`` or ``(slices, y, x)``, e.g. the fastMRI RSS knee slices):
  simulated as a multicoil scan (:func:`~semrecon_core.data.simulate.simulate_kspace`: birdcage coils, 15 by
  default like fastMRI knee, smooth phase, noise) and undersampled at each acceleration; the image is the
  reference.
- **fully sampled raw k-space** (fastMRI multicoil ``.h5``, ISMRMRD raw ``.h5``/stream, complex ``.npy``),
  read by :func:`~semrecon_core.data.readers.load_kspace` (noise prewhitening and readout-oversampling removal
  included) and undersampled retrospectively with the study's mask at each acceleration. The reference is the
  root-sum-of-squares of the fully sampled coil images on the recon matrix (the fastMRI convention), computed
  from the same k-space the reconstruction sees, so both are in one unit. A ground truth stored in the file is
  not used: it may be in other units (an ISMRMRD phantom before prewhitening, for one).

Undersampled raw data are refused: without the fully sampled k-space there is no reference in the
reconstruction's units.

Every (case, acceleration) gets its own seed derived from the study seed and the case name, so a case's
mask, phase and noise are the same for every setting (the comparisons are paired) and the same on every run.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from semrecon_core.data.simulate import FOV_MARGIN

if TYPE_CHECKING:
    from collections.abc import Sequence

    from semrecon_core.data.kspace import KSpace

CASE_SUFFIXES = (".npy", ".h5", ".hdf5", ".mrd")

CaseKind = Literal["image", "kspace"]


@dataclass(frozen=True)
class ScanOptions:
    """How cases become undersampled scans.

    Attributes:
        coils: simulated coils of magnitude-image cases.
        acs: fully sampled centre lines of the masks (and ESPIRiT's calibration width).
        mask: mask kind (``gaussian``: the authors' 1-D Gaussian mask; ``equispaced``, ``random``, ``poisson``).
        noise: complex k-space noise std of simulated cases, relative to the image maximum.
        fov_margin: zeros around simulated images, a fraction of their side on each side (the object inside the
            field of view; :func:`~semrecon_core.data.simulate.place_in_fov`).
        seed: the study seed every case's seed derives from.
    """

    coils: int = 15
    acs: int = 24
    mask: str = "gaussian"
    noise: float = 0.005
    fov_margin: float = FOV_MARGIN
    seed: int = 0


@dataclass(frozen=True)
class Case:
    """One file of a study.

    Attributes:
        name: unique name in the study (the file stem; parent folders added where stems collide).
        path: the file.
        kind: ``image`` (magnitude image to simulate) or ``kspace`` (raw data).
        sha256: content hash, part of every result's key.
    """

    name: str
    path: Path
    kind: CaseKind
    sha256: str


def file_sha256(path: Path) -> str:
    """sha256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def case_kind(path: Path) -> CaseKind:
    """``image`` for a real-valued ``.npy``, ``kspace`` for anything else (complex ``.npy``, HDF5, streams)."""
    if path.suffix.lower() != ".npy":
        return "kspace"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npy file: {exc}") from None
    if np.iscomplexobj(array):
        return "kspace"
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: a magnitude image case must be (y, x) or (slices, y, x), found shape {array.shape}")
    return "image"


def discover(inputs: Sequence[str | Path]) -> list[Case]:
    """The cases named by ``inputs`` (files, or folders whose case files are taken), sorted by name.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: a folder holds no case file, a file has an unknown suffix, or a file is named twice.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CASE_SUFFIXES)
            if not found:
                raise ValueError(f"{path}: no case files ({', '.join(CASE_SUFFIXES)}) in this folder")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in (*CASE_SUFFIXES, ".bin", ".dat"):
                raise ValueError(
                    f"{path}: not a case file (expected .npy magnitude image or k-space, fastMRI or ISMRMRD .h5, "
                    "or an ISMRMRD stream)"
                )
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such case file or folder")
    resolved = [p.resolve() for p in files]
    duplicates = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if duplicates:
        raise ValueError(f"case files named more than once: {', '.join(duplicates)}")
    names = unique_names(resolved)
    cases = [Case(names[p], p, case_kind(p), file_sha256(p)) for p in resolved]
    return sorted(cases, key=lambda case: case.name)


def unique_names(paths: Sequence[Path]) -> dict[Path, str]:
    """File stems, with as many parent folders prefixed (``knee/pd_01``) as it takes to tell them apart."""
    depth = 1
    while True:
        names = {p: "/".join(p.with_suffix("").parts[-depth:]) for p in paths}
        if len(set(names.values())) == len(paths) or depth > max((len(p.parts) for p in paths), default=1):
            return {p: name.replace("/", "__") for p, name in names.items()}
        depth += 1


def case_seed(seed: int, name: str, acceleration: float) -> int:
    """The seed of a case's scan at one acceleration: from the study seed, the name and R, stable across runs."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode()), round(acceleration * 1000)])
    return int(state.generate_state(1)[0] % (2**31 - 1))


def load_scan(case: Case, acceleration: float, options: ScanOptions) -> KSpace:
    """The undersampled scan of ``case`` at ``acceleration``, with its reference as ``ground_truth``.

    Raises:
        ValueError: the case cannot give a scan at this acceleration with a reference (naming why).
    """
    seed = case_seed(options.seed, case.name, acceleration)
    if case.kind == "image":
        from semrecon_core.data.simulate import simulate_kspace

        image = np.load(case.path, allow_pickle=False)
        scan = simulate_kspace(
            image,
            coils=options.coils,
            acceleration=acceleration,
            acs_width=options.acs,
            mask_kind=options.mask,
            noise_std=options.noise,
            fov_margin=options.fov_margin,
            seed=seed,
        )
        return replace(scan, source=f"{case.path} ({scan.source})")
    from semrecon_core.data.readers import load_kspace

    scan = load_kspace(case.path)
    if not bool(scan.mask.all()):
        raise ValueError(
            f"{case.path}: acquired undersampled (R = {scan.acceleration:.2f}); a study needs fully sampled raw data "
            "(undersampled retrospectively, with the fully sampled root-sum-of-squares as the reference) or a "
            "magnitude image"
        )
    return undersample(scan, acceleration, options, seed)


def check_case(case: Case, accelerations: Sequence[float], options: ScanOptions) -> None:
    """Refuse, before anything runs, a case that cannot give a scan at every acceleration (naming why)."""
    from semrecon_core.physics.masks import sampling_mask

    if case.kind == "image":
        shape = np.load(case.path, mmap_mode="r", allow_pickle=False).shape[-2:]
    else:
        from semrecon_core.data.readers import load_kspace

        scan = load_kspace(case.path)
        if not bool(scan.mask.all()):
            raise ValueError(
                f"{case.path}: acquired undersampled (R = {scan.acceleration:.2f}); a study needs fully sampled raw "
                "data (undersampled retrospectively, with the fully sampled root-sum-of-squares as the reference) or "
                "a magnitude image"
            )
        shape = scan.shape[-2:]
    try:
        for acceleration in accelerations:
            sampling_mask(options.mask, (int(shape[0]), int(shape[1])), acceleration, acs_width=options.acs)
    except ValueError as exc:
        raise ValueError(f"{case.path} ({shape[0]}×{shape[1]}): {exc}") from None


def undersample(scan: KSpace, acceleration: float, options: ScanOptions, seed: int) -> KSpace:
    """Retrospective undersampling of a fully sampled scan, keeping geometry and headers.

    The reference (``ground_truth``) is the root-sum-of-squares of the fully sampled coil images cropped to
    the recon matrix (the fastMRI convention).
    """
    import torch

    from semrecon_core.data.images import crop_to_recon
    from semrecon_core.data.readers import from_arrays
    from semrecon_core.physics.fft import ifft2c
    from semrecon_core.physics.masks import sampling_mask

    rss = ifft2c(scan.data).abs().pow(2).sum(dim=1).sqrt()
    truth = torch.as_tensor(crop_to_recon(rss, scan))
    slices, _, ny, nx = scan.shape
    mask = sampling_mask(options.mask, (ny, nx), acceleration, acs_width=options.acs, seed=seed).numpy()
    return from_arrays(
        scan.data.numpy(),
        np.broadcast_to(mask, (slices, ny, nx)),
        scan.geometry,
        source=f"{scan.source} (retrospectively undersampled, R = {acceleration:g} {options.mask}, seed {seed})",
        ground_truth=truth.numpy(),
        headers=scan.headers,
        xml_header=scan.xml_header,
        info={**scan.info, "retrospective": True, "seed": seed},
    )
