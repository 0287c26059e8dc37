"""ISMRMRD images as DICOM: one MR Image Storage series per ``image_series_index``, written atomically.

:func:`write_dicom_series` is the one writer (``semrecon recon --dicom``, ``semrecon replay --dicom``, and any
server that holds ``ismrmrd.Image`` s). What it guarantees:

- **Pixels.** Float magnitudes are stored as uint16 with a per-image ``RescaleSlope``/``RescaleIntercept``
  (intercept = the image's minimum, slope = its range / 65535), so ``pixel · slope + intercept`` gives the
  float back to half a quantisation step (``slope / 2``); the slope and intercept are quantised with the
  values as written (DS strings), not the unrounded ones. uint16 images (a chain's FloatToUShortGadget) are
  stored as they are (slope 1, intercept 0).
- **Geometry.** ISMRMRD's ``position`` is the centre of the image; DICOM's ``ImagePositionPatient`` is the
  centre of the first (top-left) voxel: ``IPP = position − (nx−1)/2·dx·read_dir − (ny−1)/2·dy·phase_dir``
  with ``dx, dy = FOV / matrix``. ``ImageOrientationPatient`` = read_dir then phase_dir (columns run along
  read, rows along phase), ``PixelSpacing`` = (row spacing dy, column spacing dx), ``SliceThickness`` = the
  FOV's z. An image without orientation is refused (semrecon's own images always carry one:
  :func:`~semrecon_core.data.images.to_ismrmrd_images`).
- **Description.** ``SeriesDescription`` names backbone, prior and encoder, with ``RANDOM WEIGHTS`` where the
  encoder has them and ``FALLBACK``/``preview`` for such series; the whole ``GADGETRON_ImageComment`` goes to
  ``ImageComments``; the window comes from the image meta (``GADGETRON_WindowCenter``/``WindowWidth``, in
  the rescaled units), else spans 0 … the maximum.
- **Identity.** Patient, study, series and equipment fields come from the ISMRMRD header where it has them
  (left empty where DICOM allows, never invented). UIDs are derived deterministically (pydicom's
  ``generate_uid`` with entropy sources): the study and frame of reference from the header (or its own
  ``studyInstanceUID``/``frameOfReferenceUID``), a series from them plus its number and the reconstruction's
  comment, an instance from its series plus its ``image_index``; the same scan reconstructed the same way gets
  the same UIDs, another method or λ other ones.
- **Atomicity.** The files of a call go into a temporary directory beside ``DIR`` that replaces ``DIR`` when all
  are written (with the other outputs of a :class:`~semrecon_core.data.images.StagedOutputs`), or are removed.
  An existing ``DIR`` is replaced only when it is empty or holds only ``.dcm`` files (a previous output).

Layout: ``DIR/series<NNN>_image<NNNN>.dcm``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semrecon_core.data.images import StagedOutputs, ascii_text

log = logging.getLogger(__name__)

#: the longest a DICOM LO value (e.g. SeriesDescription) may be
_LO = 64
_PATIENT_POSITIONS = {"HFP", "HFS", "HFDR", "HFDL", "FFP", "FFS", "FFDR", "FFDL"}


def check_dicom_directory(directory: str | Path, *, others: Mapping[str, str | Path | None] | None = None) -> Path:
    """Refuse a ``--dicom`` directory that cannot be written or replaced, before anything is computed.

    It may not exist yet (its parent must), or be a directory that is empty or holds only ``.dcm`` files, and
    may not be one of the command's ``others`` outputs (``{option: path}``).
    """
    directory = Path(directory)
    for option, path in (others or {}).items():
        if path is not None and Path(path).resolve() == directory.resolve():
            raise ValueError(f"--dicom {directory}: is also {option}; name another directory")
    if not directory.parent.resolve().is_dir():
        raise FileNotFoundError(f"--dicom {directory}: directory {directory.parent} does not exist")
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir() or directory.is_symlink():
            raise NotADirectoryError(f"--dicom {directory}: exists and is not a directory")
        foreign = [entry.name for entry in directory.iterdir() if not (entry.is_file() and entry.suffix == ".dcm")]
        if foreign:
            shown = ", ".join(sorted(foreign)[:3]) + (" ..." if len(foreign) > 3 else "")
            raise ValueError(
                f"--dicom {directory}: holds entries other than .dcm files ({shown}); "
                "name a new or empty directory, or one written by semrecon"
            )
    return directory


def write_dicom_series(
    directory: str | Path,
    images: Sequence[Any],
    *,
    xml_header: str | None = None,
    identity: Sequence[str] = (),
    staged: StagedOutputs | None = None,
) -> dict[int, list[Path]]:
    """Write ``images`` (``ismrmrd.Image``) as DICOM MR images, one series per ``image_series_index``.

    Args:
        directory: the directory to create or replace (:func:`check_dicom_directory`).
        images: the images, in the order they are numbered (``image_index``).
        xml_header: the scan's ISMRMRD XML header: patient, study, equipment and sequence fields, and the
            entropy of the study's UIDs.
        identity: further entropy for the study's UIDs when the header does not identify the scan (e.g. the
            input's path for ``.npy`` input without a header).
        staged: outputs to commit the directory with (committed here when ``None``).

    Returns:
        ``{series number: [the files as they are named after the commit]}``.
    """
    from pydicom.uid import generate_uid

    directory = check_dicom_directory(directory)
    if not images:
        raise ValueError(f"--dicom {directory}: no images to write")
    header = _parse_header(xml_header)
    study = _Study.from_header(header, entropy=[xml_header or "", *identity], generate=generate_uid)
    own = staged is None
    outputs = StagedOutputs() if staged is None else staged
    written: dict[int, list[Path]] = {}
    try:
        temp = outputs.directory(directory)
        series_uids: dict[int, str] = {}
        for image in images:
            number = int(image.image_series_index)
            meta = _meta(image)
            if number not in series_uids:
                series_uids[number] = generate_uid(
                    entropy_srcs=[study.study_uid, "series", str(number), meta.get("GADGETRON_ImageComment", "")]
                )
            name = f"series{number:03d}_image{int(image.image_index):04d}.dcm"
            if (temp / name).exists():
                raise ValueError(f"--dicom {directory}: two images numbered {image.image_index} in series {number}")
            dataset = image_dataset(image, study=study, series_uid=series_uids[number], header=header)
            dataset.save_as(temp / name, enforce_file_format=True)
            written.setdefault(number, []).append(directory / name)
    except BaseException:
        if own:
            outputs.discard()
        raise
    if own:
        outputs.commit()
    log.info("DICOM: %d image(s) in %d series → %s", sum(map(len, written.values())), len(written), directory)
    return written


class _Study:
    """The fields every image of one scan shares: patient, study, frame of reference, equipment, sequence."""

    def __init__(self, fields: dict[str, Any], study_uid: str, frame_uid: str) -> None:
        self.fields = fields
        self.study_uid = study_uid
        self.frame_uid = frame_uid

    @classmethod
    def from_header(cls, header: Any, *, entropy: list[str], generate: Any) -> _Study:
        subject = getattr(header, "subjectInformation", None)
        study = getattr(header, "studyInformation", None)
        measurement = getattr(header, "measurementInformation", None)
        system = getattr(header, "acquisitionSystemInformation", None)
        sequence = getattr(header, "sequenceParameters", None)
        conditions = getattr(header, "experimentalConditions", None)

        def value(section: Any, name: str) -> Any:
            found = getattr(section, name, None) if section is not None else None
            if isinstance(found, list):
                found = found[0] if found else None
            return found

        fields: dict[str, Any] = {
            "PatientName": _text(value(subject, "patientName")),
            "PatientID": _text(value(subject, "patientID")),
            "PatientBirthDate": _date(value(subject, "patientBirthdate")),
            "PatientSex": _sex(value(subject, "patientGender")),
            "StudyDate": _date(value(study, "studyDate")),
            "StudyTime": _time(value(study, "studyTime")),
            "StudyID": _text(value(study, "studyID"), 16),
            "AccessionNumber": _text(value(study, "accessionNumber"), 16),
            "ReferringPhysicianName": _text(value(study, "referringPhysicianName")),
            "SeriesDate": _date(value(measurement, "seriesDate")),
            "SeriesTime": _time(value(measurement, "seriesTime")),
            "PatientPosition": _position(value(measurement, "patientPosition")),
            "Manufacturer": _text(value(system, "systemVendor")),
        }
        optional = {
            "PatientWeight": _number(value(subject, "patientWeight_kg")),
            "PatientSize": _number(value(subject, "patientHeight_m")),
            "StudyDescription": _text(value(study, "studyDescription")),
            "BodyPartExamined": _text(value(study, "bodyPartExamined"), 16).upper(),
            "ProtocolName": _text(value(measurement, "protocolName")),
            "SequenceName": _text(value(measurement, "sequenceName"), 16),
            "ManufacturerModelName": _text(value(system, "systemModel")),
            "InstitutionName": _text(value(system, "institutionName")),
            "StationName": _text(value(system, "stationName"), 16),
            "DeviceSerialNumber": _text(value(system, "deviceSerialNumber")),
            "MagneticFieldStrength": _number(value(system, "systemFieldStrength_T")),
            "ImagingFrequency": _number(_scaled(value(conditions, "H1resonanceFrequency_Hz"), 1e-6)),
            "FlipAngle": _number(value(sequence, "flipAngle_deg")),
        }
        fields.update({key: item for key, item in optional.items() if item not in ("", None)})
        fields["RepetitionTime"] = _number(value(sequence, "TR"))
        fields["EchoTime"] = _number(value(sequence, "TE"))
        inversion = _number(value(sequence, "TI"))
        fields["ScanningSequence"] = _scanning_sequence(value(sequence, "sequence_type"), inversion)
        if inversion is not None or fields["ScanningSequence"] == "IR":
            fields["InversionTime"] = inversion
        study_uid = _uid(value(study, "studyInstanceUID")) or generate(entropy_srcs=[*entropy, "study"])
        frame_uid = _uid(value(measurement, "frameOfReferenceUID")) or generate(entropy_srcs=[*entropy, "frame"])
        return cls(fields, study_uid, frame_uid)


def image_dataset(image: Any, *, study: _Study, series_uid: str, header: Any = None) -> Any:
    """The DICOM MR image (a ``pydicom.FileDataset``) of one ``ismrmrd.Image``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    where = f"image {image.image_index} of series {image.image_series_index}"
    pixels, slope, intercept = quantise(_plane(image, where))
    rows, columns = pixels.shape
    geometry = image_geometry(image, where)
    meta = _meta(image)

    instance_uid = generate_uid(entropy_srcs=[series_uid, "image", str(int(image.image_index))])
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = MRImageStorage
    file_meta.MediaStorageSOPInstanceUID = instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=file_meta, preamble=b"\0" * 128)

    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = instance_uid
    ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
    ds.Modality = "MR"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Laterality = ""  # type 2C: unknown here (the ISMRMRD header has no laterality)
    ds.SeriesNumber = int(image.image_series_index)
    ds.InstanceNumber = int(image.image_index)
    for keyword, item in study.fields.items():
        setattr(ds, keyword, "" if item is None else item)
    ds.ContentDate = study.fields.get("SeriesDate") or study.fields.get("StudyDate") or ""
    ds.ContentTime = study.fields.get("SeriesTime") or study.fields.get("StudyTime") or ""
    ds.SoftwareVersions = _software()
    ds.SeriesDescription = series_description(meta)
    comment = meta.get("GADGETRON_ImageComment", "")
    if comment:
        ds.ImageComments = comment[:10240]
        ds.DerivationDescription = comment[:1024]
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTrainLength = ""

    ds.ImagePositionPatient = [_ds(v) for v in geometry["ImagePositionPatient"]]
    ds.ImageOrientationPatient = [_ds(v) for v in geometry["ImageOrientationPatient"]]
    ds.PixelSpacing = [_ds(v) for v in geometry["PixelSpacing"]]
    ds.SliceThickness = _ds(geometry["SliceThickness"])
    ds.SliceLocation = _ds(geometry["SliceLocation"])

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    centre, width = _window(meta, pixels * slope + intercept)
    ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


# -- pixels ----------------------------------------------------------------------------------------


def quantise(plane: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(uint16 pixels, slope, intercept)`` with ``pixels · slope + intercept`` ≈ ``plane`` within ``slope / 2``.

    uint16 planes are kept (slope 1, intercept 0). Slope and intercept are the values as written (DS strings of
    at most 16 characters), and the pixels are computed from those.
    """
    if plane.dtype == np.uint16:
        return plane, 1.0, 0.0
    values = plane.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("pixels: NaN or Inf cannot be stored in DICOM")
    low, high = float(values.min()), float(values.max())
    intercept = float(_ds(low))
    span = high - intercept
    slope = float(_ds(span / 65535 * (1 + 1e-9))) if span > 0 else 1.0
    pixels = np.clip(np.rint((values - intercept) / slope), 0, 65535).astype(np.uint16)
    return pixels, slope, intercept


def _plane(image: Any, where: str) -> np.ndarray:
    data = np.asarray(image.data)
    if data.ndim > 2:
        if math.prod(data.shape[:-2]) != 1:
            raise ValueError(f"{where}: expected one 2-D plane, found data of shape {data.shape}")
        data = data.reshape(data.shape[-2:])
    if np.iscomplexobj(data):
        raise ValueError(f"{where}: complex pixels; DICOM MR images here are magnitudes (write magnitude images)")
    if data.dtype not in (np.float32, np.float64, np.uint16):
        data = data.astype(np.float64)
    return data


def _window(meta: Mapping[str, str], values: np.ndarray) -> tuple[float, float]:
    try:
        centre = float(meta["GADGETRON_WindowCenter"])
        width = float(meta["GADGETRON_WindowWidth"])
    except (KeyError, ValueError):
        top = float(values.max()) if values.size else 0.0
        centre, width = top / 2, top
    return centre, max(width, 1e-6)  # DICOM: the width is at least 1 in display units; never 0


# -- geometry --------------------------------------------------------------------------------------


def image_geometry(image: Any, where: str = "image") -> dict[str, Any]:
    """The DICOM image plane of an ``ismrmrd.Image``: position of the first voxel, orientation, spacing.

    ISMRMRD's ``position`` is the centre of the image, the midpoint of its voxel centres.
    """
    nx, ny = int(image.matrix_size[0]), int(image.matrix_size[1])
    fov = [float(v) for v in image.field_of_view]
    read, phase, normal = (_unit(vector, name, where) for vector, name in _directions(image))
    if nx < 1 or ny < 1 or fov[0] <= 0 or fov[1] <= 0:
        raise ValueError(f"{where}: matrix {nx}×{ny} and field of view {fov[0]}×{fov[1]} mm give no pixel spacing")
    dx, dy = fov[0] / nx, fov[1] / ny
    centre = np.array([float(v) for v in image.position])
    corner = centre - (nx - 1) / 2 * dx * read - (ny - 1) / 2 * dy * phase
    return {
        "ImagePositionPatient": corner.tolist(),
        "ImageOrientationPatient": [*read.tolist(), *phase.tolist()],
        "PixelSpacing": [dy, dx],
        "SliceThickness": fov[2] if fov[2] > 0 else dx,
        "SliceLocation": float(np.dot(corner, np.cross(read, phase))),
        "slice_dir": normal.tolist(),
    }


def _directions(image: Any) -> Iterable[tuple[Any, str]]:
    return ((image.read_dir, "read_dir"), (image.phase_dir, "phase_dir"), (image.slice_dir, "slice_dir"))


def _unit(vector: Any, name: str, where: str) -> np.ndarray:
    array = np.array([float(v) for v in vector])
    norm = float(np.linalg.norm(array))
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"{where}: {name} {tuple(array)} is not a direction; DICOM needs an orientation")
    return array / norm


# -- text fields -----------------------------------------------------------------------------------


def series_description(meta: Mapping[str, str]) -> str:
    """``semrecon <backbone> + <prior> (<encoder>) RANDOM WEIGHTS`` in at most 64 characters.

    Backbone and prior come from ``GADGETRON_SeqDescription`` (``_semrecon_<backbone>_<prior>``), the encoder and
    ``RANDOM WEIGHTS``, ``FALLBACK`` or ``preview`` from ``GADGETRON_ImageComment``; images of other gadgets keep
    the comment's first part.
    """
    comment = meta.get("GADGETRON_ImageComment", "")
    sequence = meta.get("GADGETRON_SeqDescription", "")
    parts = sequence.split("_")
    if len(parts) == 4 and parts[1] == "semrecon":
        text = f"semrecon {parts[2]} + {parts[3]}"
    else:
        text = comment.split(";")[0].strip() or "semrecon"
    encoder = re.search(r"encoder \(([^,)]+)", comment)
    suffix = ""
    if comment.startswith("FALLBACK"):
        suffix += " FALLBACK"
    elif comment.startswith("semrecon preview"):
        suffix += " preview"
    if "RANDOM WEIGHTS" in comment:
        suffix += " RANDOM WEIGHTS"
    if encoder:
        name = Path(encoder.group(1).strip()).name or encoder.group(1).strip()
        room = _LO - len(text) - len(suffix) - 3
        if room >= 4:
            text += f" ({name if len(name) <= room else name[: room - 3] + '...'})"
    return ascii_text(text[: _LO - len(suffix)] + suffix)


def _meta(image: Any) -> dict[str, str]:
    meta = getattr(image, "meta", None) or {}
    out: dict[str, str] = {}
    for key in meta:
        item = meta[key]
        out[str(key)] = ascii_text(str(item[0] if isinstance(item, list) and item else item))
    return out


def _parse_header(xml_header: str | None) -> Any:
    if not xml_header:
        return None
    import ismrmrd

    try:
        return ismrmrd.xsd.CreateFromDocument(xml_header)
    except Exception as exc:  # noqa: BLE001 - a header the parser refuses is named, with the parser's reason
        raise ValueError(f"ISMRMRD header: cannot be parsed for the DICOM fields ({exc})") from None


def _text(item: Any, limit: int = _LO) -> str:
    return "" if item is None else ascii_text(str(item)).replace("\\", "/").strip()[:limit]


def _date(item: Any) -> str:
    digits = re.sub(r"\D", "", str(item or ""))[:8]
    return digits if len(digits) == 8 else ""


def _time(item: Any) -> str:
    text = str(item or "")
    match = re.match(r"(\d{2}):?(\d{2}):?(\d{2})?(\.\d+)?", text)
    if not match:
        return ""
    return "".join(part or "" for part in match.groups())[:14]


def _sex(item: Any) -> str:
    text = str(getattr(item, "value", item) or "").upper()
    return text if text in ("M", "F", "O") else ""


def _position(item: Any) -> str:
    text = str(getattr(item, "value", item) or "").upper()
    return text if text in _PATIENT_POSITIONS else ""


def _number(item: Any) -> str | None:
    try:
        value = float(item)
    except (TypeError, ValueError):
        return None
    return _ds(value) if math.isfinite(value) else None


def _scaled(item: Any, factor: float) -> float | None:
    try:
        return float(item) * factor
    except (TypeError, ValueError):
        return None


def _scanning_sequence(kind: Any, inversion: str | None) -> str:
    """SE, GR, EP or IR from the header's ``sequence_type``; RM (research mode) when it does not say."""
    text = str(kind or "").lower()
    if inversion is not None or "inversion" in text:
        return "IR"
    if "epi" in text or "echoplanar" in text:
        return "EP"
    if "spin" in text or text.endswith("se"):
        return "SE"
    if any(word in text for word in ("flash", "gradient", "gre", "ssfp", "fisp", "spgr")):
        return "GR"
    return "RM"


def _uid(item: Any) -> str | None:
    from pydicom.uid import UID

    text = str(item or "").strip()
    return text if text and UID(text).is_valid else None


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    return str(format_number_as_ds(float(value) + 0.0))  # + 0.0: no "-0"


def _software() -> str:
    from semrecon_core import __version__

    return f"semrecon {__version__}"[:_LO]
