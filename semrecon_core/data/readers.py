"""Readers that build a :class:`~semrecon_core.data.kspace.KSpace` from files and Gadgetron buffers.

- ISMRMRD raw HDF5 (``dataset/xml`` + ``dataset/data``): acquisitions → :mod:`semrecon_core.data.buffers`
  (noise prewhitening, readout-oversampling removal, accumulation, buffering) → :func:`from_recon_buffer`,
  the one constructor shared with the Gadgetron gadget. Ground truth from ``<group>/phantom``
  (``ismrmrd_generate_cartesian_shepp_logan``) or ``<group>/ground_truth`` (``semrecon simulate``; files
  written before it kept it inside the ISMRMRD group have ``semrecon/ground_truth``).
- ISMRMRD binary streams (``.mrd``/``.bin``/``.dat`` that are not HDF5): header + acquisition messages,
  through the same buffering.
- fastMRI HDF5 (``kspace`` ``(slices, coils, rows, cols)`` + ``ismrmrd_header``; readout along rows).
- ``.npy`` k-space ``(coils, ky, kx)`` or ``(slices, coils, ky, kx)`` with an optional mask ``.npy``
  (``(ky,)``, ``(ky, kx)`` or ``(slices, ky, kx)``) or BART ``.cfl`` mask.
- BART ``.cfl``/``.hdr`` k-space and masks (``bart pattern``, ``bart upat``, ``bart poisson``) in BART's
  Fortran-ordered (readout, phase 1, phase 2, coils, ..., slice at index 13): the readout becomes ``kx``
  and phase 1 ``ky``, as for ISMRMRD and fastMRI input, so images show the readout horizontally
  (transposed relative to ``bart toimg``, which draws dimension 0 downwards).

Every reader checks what it reads and raises ``ValueError`` naming the file and the problem; files
are only opened for reading.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from semrecon_core.data.kspace import Geometry, KSpace

log = logging.getLogger(__name__)

#: fewest fully sampled centre lines accepted as a calibration region (ESPIRiT kernel 6 + margin)
MIN_CALIBRATION = 8
#: ground truth inside the ISMRMRD group: ``semrecon simulate``'s, ismrmrd-tools' phantom
GROUND_TRUTH_DATASETS = ("ground_truth", "phantom")
#: where ``semrecon simulate`` kept its ground truth before (a top-level group, which readers that
#: open the last group of a file, such as mrpro, took for the ISMRMRD group)
LEGACY_GROUND_TRUTH = "semrecon/ground_truth"
#: suffixes of ISMRMRD binary stream files (non-HDF5 content with these suffixes is read as a stream)
STREAM_SUFFIXES = (".mrd", ".bin", ".dat")


# ------------------------------------------------------------------------------ calibration region
def calibration_region(mask: npt.ArrayLike) -> tuple[slice, slice]:
    """The largest centred rectangle of ``mask`` ``(ky, kx)`` that is fully sampled.

    Grows rows and columns alternately from the k-space centre while the new row/column is fully
    sampled inside the current rectangle. Returns ``(rows, cols)`` slices (possibly empty).
    """
    mask = np.asarray(mask)
    ny, nx = mask.shape
    cy, cx = ny // 2, nx // 2
    if not mask[cy, cx]:
        return slice(cy, cy), slice(cx, cx)
    top, bottom, left, right = cy, cy + 1, cx, cx + 1
    grown = True
    while grown:
        grown = False
        if top > 0 and mask[top - 1, left:right].all():
            top, grown = top - 1, True
        if bottom < ny and mask[bottom, left:right].all():
            bottom, grown = bottom + 1, True
        if left > 0 and mask[top:bottom, left - 1].all():
            left, grown = left - 1, True
        if right < nx and mask[top:bottom, right].all():
            right, grown = right + 1, True
    return slice(top, bottom), slice(left, right)


def _check_calibration(rows: slice, cols: slice, source: str) -> None:
    height, width = rows.stop - rows.start, cols.stop - cols.start
    if min(height, width) < MIN_CALIBRATION:
        raise ValueError(
            f"{source}: the sampling mask has no fully sampled calibration region around the k-space centre "
            f"(found {height}×{width}, need at least {MIN_CALIBRATION}×{MIN_CALIBRATION}); "
            "acquire ACS/reference lines or give a mask with a fully sampled centre"
        )


def naming(source: str, exc: BaseException) -> str:
    """``exc``'s message prefixed with ``source`` unless it already starts with it (no name said twice)."""
    text = str(exc)
    return text if text.startswith((f"{source}: ", f"{source} (")) else f"{source}: {text}"


def _check_finite(data: np.ndarray, source: str) -> None:
    finite = np.isfinite(data)
    if not finite.all():
        position = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"{source}: k-space contains NaN or Inf samples ({int((~finite).sum())} values, first at index {position})"
        )


def from_arrays(
    data: np.ndarray,
    mask: np.ndarray | None,
    geometry: Geometry,
    *,
    source: str,
    ground_truth: np.ndarray | None = None,
    headers: Sequence[Any] = (),
    xml_header: str | None = None,
    info: dict[str, Any] | None = None,
) -> KSpace:
    """Build a ``KSpace`` from ``(slices, coils, ky, kx)`` k-space and a mask.

    The mask broadcasts to ``(slices, ky, kx)`` (``None``: the non-zero samples); the calibration block is
    the fully sampled centre common to all slices.
    """
    if data.ndim != 4:
        raise ValueError(f"{source}: expected k-space (slices, coils, ky, kx), found shape {data.shape}")
    if not np.iscomplexobj(data):
        raise ValueError(f"{source}: expected complex k-space, found {data.dtype}")
    _check_finite(data, source)
    slices, _, ny, nx = data.shape
    if mask is None:
        mask = np.abs(data).sum(axis=1) > 0
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), (slices, ny, nx))
    data = np.where(mask[:, None], data, 0).astype(np.complex64)
    rows, cols = calibration_region(mask.all(axis=0))
    _check_calibration(rows, cols, source)
    return KSpace(
        data=torch.from_numpy(data),
        mask=torch.from_numpy(mask.copy()),
        calibration=torch.from_numpy(np.ascontiguousarray(data[:, :, rows, cols])),
        geometry=geometry,
        headers=tuple(headers),
        ground_truth=None if ground_truth is None else torch.from_numpy(np.ascontiguousarray(ground_truth, np.float32)),
        xml_header=xml_header,
        source=source,
        info=dict(info or {}),
    )


def _geometry_from_header(header: Any, readout_samples: int | None = None) -> Geometry:
    from semrecon_core.data.buffers import _encoding, readout_oversampling

    encoding = _encoding(header)
    enc, rec = encoding.encodedSpace, encoding.reconSpace
    ratio = readout_oversampling(header)
    encoded_x = readout_samples if readout_samples is not None else int(round(enc.matrixSize.x / ratio))
    return Geometry(
        encoded_matrix=(encoded_x, int(enc.matrixSize.y), max(int(enc.matrixSize.z), 1)),
        recon_matrix=(int(rec.matrixSize.x), int(rec.matrixSize.y), max(int(rec.matrixSize.z), 1)),
        encoded_fov_mm=(
            float(enc.fieldOfView_mm.x) / ratio,
            float(enc.fieldOfView_mm.y),
            float(enc.fieldOfView_mm.z),
        ),
        recon_fov_mm=(float(rec.fieldOfView_mm.x), float(rec.fieldOfView_mm.y), float(rec.fieldOfView_mm.z)),
    )


# ------------------------------------------------------------------------------ Gadgetron buffers
def _filled(header: Any) -> bool:
    return int(header.number_of_samples) > 0


def from_recon_buffer(data: Any, ref: Any, header: Any, *, source: str = "ReconData") -> KSpace:
    """``KSpace`` from one ``gadgetron.types.ReconBit``'s ``data`` and ``ref`` buffers.

    ``data.data`` is ``[E0, E1, E2, CHA, N, S, LOC]``; every ``(N, S, LOC)`` becomes one KSpace slice
    with its representative acquisition header. Sampled lines are those with a filled header; the
    calibration block comes from ``ref`` (reference lines placed on the data grid by their encode step)
    or, without ``ref``, from the fully sampled centre of the mask. ``header`` is the ISMRMRD XML header
    (text or parsed). Only 2-D Cartesian encodings (E2 = 1) are supported.
    """
    import ismrmrd

    from semrecon_core.data.buffers import check_header

    array = np.asarray(data.data)
    if array.ndim != 7:
        raise ValueError(f"{source}: expected buffer data [E0, E1, E2, CHA, N, S, LOC], found shape {array.shape}")
    e0, e1, e2, channels, n_size, s_size, loc_size = array.shape
    try:
        parsed = check_header(header, channels=channels)
    except ValueError as exc:
        raise ValueError(naming(source, exc)) from None
    if e2 != 1:
        raise ValueError(f"{source}: 3-D encodings (E2 = {e2}) are not supported; expected E2 = 1")
    _check_finite(array, source)
    headers = np.asarray(data.headers, dtype=object).reshape(e1, e2, n_size, s_size, loc_size)

    entries, masks, entry_headers, offsets = [], [], [], []
    for loc in range(loc_size):
        for s in range(s_size):
            for n in range(n_size):
                kspace = np.ascontiguousarray(array[:, :, 0, :, n, s, loc].transpose(2, 1, 0))  # (CHA, E1, E0)
                line_headers = [headers[y, 0, n, s, loc] for y in range(e1)]
                lines = np.array([_filled(h) for h in line_headers])
                if not lines.any():
                    lines = np.abs(kspace).sum(axis=(0, 2)) > 0
                if not lines.any():
                    raise ValueError(f"{source}: buffer (N={n}, S={s}, LOC={loc}) holds no sampled lines")
                mask = lines[:, None] & (np.abs(kspace).sum(axis=0) > 0)
                filled = [y for y in range(e1) if _filled(line_headers[y])]
                centre = min(filled, key=lambda y: abs(y - e1 // 2)) if filled else e1 // 2
                chosen = line_headers[centre] if filled else ismrmrd.AcquisitionHeader()
                offsets.append(centre - chosen.idx.kspace_encode_step_1 if filled else None)
                entries.append(kspace)
                masks.append(mask)
                entry_headers.append(chosen)
    stack = np.stack(entries)
    mask = np.stack(masks)

    if ref is not None:
        calibration = _calibration_from_ref(ref, offsets, (n_size, s_size, loc_size), (channels, e1, e0), source)
    else:
        rows, cols = calibration_region(mask.all(axis=0))
        _check_calibration(rows, cols, source)
        calibration = stack[:, :, rows, cols]

    xml = header if isinstance(header, str) else ismrmrd.xsd.ToXML(parsed)
    return KSpace(
        data=torch.from_numpy(stack.astype(np.complex64)),
        mask=torch.from_numpy(mask),
        calibration=torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.complex64)),
        geometry=_geometry_from_sampling(data.sampling),
        headers=tuple(entry_headers),
        xml_header=xml,
        source=source,
    )


def _geometry_from_sampling(sampling: Any) -> Geometry:
    def ints(values: Any) -> tuple[int, int, int]:
        return tuple(max(int(v), 1) for v in values)  # type: ignore[return-value]

    def floats(values: Any) -> tuple[float, float, float]:
        return tuple(float(v) for v in values)  # type: ignore[return-value]

    return Geometry(
        encoded_matrix=ints(sampling.encoded_matrix),
        recon_matrix=ints(sampling.recon_matrix),
        encoded_fov_mm=floats(sampling.encoded_FOV),
        recon_fov_mm=floats(sampling.recon_FOV),
    )


def _calibration_from_ref(
    ref: Any, offsets: list[int | None], sizes: tuple[int, int, int], grid: tuple[int, int, int], source: str
) -> np.ndarray:
    """Reference lines placed on the data grid; the calibration block is their contiguous centre run."""
    array = np.asarray(ref.data)
    r0, r1, _, channels = array.shape[:4]
    n_size, s_size, loc_size = sizes
    want_channels, e1, e0 = grid
    if channels != want_channels:
        raise ValueError(
            f"{source}: inconsistent channel counts: reference lines have {channels} channels, "
            f"imaging lines {want_channels}"
        )
    if r0 != e0:
        raise ValueError(f"{source}: reference readout length {r0} differs from the imaging readout length {e0}")
    _check_finite(array, f"{source} (reference lines)")
    headers = np.asarray(ref.headers, dtype=object).reshape(array.shape[1], array.shape[2], *array.shape[4:])
    blocks = []
    entry = 0
    for loc in range(loc_size):
        for s in range(s_size):
            for n in range(n_size):
                rn, rs, rl = (
                    min(n, array.shape[4] - 1),
                    min(s, array.shape[5] - 1),
                    min(loc, array.shape[6] - 1),
                )
                grid_lines = np.zeros((want_channels, e1, e0), dtype=np.complex64)
                sampled = np.zeros(e1, dtype=bool)
                offset = offsets[entry] if offsets[entry] is not None else 0
                for j in range(r1):
                    head = headers[j, 0, rn, rs, rl]
                    if not _filled(head):
                        continue
                    row = head.idx.kspace_encode_step_1 + offset
                    if 0 <= row < e1:
                        grid_lines[:, row] = array[:, j, 0, :, rn, rs, rl].T
                        sampled[row] = True
                rows, _ = calibration_region(np.repeat(sampled[:, None], e0, axis=1))
                blocks.append(grid_lines[:, rows])
                entry += 1
    height = min(block.shape[1] for block in blocks)
    if height < MIN_CALIBRATION:
        raise ValueError(
            f"{source}: the reference lines hold no contiguous calibration region around the k-space centre "
            f"(found {height} lines, need at least {MIN_CALIBRATION})"
        )
    return np.stack([_centre_rows(block, height) for block in blocks])


def _centre_rows(block: np.ndarray, height: int) -> np.ndarray:
    start = (block.shape[1] - height) // 2
    return block[:, start : start + height]


def concatenate(parts: Sequence[KSpace], *, source: str | None = None) -> KSpace:
    """Stack ``KSpace`` objects along slices (same grid, coils and geometry).

    Calibration blocks are cropped to their common centred size.
    """
    if not parts:
        raise ValueError(f"{source or 'k-space'}: no imaging data")
    first = parts[0]
    for part in parts[1:]:
        if part.data.shape[1:] != first.data.shape[1:]:
            raise ValueError(
                f"{source or part.source}: inconsistent (coils, ky, kx) between buffers: "
                f"{tuple(part.data.shape[1:])} vs {tuple(first.data.shape[1:])}"
            )
    height = min(p.calibration.shape[-2] for p in parts)
    width = min(p.calibration.shape[-1] for p in parts)

    def crop(block: torch.Tensor) -> torch.Tensor:
        top, left = (block.shape[-2] - height) // 2, (block.shape[-1] - width) // 2
        return block[..., top : top + height, left : left + width]

    return replace(
        first,
        data=torch.cat([p.data for p in parts]),
        mask=torch.cat([p.mask for p in parts]),
        calibration=torch.cat([crop(p.calibration) for p in parts]),
        headers=tuple(h for p in parts for h in p.headers),
        source=source or first.source,
    )


# ------------------------------------------------------------------------------------------- HDF5
def _is_hdf5(path: Path) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def _open_hdf5(path: Path) -> Any:
    import h5py

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if not h5py.is_hdf5(path):
            raise ValueError(f"{path}: not an HDF5 file (expected ISMRMRD raw or fastMRI .h5)")
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read as HDF5 (truncated or corrupt file?): {exc}") from None


def check_acquisition_rows(rows: Any, where: str) -> None:
    """Refuse an acquisitions dataset that is not ISMRMRD's compound of ``head``, ``traj`` and ``data``."""
    names = getattr(getattr(rows, "dtype", None), "names", None) or ()
    if getattr(rows, "ndim", 0) != 1 or not {"head", "data"} <= set(names):
        raise ValueError(
            f"{where}: expected ISMRMRD acquisitions (a 1-D compound dataset with fields head, traj, data), "
            f"found {getattr(rows, 'dtype', type(rows))} of shape {getattr(rows, 'shape', '?')}"
        )


def _read_acquisitions(path: Path, group: Any) -> list[Any]:
    import ismrmrd

    if "data" not in group:
        raise ValueError(f"{path}: ISMRMRD group '{group.name}' has no acquisitions ('data' dataset missing)")
    check_acquisition_rows(group["data"], f"{path}: '{group.name}/data'")
    try:
        rows = group["data"][()]
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: acquisitions cannot be read (truncated or corrupt file?): {exc}") from None
    acquisitions = []
    for number, row in enumerate(rows):
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(row["head"])
        values = np.asarray(row["data"], dtype=np.float32)
        expected = 2 * head.active_channels * head.number_of_samples
        if values.size != expected:
            raise ValueError(
                f"{path}: acquisition #{number} holds {values.size // 2} complex samples but its header says "
                f"{head.active_channels} channels × {head.number_of_samples} samples"
            )
        data = values.view(np.complex64).reshape(head.active_channels, head.number_of_samples)
        if not np.isfinite(data).all():
            raise ValueError(
                f"{path}: acquisition #{number} (line {head.idx.kspace_encode_step_1}, "
                f"slice {head.idx.slice}, "
                f"repetition {head.idx.repetition}) contains NaN or Inf samples"
            )
        traj = None
        if head.trajectory_dimensions:
            traj = np.asarray(row["traj"], np.float32).reshape(head.number_of_samples, head.trajectory_dimensions)
        acquisitions.append(ismrmrd.Acquisition(head, data.copy(), traj))
    return acquisitions


def _ground_truth(file: Any, group: str, kspace: KSpace, path: Path) -> np.ndarray | None:
    """Magnitude ground truth ``(slices, recon_y, recon_x)`` matched to the KSpace entries, if stored."""
    for name in (*(f"{group}/{name}" for name in GROUND_TRUTH_DATASETS), LEGACY_GROUND_TRUTH):
        if name not in file or not hasattr(file[name], "dtype"):
            continue
        raw = file[name][()]
        if raw.dtype.names and {"real", "imag"} <= set(raw.dtype.names):
            raw = raw["real"] + 1j * raw["imag"]
        image = np.abs(np.asarray(raw)).astype(np.float32)
        if image.ndim == 2:
            image = image[None]
        image = image.reshape(-1, *image.shape[-2:])
        recon_x, recon_y = kspace.geometry.recon_matrix[:2]
        if image.shape[-2:] != (recon_y, recon_x):
            log.warning(
                "%s: ignoring ground truth '%s' of shape %s: expected (.., %d, %d) like the recon matrix",
                path,
                name,
                image.shape,
                recon_y,
                recon_x,
            )
            return None
        slices = [int(h.idx.slice) if h is not None else 0 for h in kspace.headers]
        if image.shape[0] not in (1, max(slices) + 1):
            log.warning(
                "%s: ignoring ground truth '%s': %d images for %d slices",
                path,
                name,
                image.shape[0],
                max(slices) + 1,
            )
            return None
        return np.stack([image[s if image.shape[0] > 1 else 0] for s in slices])
    return None


class ScanAssembler:
    """Raw acquisitions, one at a time, → one ``KSpace`` per volume as soon as the volume's last line is in.

    The one path from a raw ISMRMRD stream to ``KSpace``: files (:func:`read_ismrmrd`,
    :func:`read_ismrmrd_stream`) push all their acquisitions, the MRD server (``semrecon serve --mrd``) pushes
    them as they arrive. Each acquisition goes through the Gadgetron-equivalent steps of
    :mod:`semrecon_core.data.buffers`: discard samples dropped, noise scans consumed for prewhitening
    (dwell-time factor), a partial echo zero-padded to the encoded readout (AsymmetricEchoAdjustRO), the
    readout oversampling removed by the encoded/recon FOV ratio, lines collected per ``trigger`` volume
    (separate PARALLEL_CALIBRATION lines to the reference, CALIBRATION_AND_IMAGING lines to both). A volume
    ends when its trigger counter changes, when a line is flagged ``ACQ_LAST_IN_<trigger>`` or
    ``ACQ_LAST_IN_MEASUREMENT``, or when every slice has had its ``ACQ_LAST_IN_SLICE`` line
    (:class:`~semrecon_core.data.buffers.TriggerAccumulator`); then every slice / contrast / average of it
    becomes one entry of its ``KSpace`` (:func:`from_recon_buffer`, the constructor the gadget uses).
    :meth:`finish` returns what the end of the stream completes.

    Args:
        header: the ISMRMRD XML header (text or parsed), checked here
            (:func:`~semrecon_core.data.buffers.check_header`).
        source: the name in messages and in the ``KSpace`` (a path, ``scan 3``).
        trigger: the counter that separates volumes (``repetition``; ``none``: one volume at the end).

    Errors are ``ValueError`` s naming ``source`` and the acquisition.
    """

    def __init__(self, header: Any, *, source: str = "stream", trigger: str = "repetition") -> None:
        import ismrmrd

        from semrecon_core.data import buffers

        self.source = source
        try:
            self.header = buffers.check_header(header)
            self.full = buffers.full_readout(self.header)
            self.ratio = buffers.readout_oversampling(self.header)
            self.accumulator = buffers.TriggerAccumulator(trigger, header=self.header, on_flags=True)
        except ValueError as exc:
            raise ValueError(naming(source, exc)) from None
        self.xml = header.decode("utf-8") if isinstance(header, bytes) else header
        if not isinstance(self.xml, str):
            self.xml = ismrmrd.xsd.ToXML(self.header)
        self.noise = buffers.NoiseAdjuster(self.header)
        self.lengths = buffers.ReadoutLengths(source, self.full)
        self.acquisitions = 0
        self.volumes = 0

    def push(self, acq: Any) -> list[KSpace]:
        """Add one acquisition; the volumes it completes (usually none)."""
        from semrecon_core.data import buffers

        number = self.acquisitions
        self.acquisitions += 1
        self.lengths.check(number, acq.getHead())
        _check_finite(np.asarray(acq.data), f"{self.source}: acquisition #{number}")
        try:
            adjusted = self.noise.push(acq)
            if adjusted is None:
                return []
            adjusted = buffers.remove_oversampling(buffers.adjust_asymmetric_echo(adjusted, self.full), self.ratio)
            return [self._volume(bucket) for bucket in self.accumulator.push(adjusted) if bucket.data]
        except ValueError as exc:
            raise ValueError(naming(self.source, exc)) from None

    def finish(self) -> list[KSpace]:
        """The volume the end of the stream completes (none when every volume has gone out already)."""
        try:
            return [self._volume(bucket) for bucket in self.accumulator.flush() if bucket.data]
        except ValueError as exc:
            raise ValueError(naming(self.source, exc)) from None

    def _volume(self, bucket: Any) -> KSpace:
        from semrecon_core.data.buffers import bucket_to_buffer

        recon_data = bucket_to_buffer(bucket, self.header, split_slices=True)
        parts = [from_recon_buffer(bit.data, bit.ref, self.xml, source=self.source) for bit in recon_data.bits]
        self.volumes += 1
        kspace = concatenate(parts, source=self.source)
        return replace(kspace, info={"noise_scans": self.noise.noise_scans, "readout_oversampling": self.ratio})


def _kspace_from_acquisitions(acquisitions: list[Any], xml: str, source: str, trigger: str) -> KSpace:
    """Acquisitions → :class:`ScanAssembler` → one KSpace (every entry of every volume a slice)."""
    assembler = ScanAssembler(xml, source=source, trigger=trigger)
    volumes = [volume for acq in acquisitions for volume in assembler.push(acq)]
    volumes += assembler.finish()
    kspace = concatenate(volumes, source=source)
    return replace(kspace, info=dict(volumes[-1].info))


def read_ismrmrd(path: str | Path, *, dataset: str = "dataset", trigger: str = "repetition") -> KSpace:
    """Read an ISMRMRD raw HDF5 file: acquisitions → Gadgetron-equivalent buffers → :func:`from_recon_buffer`.

    Every slice, repetition, average (and other counters) becomes one KSpace slice entry.
    """
    path = Path(path)
    with _open_hdf5(path) as file:
        if dataset not in file:
            found = ", ".join(file.keys()) or "nothing"
            raise ValueError(f"{path}: no ISMRMRD group '{dataset}' (found: {found})")
        group = file[dataset]
        if "xml" not in group:
            raise ValueError(f"{path}: no ISMRMRD XML header ('{dataset}/xml' missing)")
        xml = group["xml"][0]
        xml = xml.decode("utf-8") if isinstance(xml, bytes) else str(xml)
        kspace = _kspace_from_acquisitions(_read_acquisitions(path, group), xml, str(path), trigger)
        truth = _ground_truth(file, dataset, kspace, path)
    if truth is not None:
        kspace = replace(kspace, ground_truth=torch.from_numpy(truth))
    return kspace


def read_ismrmrd_stream(path: str | Path, *, trigger: str = "repetition") -> KSpace:
    """Read an ISMRMRD binary stream file: header message, acquisitions, optional CLOSE.

    Such files are written by ``ismrmrd.serialization.ProtocolSerializer`` or a client's ``-o`` dump.
    """
    import ismrmrd
    from ismrmrd.serialization import ProtocolDeserializer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    xml: str | None = None
    acquisitions: list[Any] = []
    with path.open("rb") as handle:
        stream = ProtocolDeserializer(handle)
        try:
            for item in stream.deserialize():
                if isinstance(item, ismrmrd.Acquisition):
                    if xml is None:
                        raise ValueError(f"{path}: acquisition before the ISMRMRD header in the stream")
                    _check_finite(np.asarray(item.data), f"{path}: acquisition #{len(acquisitions)}")
                    acquisitions.append(item)
                elif isinstance(item, ismrmrd.xsd.ismrmrdHeader):
                    xml = ismrmrd.xsd.ToXML(item)
        except EOFError:
            pass  # streams written without a CLOSE message end here
        except (ValueError, struct.error) as exc:
            raise ValueError(
                f"{path}: not an HDF5 file, and not a readable ISMRMRD stream (after {len(acquisitions)} "
                f"acquisitions): {exc}"
            ) from None
    if xml is None:
        raise ValueError(f"{path}: not an HDF5 file, and no ISMRMRD header message found (not an ISMRMRD stream)")
    return _kspace_from_acquisitions(acquisitions, xml, str(path), trigger)


def read_fastmri(path: str | Path) -> KSpace:
    """Read a fastMRI multicoil ``.h5`` (``kspace`` ``(slices, coils, rows, cols)``, readout along rows).

    The phase-encode axis becomes ``ky`` (axis -2), readout oversampling is removed as the header says,
    the mask comes from the ``mask`` dataset or the non-zero columns, ``reconstruction_rss`` is the
    ground truth when present.
    """
    from semrecon_core.data.buffers import crop_readout, parse_header, readout_oversampling

    path = Path(path)
    with _open_hdf5(path) as file:
        if "ismrmrd_header" not in file:
            raise ValueError(f"{path}: fastMRI file without 'ismrmrd_header'")
        raw = file["ismrmrd_header"][()]
        xml = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        try:
            header = parse_header(xml)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        kspace = np.asarray(file["kspace"][()])
        if kspace.ndim == 3:
            raise ValueError(f"{path}: single-coil fastMRI data (slices, rows, cols) are not supported")
        if kspace.ndim != 4:
            raise ValueError(f"{path}: 'kspace' expected (slices, coils, rows, cols), found shape {kspace.shape}")
        column_mask = np.asarray(file["mask"][()], dtype=bool) if "mask" in file else None
        truth = np.asarray(file["reconstruction_rss"][()], np.float32) if "reconstruction_rss" in file else None
    _check_finite(kspace, str(path))
    data = np.swapaxes(kspace, -1, -2)  # (slices, coils, cols = ky, rows = kx)
    if column_mask is None:
        column_mask = np.abs(data).sum(axis=(0, 1, 3)) > 0
    if column_mask.shape != (data.shape[-2],):
        raise ValueError(
            f"{path}: 'mask' expected {data.shape[-2]} entries (one per column), found {column_mask.shape}"
        )
    ratio = readout_oversampling(header)
    if ratio > 1:
        data = crop_readout(data, int(round(data.shape[-1] / ratio)))
    geometry = _geometry_from_header(header, readout_samples=data.shape[-1])
    if truth is not None:
        truth = np.swapaxes(truth, -1, -2)
        recon_x, recon_y = geometry.recon_matrix[:2]
        if truth.shape[-2:] != (recon_y, recon_x):
            log.warning(
                "%s: ignoring reconstruction_rss of shape %s (recon matrix %dx%d)",
                path,
                truth.shape,
                recon_y,
                recon_x,
            )
            truth = None
    mask = np.broadcast_to(column_mask[None, :, None], (data.shape[0], data.shape[-2], data.shape[-1]))
    return from_arrays(
        data,
        mask,
        geometry,
        source=str(path),
        ground_truth=truth,
        xml_header=xml,
        info={"readout_oversampling": ratio},
    )


def _plain_geometry(ny: int, nx: int) -> Geometry:
    return Geometry((nx, ny, 1), (nx, ny, 1), (float(nx), float(ny), 1.0), (float(nx), float(ny), 1.0))


def _load_mask(mask: str | Path | np.ndarray | None, shape: tuple[int, int, int], source: str) -> np.ndarray | None:
    """A mask broadcast to ``(slices, ky, kx)``.

    Arrays and ``.npy`` files are ``(ky,)`` (lines), ``(ky, kx)`` or ``(slices, ky, kx)``; BART ``.cfl``
    masks are in BART's order (:func:`_bart_mask`).
    """
    if mask is None:
        return None
    slices, ny, nx = shape
    if isinstance(mask, (str, Path)):
        mask_path = Path(mask)
        source = str(mask_path)
        bart = mask_path.suffix in (".cfl", ".hdr")
        try:
            array = read_cfl(mask_path) if bart else np.load(mask_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{mask_path}: cannot read the mask: {exc}") from None
        if bart:
            return _bart_mask(array, shape, source)
    else:
        array = np.asarray(mask)
    array = np.abs(np.squeeze(np.asarray(array))) > 0 if np.iscomplexobj(array) else np.squeeze(array) != 0
    if array.shape == (ny,):
        array = array[:, None]
    try:
        return np.broadcast_to(array, shape).copy()
    except ValueError:
        raise ValueError(
            f"{source}: mask shape {array.shape} does not fit the k-space (expected ({ny},), ({ny}, {nx}) "
            f"or ({slices}, {ny}, {nx}))"
        ) from None


def _bart_mask(array: np.ndarray, shape: tuple[int, int, int], source: str) -> np.ndarray:
    """A BART mask (readout, phase 1, ..., slices at index 13) as ``(slices, ky, kx)``.

    Dimension 0 is the readout (kx; 1 for ``bart upat``/``bart poisson`` line masks, which then hold for
    every readout sample), dimension 1 the phase encoding (ky), as in ``bart pattern``'s output.
    """
    slices, ny, nx = shape
    dims = list(array.shape) + [1] * max(0, 16 - array.ndim)
    extra = [i for i, n in enumerate(dims) if n > 1 and i not in (0, 1, 13)]
    if extra:
        raise ValueError(
            f"{source}: unsupported BART mask dimensions {extra} (sizes {[dims[i] for i in extra]}); "
            "expected readout, phase and slices only"
        )
    readout, phase, count = dims[0], dims[1], dims[13]
    fits = readout in (1, nx) and phase in (1, ny) and count in (1, slices)
    if not fits:
        raise ValueError(
            f"{source}: BART mask dimensions (readout {readout}, phase {phase}, slices {count}) do not fit the "
            f"k-space (readout {nx}, phase {ny}, slices {slices}; 1 = the same for all)"
        )
    planes = np.abs(array.reshape(readout, phase, count, order="F")) > 0
    return np.broadcast_to(planes.transpose(2, 1, 0), shape).copy()  # (slices, ky = phase, kx = readout)


def read_npy(path: str | Path, mask: str | Path | np.ndarray | None = None) -> KSpace:
    """Read ``.npy`` k-space ``(coils, ky, kx)`` or ``(slices, coils, ky, kx)`` (complex).

    ``mask``: a ``.npy`` path or array of shape ``(ky,)``, ``(ky, kx)`` or ``(slices, ky, kx)``, or a BART
    ``.cfl`` mask in BART's (readout, phase, ...) order; without it the non-zero samples are the mask.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npy file (truncated?): {exc}") from None
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise ValueError(
            f"{path}: expected k-space (coils, ky, kx) or (slices, coils, ky, kx), found shape {data.shape}"
        )
    if not np.iscomplexobj(data):
        raise ValueError(f"{path}: expected complex k-space, found dtype {data.dtype}")
    slices, _, ny, nx = data.shape
    return from_arrays(data, _load_mask(mask, (slices, ny, nx), str(path)), _plain_geometry(ny, nx), source=str(path))


def read_cfl(path: str | Path) -> np.ndarray:
    """A BART ``.cfl``/``.hdr`` pair as a complex64 array with BART's dimension order."""
    base = Path(path).with_suffix("")
    hdr, cfl = base.with_suffix(".hdr"), base.with_suffix(".cfl")
    for needed in (hdr, cfl):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: no such file (a BART array needs both .hdr and .cfl)")
    lines = [line.strip() for line in hdr.read_text().splitlines()]
    try:
        dims = [int(v) for v in lines[lines.index("# Dimensions") + 1].split()]
    except (ValueError, IndexError):
        raise ValueError(f"{hdr}: no '# Dimensions' line followed by integers") from None
    count = int(np.prod(dims))
    data = np.fromfile(cfl, dtype=np.complex64)
    if data.size != count:
        raise ValueError(f"{cfl}: holds {data.size} complex values, the header {hdr.name} says {dims} = {count}")
    return data.reshape(dims, order="F")


def read_bart(path: str | Path, mask: str | Path | np.ndarray | None = None) -> KSpace:
    """Read BART k-space (dims: readout, phase 1, phase 2 = 1, coils, ..., slices at index 13).

    The readout becomes ``kx`` and phase 1 ``ky`` (the KSpace is ``(slices, coils, ky, kx)``). ``mask``: a
    BART ``.cfl`` mask in the same BART order (``bart pattern``, ``bart upat``, ``bart poisson``), or a
    ``.npy`` path or array in semrecon's ``(ky,)``, ``(ky, kx)`` or ``(slices, ky, kx)``.
    """
    path = Path(path)
    array = read_cfl(path)
    dims = list(array.shape) + [1] * max(0, 14 - array.ndim)
    array = array.reshape(dims, order="F")
    extra = [i for i, n in enumerate(dims) if n > 1 and i not in (0, 1, 3, 13)]
    if extra:
        raise ValueError(
            f"{path}: unsupported BART dimensions {extra} (sizes {[dims[i] for i in extra]}); "
            "expected readout, phase, coils and slices only"
        )
    data = array.reshape(dims[0], dims[1], dims[3], -1, order="F")  # (x, y, coils, slices) as dims 0, 1, 3, 13
    data = np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0)))  # (slices, coils, ky, kx)
    slices, _, ny, nx = data.shape
    return from_arrays(data, _load_mask(mask, (slices, ny, nx), str(path)), _plain_geometry(ny, nx), source=str(path))


def load_kspace(path: str | Path, **options: Any) -> KSpace:
    """Read any supported k-space file, dispatching on its content.

    ``.npy`` → :func:`read_npy`, ``.cfl``/``.hdr`` → :func:`read_bart` (both accept ``mask=``);
    HDF5 with ``kspace`` → :func:`read_fastmri`; HDF5 with an ISMRMRD group → :func:`read_ismrmrd`
    (accepts ``dataset=``, ``trigger=``); a non-HDF5 ``.mrd``/``.bin``/``.dat`` → :func:`read_ismrmrd_stream`.
    Unknown options are an error.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _call(read_npy, path, options, ("mask",))
    if suffix in (".cfl", ".hdr"):
        return _call(read_bart, path, options, ("mask",))
    if path.is_file() and not _is_hdf5(path):
        if suffix in STREAM_SUFFIXES:
            return _call(read_ismrmrd_stream, path, options, ("trigger",))
        raise ValueError(
            f"{path}: not an HDF5 file (expected ISMRMRD raw or fastMRI .h5, .npy, .cfl, "
            f"or an ISMRMRD stream {'/'.join(STREAM_SUFFIXES)}); truncated or wrong format?"
        )
    with _open_hdf5(path) as file:
        is_fastmri = "kspace" in file
        groups = [name for name, item in file.items() if hasattr(item, "keys") and "data" in item]
    if is_fastmri:
        return _call(read_fastmri, path, options, ())
    if "dataset" not in options and "dataset" not in groups and len(groups) == 1:
        options = {**options, "dataset": groups[0]}  # an ISMRMRD group under another name
    if options.get("dataset", "dataset") in groups:
        return _call(read_ismrmrd, path, options, ("dataset", "trigger"))
    raise ValueError(
        f"{path}: HDF5 file without an ISMRMRD header or fastMRI k-space "
        "(expected 'dataset/xml' + 'dataset/data', or 'kspace' + 'ismrmrd_header')"
    )


def _call(reader: Any, path: Path, options: dict[str, Any], allowed: tuple[str, ...]) -> KSpace:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{path}: option(s) {', '.join(unknown)} do not apply to this file type "
            f"(allowed: {', '.join(allowed) or 'none'})"
        )
    return reader(path, **options)
