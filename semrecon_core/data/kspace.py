"""The one k-space container of semrecon.

``KSpace`` holds a scan ready for reconstruction: complex64 k-space ``(slices, coils, ky, kx)``
(``kx`` = readout, ``ky`` = phase encoding), its sampling mask, the fully sampled calibration block
used for coil maps, and the geometry and acquisition headers needed to build image headers later.
Each "slice" is one 2-D image to reconstruct (a slice, repetition, average, ... of the scan).
The named constructors are the readers in :mod:`semrecon_core.data.readers` (``read_ismrmrd``,
``read_fastmri``, ``read_npy``, ``read_bart``, ``from_recon_buffer``, ``load_kspace`` by file type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch


@dataclass(frozen=True)
class Geometry:
    """Encoding and reconstruction geometry (ISMRMRD encodedSpace / reconSpace), ``(x, y, z)`` order."""

    encoded_matrix: tuple[int, int, int]
    recon_matrix: tuple[int, int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_fov_mm: tuple[float, float, float]


@dataclass(frozen=True)
class KSpace:
    """A multicoil Cartesian scan.

    Attributes:
        data: complex64 k-space ``(slices, coils, ky, kx)``, zero where not sampled.
        mask: bool sampling mask ``(slices, ky, kx)``.
        calibration: complex64 fully sampled centre block ``(slices, coils, cy, cx)`` for coil maps
            (from separate reference lines or the embedded ACS region).
        geometry: encoded and recon matrix and field of view.
        headers: one representative ``ismrmrd.AcquisitionHeader`` per slice (or ``None``) whose
            position, orientation and indices are copied into image headers.
        ground_truth: optional reference image ``(slices, y, x)`` (simulations, phantoms) for metrics.
        xml_header: the ISMRMRD XML header text, when known.
        source: where the data came from (a path or a description), for messages.
        info: reader notes (e.g. number of noise scans used for prewhitening, readout oversampling removed).
    """

    data: torch.Tensor
    mask: torch.Tensor
    calibration: torch.Tensor
    geometry: Geometry
    headers: tuple[Any, ...] = ()
    ground_truth: torch.Tensor | None = None
    xml_header: str | None = None
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(slices, coils, ky, kx)``."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def acceleration(self) -> float:
        """Nominal acceleration: samples on the grid divided by samples acquired."""
        return float(self.mask.numel() / max(int(self.mask.sum()), 1))

    def check_calib_width(self, width: int) -> None:
        """Refuse a calibration width (``calib_width``) wider than the calibration region the data carry."""
        cy, cx = (int(n) for n in self.calibration.shape[-2:])
        if width > min(cy, cx):
            name = self.source or "k-space"
            raise ValueError(
                f"{name}: property 'calib_width' is {width}, but the calibration region of the data is {cy}×{cx}; "
                f"expected calib_width <= {min(cy, cx)}"
            )

    def select(self, entries: slice | Sequence[int]) -> KSpace:
        """A KSpace with only the given slice entries (tensors, headers and ground truth alike)."""
        from dataclasses import replace

        index = list(range(self.shape[0]))[entries] if isinstance(entries, slice) else list(entries)
        if not index or not all(0 <= i < self.shape[0] for i in index):
            name = self.source or "k-space"
            raise IndexError(f"{name}: entries {index} out of range 0..{self.shape[0] - 1}")
        return replace(
            self,
            data=self.data[index],
            mask=self.mask[index],
            calibration=self.calibration[index],
            headers=tuple(self.headers[i] for i in index) if self.headers else (),
            ground_truth=None if self.ground_truth is None else self.ground_truth[index],
        )

    def to(self, device: torch.device | str) -> KSpace:
        """A copy with the tensors on ``device``."""
        from dataclasses import replace

        return replace(
            self,
            data=self.data.to(device),
            mask=self.mask.to(device),
            calibration=self.calibration.to(device),
            ground_truth=None if self.ground_truth is None else self.ground_truth.to(device),
        )
