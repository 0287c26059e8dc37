"""A blinded reader kit: the images of a reader study under random ids, with the key kept apart.

``semrecon readers export`` gathers magnitude images per method and case — from a ``semrecon study`` folder (the
test items its ``results.json`` lists: method = backbone and prior, case = study case) or from ``--method
NAME=FILE[,FILE...]`` groups paired by position (the i-th file of every method is case i) — and writes ``KIT/``:

- ``kit.json``: what the scoring server needs and a reader may see: the criteria, the layout, the screens (lists
  of image ids, already in a random order) and the seed of the per-reader presentation order. No method, file or
  case name.
- ``images/<id>.png``: 8-bit grey levels, no metadata. Every image of a case (all methods, all slices) shares one
  window: 0 to the 99.5th percentile of their pooled magnitudes, so methods are displayed alike and the window
  says nothing about the method. ``dicom/<id>.dcm`` (when an input was DICOM, or with ``--dicom``): a new
  Secondary Capture object with the same pixels in 12 bits, new random UIDs, patient name ``Blinded`` and the
  image id as patient id; nothing of the input's header but the pixel spacing is copied.
- ``key.json`` (mode 0600): image id → method, its group, case, slice, input file and window. The server never
  sends it; give readers the ``dicom/`` folder, never the kit.

Image ids are random (``secrets``), files are written in a random order, and the kit is built in a temporary
folder renamed into place, so an interrupted export leaves nothing. A method name ``GROUP/NAME`` (e.g.
``unet/semantic``) puts the method into a group: the analysis compares the methods of a group with each other
(study exports group by backbone). Methods of a case must have images of one shape; methods whose magnitudes
differ by more than a factor of :data:`SCALE_WARNING` on a case are reported, since a shared window would then
tell them apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "semrecon-reader-kit/1"
KEY_FORMAT = "semrecon-reader-key/1"
LAYOUTS = ("single", "side-by-side")
PERCENTILE = 99.5
"""The window of a case spans 0 to this percentile of its pooled magnitudes."""
SCALE_WARNING = 2.0
DICOM_LEVELS = 4095
ID_PATTERN = re.compile(r"[0-9a-f]{16}")
METHOD_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+ -]*(/[A-Za-z0-9][A-Za-z0-9_.+ -]*)?")

CRITERIA: tuple[dict[str, str], ...] = (
    {"key": "artifacts", "title": "Presence of artifacts", "low": "severe", "high": "none"},
    {"key": "sharpness", "title": "Sharpness of anatomical structures", "low": "blurred", "high": "sharp"},
    {"key": "confidence", "title": "Diagnostic confidence", "low": "non-diagnostic", "high": "full"},
    {"key": "quality", "title": "Overall image quality", "low": "poor", "high": "excellent"},
)
"""The paper's four criteria, each scored 1–5 (5 best)."""


@dataclass(frozen=True)
class Picture:
    """One magnitude image of one method on one case (one slice).

    Attributes:
        method: the method's name (``GROUP/NAME`` or ``NAME``).
        case: the case it pairs on (every method has the same cases).
        slice: slice index within the case.
        source: the input file (recorded in the key only).
        image: ``(y, x)`` float32 magnitudes.
        from_dicom: whether the input was DICOM.
        spacing: pixel spacing (mm, row then column) when the input recorded it.
    """

    method: str
    case: str
    slice: int
    source: str
    image: np.ndarray = field(repr=False)
    from_dicom: bool = False
    spacing: tuple[float, float] | None = None

    @property
    def group(self) -> str:
        """The method's group (the part before ``/``; empty for an ungrouped name)."""
        return self.method.rpartition("/")[0]


@dataclass(frozen=True)
class Kit:
    """The public part of a kit (``kit.json``): what the scoring server may send to a reader."""

    folder: Path
    criteria: tuple[dict[str, str], ...]
    layout: str
    seed: int
    screens: tuple[tuple[str, ...], ...]

    @property
    def ids(self) -> frozenset[str]:
        """Every image id of the kit."""
        return frozenset(i for screen in self.screens for i in screen)

    def png(self, image_id: str) -> Path | None:
        """The PNG of an id of this kit, ``None`` for anything else (never a path built from unchecked text)."""
        if not ID_PATTERN.fullmatch(image_id) or image_id not in self.ids:
            return None
        return self.folder / "images" / f"{image_id}.png"

    def reader_order(self, reader: str) -> tuple[int, list[list[str]]]:
        """``(seed, screens)``: the reader's presentation order (screens and images within them shuffled).

        The seed is derived from the kit's seed and the reader's name, so a reader's order is the same after a
        restart and can be reproduced from what the kit and the score database record.
        """
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{reader}".encode()).digest()[:4], "big")
        rng = random.Random(seed)
        screens = [list(screen) for screen in self.screens]
        rng.shuffle(screens)
        for screen in screens:
            rng.shuffle(screen)
        return seed, screens


def load_kit(folder: str | Path) -> Kit:
    """Read ``KIT/kit.json`` (checked: format, criteria, layout, ids and their PNGs)."""
    folder = Path(folder)
    path = folder / "kit.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{folder}: not a reader kit (no kit.json; write one with 'semrecon readers export')"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(
            f"{path}: format {document.get('format') if isinstance(document, dict) else None!r}, expected {FORMAT!r}"
        )
    try:
        criteria = tuple({k: str(v) for k, v in c.items()} for c in document["criteria"])
        layout = str(document["layout"])
        seed = int(document["seed"])
        screens = tuple(tuple(str(i) for i in screen) for screen in document["screens"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: malformed field {exc}") from None
    if layout not in LAYOUTS:
        raise ValueError(f"{path}: layout {layout!r}, expected one of {', '.join(LAYOUTS)}")
    if not screens or any(not s for s in screens):
        raise ValueError(f"{path}: screens: expected non-empty lists of image ids")
    kit = Kit(folder, criteria, layout, seed, screens)
    for image_id in sorted(kit.ids):
        png = kit.png(image_id)
        if png is None:
            raise ValueError(f"{path}: screens: {image_id!r} is not an image id (16 hex digits)")
        if not png.is_file():
            raise ValueError(f"{path}: image {image_id}: {png} is missing")
    return kit


def load_key(folder: str | Path) -> dict[str, Any]:
    """Read ``KIT/key.json``: ``{"images": {id: {"method", "group", "case", "slice", ...}}, ...}``."""
    path = Path(folder) / "key.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder}: the kit has no key.json (the analysis needs it)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != KEY_FORMAT or "images" not in document:
        raise ValueError(f"{path}: not a reader-kit key (format {KEY_FORMAT!r} with 'images')")
    return document


# --------------------------------------------------------------------------------------------- inputs
def parse_method(text: str) -> tuple[str, list[Path]]:
    """``NAME=FILE[,FILE...]`` → ``(NAME, files)`` (checked: the name's characters, files exist)."""
    name, sep, files = text.partition("=")
    name = name.strip()
    if not sep or not name or not files.strip():
        raise ValueError(f"--method {text!r}: expected NAME=FILE[,FILE...]")
    if not METHOD_PATTERN.fullmatch(name):
        raise ValueError(f"--method {name!r}: a name is letters, digits, '_.+ -', optionally GROUP/NAME")
    paths = [Path(f.strip()) for f in files.split(",") if f.strip()]
    for path in paths:
        if not path.exists():
            raise ValueError(f"--method {name}: {path}: no such file or directory")
    return name, paths


def read_input(path: Path) -> tuple[np.ndarray, bool, tuple[float, float] | None]:
    """``(magnitudes (slices, y, x), from_dicom, pixel spacing)`` of an input file or DICOM series folder.

    Accepts ``.npy`` (real or complex, ``(y, x)`` or ``(slices, y, x)``), ISMRMRD image files (``.h5``/``.mrd``
    without raw data), DICOM files and folders holding one DICOM series (ordered by InstanceNumber).
    """
    from semrecon_core.priors.bank_sources import _is_dicom, _read_dicom, _read_hdf5_images

    spacing: tuple[float, float] | None = None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR" and _is_dicom(p))
        if not files:
            raise ValueError(f"{path}: folder holds no DICOM files (a folder is read as one DICOM series)")
        ordered = sorted((_instance_number(p), str(p), p) for p in files)
        stack = np.concatenate([_read_dicom(p) for _, _, p in ordered])
        spacing, from_dicom = _pixel_spacing(files[0]), True
    elif path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable .npy file: {exc}") from None
        if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number):
            raise ValueError(
                f"{path}: expected numbers of shape (y, x) or (slices, y, x), found {array.dtype} {array.shape}"
            )
        stack, from_dicom = np.abs(array).reshape(-1, *array.shape[-2:]), False
    elif path.suffix.lower() == ".dcm" or _is_dicom(path):
        stack, spacing, from_dicom = _read_dicom(path), _pixel_spacing(path), True
    elif path.suffix.lower() in (".h5", ".mrd"):
        found = _read_hdf5_images(path)
        if found is None:
            raise ValueError(f"{path}: holds raw data, not images (reconstruct it first)")
        stack, from_dicom = found, False
    else:
        raise ValueError(f"{path}: expected .npy, an ISMRMRD image file (.h5, .mrd), DICOM or a DICOM series folder")
    stack = np.asarray(stack, dtype=np.float32)
    if stack.shape[0] == 0 or min(stack.shape[-2:]) < 4:
        raise ValueError(f"{path}: expected images of at least 4×4 pixels, found shape {stack.shape}")
    if not np.isfinite(stack).all():
        raise ValueError(f"{path}: image contains NaN or Inf")
    return stack, from_dicom, spacing


def _instance_number(path: Path) -> int:
    import pydicom

    try:
        return int(pydicom.dcmread(path, stop_before_pixels=True).get("InstanceNumber", 0) or 0)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable DICOM file: {exc}") from None


def _pixel_spacing(path: Path) -> tuple[float, float] | None:
    import pydicom

    try:
        spacing = pydicom.dcmread(path, stop_before_pixels=True).get("PixelSpacing")
        return (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, TypeError):
        return None


def pictures_from_methods(methods: Sequence[tuple[str, Sequence[Path]]]) -> list[Picture]:
    """The pictures of ``--method`` groups: the i-th file of every method is case ``i + 1``, one picture per slice."""
    if len(methods) < 2:
        raise ValueError("--method: a reader study needs at least two methods")
    names = [name for name, _ in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"--method: names must be unique, found {', '.join(names)}")
    counts = {name: len(files) for name, files in methods}
    if len(set(counts.values())) != 1:
        found = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise ValueError(f"--method: every method needs the same number of files (paired by position), found {found}")
    pictures: list[Picture] = []
    for index in range(len(methods[0][1])):
        case = f"case {index + 1}"
        shapes: dict[str, tuple[int, ...]] = {}
        for name, files in methods:
            stack, from_dicom, spacing = read_input(files[index])
            shapes[f"{name} ({files[index]})"] = stack.shape
            pictures += [
                Picture(name, case, s, str(files[index]), stack[s], from_dicom, spacing) for s in range(len(stack))
            ]
        if len(set(shapes.values())) != 1:
            found = "; ".join(f"{where}: {shape}" for where, shape in shapes.items())
            raise ValueError(f"--method: {case} has images of different shapes: {found}")
    return pictures


def pictures_from_study(
    folder: Path,
    *,
    backbones: Sequence[str] | None = None,
    priors: Sequence[str] | None = None,
    presets: Sequence[str] | None = None,
    accelerations: Sequence[float] | None = None,
) -> list[Picture]:
    """The test items of a ``semrecon study`` folder that its ``results.json`` lists (filtered), one per slice.

    A method is ``BACKBONE/PRIOR`` (the group is the backbone, with the preset and R added when the study has
    several); the case is the study's case. Among several stored items of one (case, setting) — older runs with
    other settings keep theirs — the one with the row's λ and iterations is taken.
    """
    results = folder / "results.json"
    try:
        rows = json.loads(results.read_text())["rows"]
    except FileNotFoundError:
        raise ValueError(f"{folder}: not a study folder (no results.json; 'semrecon study' writes it)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{results}: unreadable: {exc}") from None
    wanted = [
        row
        for row in rows
        if (backbones is None or row["backbone"] in backbones)
        and (priors is None or row["prior"] in priors)
        and (presets is None or row["preset"] in presets)
        and (accelerations is None or float(row["acceleration"]) in accelerations)
    ]
    if not wanted:
        raise ValueError(f"{results}: no rows left after the --backbones/--priors/--presets/--accelerations filters")
    several_presets = len({row["preset"] for row in wanted}) > 1
    several_r = len({float(row["acceleration"]) for row in wanted}) > 1
    pictures = []
    for row in wanted:
        group = row["backbone"] + (f" {row['preset']}" if several_presets else "")
        group += f" R{float(row['acceleration']):g}" if several_r else ""
        image_path = _study_item(folder, row)
        stack = np.load(image_path, allow_pickle=False).astype(np.float32)
        stack = stack.reshape(-1, *stack.shape[-2:])
        source = str(image_path.relative_to(folder))
        pictures += [Picture(f"{group}/{row['prior']}", row["case"], s, source, stack[s]) for s in range(len(stack))]
    methods = {p.method for p in pictures}
    if len(methods) < 2:
        raise ValueError(f"{folder}: a reader study needs at least two methods, the selection has {sorted(methods)}")
    per_case: dict[str, set[str]] = {}
    for picture in pictures:
        per_case.setdefault(picture.case, set()).add(picture.method)
    incomplete = {case: sorted(methods - found) for case, found in per_case.items() if found != methods}
    if incomplete:
        raise ValueError(f"{results}: cases without every method: {incomplete}")
    return pictures


def _study_item(folder: Path, row: dict[str, Any]) -> Path:
    """The stored image of a ``results.json`` row (``items/test/<case>/<slug>-<key>.npy``)."""
    slug = f"{row['backbone']}-{row['prior']}-{row['preset']}-R{float(row['acceleration']):g}"
    cases = folder / "items" / "test"
    matches = []
    for record_path in sorted((cases / row["case"]).glob(f"{slug}-*.json")):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        if math.isclose(float(record.get("lam", math.nan)), float(row["lam"]), rel_tol=1e-9, abs_tol=0.0) and int(
            record.get("iterations", -1)
        ) == int(row["iterations"]):
            matches.append(record_path)
    if not matches:
        raise ValueError(f"{cases / row['case']}: no stored item {slug} with λ {row['lam']} (results.json lists it)")
    newest = max(matches, key=lambda p: p.stat().st_mtime)
    image = newest.with_suffix(".npy")
    if not image.is_file():
        raise ValueError(f"{newest}: its image {image.name} is missing")
    return image


# --------------------------------------------------------------------------------------------- writing
def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit grey-level PNG of ``pixels`` ``(y, x)`` uint8, with no metadata chunk."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grey, deflate, no filter, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def dicom_bytes(levels: np.ndarray, image_id: str, spacing: tuple[float, float] | None) -> bytes:
    """A new Secondary Capture DICOM object of ``levels`` ``(y, x)`` uint16 (0–4095 is the window)."""
    import io

    try:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    except ImportError:
        raise ImportError("DICOM output needs pydicom (pip install 'semrecon[readers]')") from None
    instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = Dataset()
    data.file_meta = meta
    data.SOPClassUID = SecondaryCaptureImageStorage
    data.SOPInstanceUID = instance
    data.StudyInstanceUID = generate_uid()
    data.SeriesInstanceUID = generate_uid()
    data.PatientName = "Blinded"
    data.PatientID = image_id
    data.Modality = "MR"
    data.ConversionType = "WSD"
    data.SeriesDescription = "reader study"
    data.SamplesPerPixel = 1
    data.PhotometricInterpretation = "MONOCHROME2"
    data.Rows, data.Columns = (int(n) for n in levels.shape)
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 0
    data.WindowCenter, data.WindowWidth = (DICOM_LEVELS + 1) // 2, DICOM_LEVELS + 1
    if spacing is not None:
        data.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    data.PixelData = np.ascontiguousarray(levels, dtype="<u2").tobytes()
    buffer = io.BytesIO()
    data.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`write_kit` wrote."""

    folder: Path
    images: int
    screens: int
    methods: tuple[str, ...]
    cases: int
    dicom: bool
    seed: int
    notes: tuple[str, ...]


def write_kit(
    pictures: Sequence[Picture],
    out: str | Path,
    *,
    layout: str = "single",
    seed: int | None = None,
    dicom: bool | None = None,
    source: str = "",
) -> ExportSummary:
    """Write the blinded kit of ``pictures`` into the new folder ``out`` (see the module docstring).

    Args:
        pictures: every method's images; each (case, slice) must have one picture per method.
        out: the kit folder; it must not exist (it is created by renaming a finished temporary folder).
        layout: ``single`` (one image per screen) or ``side-by-side`` (every method of a case and slice).
        seed: the seed of the per-reader presentation order (random when ``None``; recorded).
        dicom: write DICOM too (``None``: when some input was DICOM).
        source: what the pictures came from, recorded in the key.

    Returns:
        What was written.

    Raises:
        ValueError: bad layout, an existing ``out``, or cases that do not pair.
    """
    out = Path(out)
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if out.exists():
        raise ValueError(f"--out {out}: already exists (a kit is written into a new folder)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    seed = secrets.randbits(31) if seed is None else int(seed)
    dicom = any(p.from_dicom for p in pictures) if dicom is None else dicom
    methods = tuple(sorted({p.method for p in pictures}))
    units: dict[tuple[str, int], dict[str, Picture]] = {}
    for picture in pictures:
        unit = units.setdefault((picture.case, picture.slice), {})
        if picture.method in unit:
            raise ValueError(f"{picture.case}, slice {picture.slice}: two images of method {picture.method}")
        unit[picture.method] = picture
    for (case, slice_index), unit in units.items():
        if set(unit) != set(methods):
            raise ValueError(f"{case}, slice {slice_index}: missing methods {sorted(set(methods) - set(unit))}")
        if len({p.image.shape for p in unit.values()}) != 1:
            raise ValueError(f"{case}, slice {slice_index}: methods have images of different shapes")
    windows, notes = _case_windows(pictures)

    ids = {id(p): secrets.token_hex(8) for p in pictures}
    if len(set(ids.values())) != len(ids):  # 64 random bits: never in practice, but a kit must not collide
        raise RuntimeError("image ids collided; export again")
    rng = random.Random(seed)
    if layout == "single":
        screens = [[ids[id(p)]] for p in pictures]
    else:
        screens = [[ids[id(p)] for p in unit.values()] for unit in units.values()]
    rng.shuffle(screens)
    for screen in screens:
        rng.shuffle(screen)
    by_id = {ids[id(p)]: p for p in pictures}

    temp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    temp.mkdir()
    try:
        (temp / "images").mkdir()
        if dicom:
            (temp / "dicom").mkdir()
        for image_id in [i for screen in screens for i in screen]:  # the random order: file times reveal nothing
            picture = by_id[image_id]
            scaled = picture.image / windows[picture.case]
            (temp / "images" / f"{image_id}.png").write_bytes(png_bytes(np.round(np.clip(scaled, 0, 1) * 255)))
            if dicom:
                levels = np.round(np.clip(scaled * DICOM_LEVELS, 0, 65535)).astype(np.uint16)
                (temp / "dicom" / f"{image_id}.dcm").write_bytes(dicom_bytes(levels, image_id, picture.spacing))
        public = {
            "format": FORMAT,
            "criteria": list(CRITERIA),
            "scale": [1, 5],
            "layout": layout,
            "seed": seed,
            "screens": screens,
        }
        (temp / "kit.json").write_text(json.dumps(public, indent=1) + "\n")
        key = {
            "format": KEY_FORMAT,
            "source": source,
            "seed": seed,
            "layout": layout,
            "window": f"0 to the {PERCENTILE:g}th percentile of each case's pooled magnitudes",
            "methods": list(methods),
            "notes": notes,
            "images": {
                image_id: {
                    "method": p.method,
                    "group": p.group,
                    "case": p.case,
                    "slice": p.slice,
                    "source": p.source,
                    "window": [0.0, float(windows[p.case])],
                }
                for image_id, p in sorted(by_id.items(), key=lambda item: (item[1].method, item[1].case, item[1].slice))
            },
        }
        key_path = temp / "key.json"
        key_path.write_text(json.dumps(key, indent=1) + "\n")
        key_path.chmod(0o600)
        temp.rename(out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ExportSummary(
        out, len(pictures), len(screens), methods, len({p.case for p in pictures}), dicom, seed, tuple(notes)
    )


def _case_windows(pictures: Sequence[Picture]) -> tuple[dict[str, float], list[str]]:
    """The upper window limit of every case, and notes on cases whose methods differ in scale."""
    pooled: dict[str, list[np.ndarray]] = {}
    per_method: dict[str, dict[str, list[np.ndarray]]] = {}
    for p in pictures:
        pooled.setdefault(p.case, []).append(p.image.ravel())
        per_method.setdefault(p.case, {}).setdefault(p.method, []).append(p.image.ravel())
    windows, notes = {}, []
    for case, parts in pooled.items():
        high = float(np.percentile(np.concatenate(parts), PERCENTILE))
        windows[case] = high if high > 0 else (float(max(part.max() for part in parts)) or 1.0)
        levels = {m: float(np.percentile(np.concatenate(v), PERCENTILE)) for m, v in per_method[case].items()}
        positive = [v for v in levels.values() if v > 0]
        if positive and max(positive) > SCALE_WARNING * min(positive):
            found = ", ".join(f"{m}: {v:.4g}" for m, v in sorted(levels.items()))
            note = (
                f"{case}: the methods' {PERCENTILE:g}th percentiles differ by more than {SCALE_WARNING:g}× ({found}); "
                "with one window per case a reader may tell them apart"
            )
            log.warning("%s", note)
            notes.append(note)
    return windows, notes
