"""Reconstructed images as ISMRMRD images, and writing them to an ISMRMRD file atomically.

Images are float32 magnitudes cropped to the recon matrix; position, orientation, patient table
position, slice/repetition/average/... counters and time stamps are copied from the acquisition
header kept for each KSpace slice, the field of view from the recon space. Input without an orientation
(``.npy``, BART ``.cfl``, fastMRI, or headers whose direction vectors are zero) gets the identity orientation
(read (1, 0, 0), phase (0, 1, 0), slice (0, 0, 1)), said in a warning and in the meta ``SEMRECON_Orientation``;
without any header the slices are placed one slice thickness apart along the slice direction, centred on
the origin.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from semrecon_core.data.kspace import KSpace

log = logging.getLogger(__name__)

#: meta ``SEMRECON_Orientation`` of images whose input carries no orientation
IDENTITY_ORIENTATION = "identity (the input carries no orientation): read (1,0,0), phase (0,1,0), slice (0,0,1)"


def file_mode() -> int:
    """The mode of every file semrecon writes: ``0o666`` less the process umask (``0o644`` under umask 022).

    The umask is read from ``/proc/self/status`` where Linux provides it (changing it to read it would race
    with other threads, e.g. ``semrecon serve``'s connections); elsewhere it is read by setting it back.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` on success.

    On success the temporary file gets :func:`file_mode` and is renamed over ``path`` (``os.replace``), on
    failure it is removed, so readers never see a half-written output. Several outputs that belong together
    are written with :class:`StagedOutputs` instead.
    """
    with StagedOutputs() as staged:
        yield staged.path(path)


class StagedOutputs:
    """Outputs written under temporary names and committed together, or not at all.

    ``path(target)`` gives the temporary file to write for ``target`` (its directory is created when
    ``mkdir`` is set), ``directory(target)`` a temporary directory to fill that replaces the directory
    ``target`` as a whole (e.g. a DICOM series). Leaving the ``with`` block without an error commits: every
    temporary file gets :func:`file_mode` and replaces its target; if one replacement fails, the targets
    already replaced get their previous content back (or are removed when they did not exist) and the error
    propagates. Leaving it with an error removes the temporary files and directories (and directories this
    object created), so a failed command leaves no output behind.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def path(self, target: str | Path, *, mkdir: bool = False) -> Path:
        """A temporary path beside ``target`` to write its content to (committed with the others)."""
        target = Path(target)
        if mkdir and not target.parent.is_dir():
            missing = [parent for parent in (target.parent, *target.parent.parents) if not parent.exists()]
            try:
                target.parent.mkdir(parents=True)
            except OSError as exc:
                raise OSError(f"{target.parent}: cannot create the output directory ({exc.strerror or exc})") from None
            self._created.extend(missing)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"{target}: output directory {target.parent} does not exist")
        if target.is_dir():
            raise IsADirectoryError(f"{target}: is a directory, expected a file to write")
        temp = _temporary(target)
        self._pending.append((temp, target))
        return temp

    def directory(self, target: str | Path) -> Path:
        """A new temporary directory beside ``target`` to fill; the commit puts it in place of ``target``.

        ``target`` need not exist; an existing directory is replaced as a whole (its owner decides beforehand
        whether it may be), anything else at ``target`` is refused.
        """
        target = Path(target)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"{target}: output directory {target.parent} does not exist")
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target}: exists and is not a directory")
        temp = _temporary(target)
        temp.mkdir()
        self._pending.append((temp, target))
        return temp

    def commit(self) -> None:
        """Give every staged file its mode and move it over its target (all, or none on failure)."""
        mode = file_mode()
        done: list[tuple[Path, Path | None]] = []  # (target, backup of its previous content)
        try:
            for temp, target in self._pending:
                if temp.is_dir():
                    for item in temp.rglob("*"):
                        if item.is_file():
                            item.chmod(mode)
                    continue
                if not temp.is_file():
                    raise FileNotFoundError(f"{target}: nothing was written")
                temp.chmod(mode)
            for temp, target in self._pending:
                backup = None
                if temp.is_dir():
                    if target.exists():
                        backup = _temporary(target)
                        target.rename(backup)
                    try:
                        temp.rename(target)
                    except BaseException:
                        if backup is not None:
                            backup.rename(target)
                        raise
                    done.append((target, backup))
                    continue
                if target.is_file():
                    backup = _temporary(target)
                    try:
                        os.link(target, backup)
                    except OSError:  # no hard links here: keep a copy
                        shutil.copy2(target, backup)
                try:
                    temp.replace(target)
                except BaseException:
                    if backup is not None:
                        backup.unlink()
                    raise
                done.append((target, backup))
        except BaseException:
            for target, backup in reversed(done):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                    if backup is not None:
                        backup.rename(target)
                elif backup is not None:
                    backup.replace(target)
                else:
                    target.unlink(missing_ok=True)
            self.discard()
            raise
        for _, backup in done:
            if backup is not None and backup.is_dir():
                shutil.rmtree(backup, ignore_errors=True)
            elif backup is not None:
                backup.unlink(missing_ok=True)
        self._pending.clear()
        self._created.clear()

    def discard(self) -> None:
        """Remove the temporary files, and the directories created for them when they are left empty."""
        for temp, _ in self._pending:
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            else:
                temp.unlink(missing_ok=True)
        self._pending.clear()
        for directory in self._created:  # innermost first
            with contextlib.suppress(OSError):
                directory.rmdir()
        self._created.clear()


def crop_to_recon(image: torch.Tensor | np.ndarray, kspace: KSpace) -> torch.Tensor | np.ndarray:
    """Centre-crop ``(..., y, x)`` to the recon field of view, then to the recon matrix where still larger.

    As Gadgetron, the field of view decides first: the image spans the encoded FOV, so along each axis
    only the central ``n · recon FOV / encoded FOV`` pixels lie inside the recon FOV (phase oversampling is
    cropped even when the recon matrix is as large as the encoded one). Of those, at most the recon matrix
    is kept (a recon matrix smaller at the same FOV). A recon matrix larger than what remains (a scanner's
    interpolation) is not interpolated: the pixels keep their spacing and still span the recon FOV.
    """
    geometry = kspace.geometry
    keep = []
    for axis, size in ((1, image.shape[-2]), (0, image.shape[-1])):
        encoded, recon = float(geometry.encoded_fov_mm[axis]), float(geometry.recon_fov_mm[axis])
        inside = int(round(size * recon / encoded)) if 0 < recon < encoded * 0.99 else size
        keep.append(max(1, min(inside, int(geometry.recon_matrix[axis]), size)))
    (ny, nx), (ky, kx) = image.shape[-2:], keep
    top, left = (ny - ky) // 2, (nx - kx) // 2
    return image[..., top : top + ky, left : left + kx]


def to_ismrmrd_images(
    image: torch.Tensor | np.ndarray,
    kspace: KSpace,
    *,
    series_index: int = 1,
    meta: Mapping[str, Any] | None = None,
) -> list[Any]:
    """One ``ismrmrd.Image`` (float32 magnitude, IMTYPE_MAGNITUDE) per slice of ``image`` ``(slices, y, x)``.

    Args:
        image: complex or real image, ``(slices, y, x)`` on the k-space grid (or already cropped).
        kspace: the scan it came from (headers, recon matrix and FOV).
        series_index: ``image_series_index`` of all images.
        meta: extra meta attributes (e.g. ``GADGETRON_ImageComment``); window centre/width and data
            role are filled unless given.

    Returns:
        The images with ``image_index`` 1, 2, ... in slice order.
    """
    import ismrmrd

    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"image: expected (slices, y, x), found shape {array.shape}")
    if array.shape[0] != kspace.shape[0]:
        raise ValueError(f"image: {array.shape[0]} slices, but the k-space has {kspace.shape[0]}")
    magnitude = np.abs(crop_to_recon(array, kspace)).astype(np.float32)
    fov = tuple(float(v) for v in kspace.geometry.recon_fov_mm)
    headers = kspace.headers or (None,) * array.shape[0]
    images = []
    for index, (plane, header) in enumerate(zip(magnitude, headers, strict=True)):
        source = header if header is not None else ismrmrd.AcquisitionHeader()
        img = ismrmrd.Image.from_array(
            np.ascontiguousarray(plane),
            acquisition=source,
            image_index=index + 1,
            image_series_index=series_index,
            image_type=ismrmrd.IMTYPE_MAGNITUDE,
            field_of_view=fov,
        )
        values = ismrmrd.Meta({"GADGETRON_DataRole": "Image", **window_meta(plane)})
        values.update(
            {key: value if isinstance(value, list) else ascii_text(str(value)) for key, value in (meta or {}).items()}
        )
        if not has_orientation(img):
            img.read_dir, img.phase_dir, img.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
            if header is None:  # no geometry at all: slices one thickness apart, centred on the origin
                img.position = (0.0, 0.0, (index - (len(magnitude) - 1) / 2) * fov[2])
            values["SEMRECON_Orientation"] = IDENTITY_ORIENTATION
        img.meta = values
        images.append(img)
    if any("SEMRECON_Orientation" in img.meta for img in images):
        log.warning("%s: no orientation in the input; the images get the identity orientation", kspace.source or "scan")
    return images


def has_orientation(image: Any) -> bool:
    """Whether ``image``'s read, phase and slice directions are all non-zero vectors."""
    return all(
        math.hypot(*(float(v) for v in vector)) > 1e-6 for vector in (image.read_dir, image.phase_dir, image.slice_dir)
    )


# -- display windows -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Display:
    """How a chain turns the float magnitudes semrecon emits into the pixels that are displayed and stored.

    Gadgetron's AutoScaleGadget scales each magnitude image so that its 99th-percentile histogram bin
    becomes ``max_value``, and FloatToUShortGadget rounds and clamps to ``[min_intensity, max_intensity]``;
    neither touches the window meta, and the DICOM writer copies it. A window must therefore be computed on
    the pixels as they leave the chain. ``max_value`` 0: no AutoScale; ``max_intensity`` 0: the pixels stay float.
    The defaults are those gadgets' defaults and the settings of semrecon's chains.
    """

    max_value: float = 2048.0
    histogram_bins: int = 100
    max_intensity: float = 4095.0
    min_intensity: float = 0.0


#: the float pixels as emitted (``semrecon recon`` files, replay without display gadgets)
AS_EMITTED = Display(max_value=0.0, max_intensity=0.0)


def autoscale_factor(data: np.ndarray, *, max_value: float = 2048.0, histogram_bins: int = 100) -> float | None:
    """The factor AutoScaleGadget applies to magnitude ``data``, or ``None`` (maximum not positive and finite).

    The histogram has ``histogram_bins`` bins between 0 and the maximum; the first bin where the cumulative
    count reaches 99 % of the pixels, plus two, times the bin width is mapped to ``max_value``.
    """
    peak = float(data.max()) if data.size else 0.0
    if not math.isfinite(peak) or peak <= 0.0:
        return None
    bins = np.minimum(np.floor(data / peak * histogram_bins).astype(np.int64), histogram_bins - 1)
    histogram = np.bincount(np.clip(bins, 0, None).ravel(), minlength=histogram_bins)
    first = int(np.argmax(np.cumsum(histogram) >= 0.99 * data.size))
    percentile = (first + 2) * (peak / histogram_bins)
    return max_value / percentile


def displayed(data: np.ndarray, display: Display) -> np.ndarray:
    """The pixels ``display`` makes of the float magnitudes ``data`` (as float64)."""
    pixels = np.abs(np.asarray(data)).astype(np.float32)  # the gadgets compute in float32
    if display.max_value > 0:
        factor = autoscale_factor(pixels, max_value=display.max_value, histogram_bins=display.histogram_bins)
        if factor is not None:
            pixels = pixels * np.float32(factor)
    pixels = pixels.astype(np.float64)
    if display.max_intensity > 0:
        pixels = np.rint(np.clip(pixels, display.min_intensity, display.max_intensity))
    return pixels


def window_meta(pixels: np.ndarray) -> dict[str, str]:
    """``GADGETRON_WindowCenter``/``WindowWidth`` spanning 0 … the maximum of the displayed ``pixels``."""
    finite = pixels[np.isfinite(pixels)]
    top = float(finite.max()) if finite.size else 0.0
    return {"GADGETRON_WindowCenter": f"{top / 2:.6g}", "GADGETRON_WindowWidth": f"{top:.6g}"}


def set_window(image: Any, display: Display) -> Any:
    """Set ``image``'s window meta for its pixels as ``display`` shows them; returns ``image``."""
    image.meta.update(window_meta(displayed(image.data, display)))
    return image


_ASCII = str.maketrans(
    {"λ": "lambda", "σ": "sigma", "τ": "tau", "×": "x", "→": "->", "≥": ">=", "≤": "<=", "…": "...", "—": "-"}
)


def ascii_text(text: str) -> str:
    """Meta values travel as ASCII on the wire: transliterate the symbols semrecon uses, replace the rest."""
    return text.translate(_ASCII).encode("ascii", "replace").decode("ascii")


def quality_meta(answer: Mapping[str, Any]) -> dict[str, str]:
    """Meta ``SEMRECON_QualityAnswer``, ``SEMRECON_QualityChoice``, ``SEMRECON_P_<WORD>`` of one answer."""
    meta: dict[str, str] = {}
    if "answer" in answer:
        meta["SEMRECON_QualityAnswer"] = ascii_text(str(answer["answer"]).strip())
    if "choice" in answer:
        meta["SEMRECON_QualityChoice"] = ascii_text(str(answer["choice"]))
    for key, value in answer.items():
        if key.startswith("p_"):
            meta[f"SEMRECON_P_{ascii_text(key[2:]).upper()}"] = f"{float(value):.4f}"
    return meta


def write_images(
    path: str | Path, images: Sequence[Any], group: str = "images", *, xml_header: str | None = None
) -> Path:
    """Write ``images`` to the ISMRMRD file ``path`` (``dataset/<group>``), atomically.

    The file is written under a temporary name in the same directory and renamed over ``path``, so a
    reader never sees a half-written file. ``xml_header`` (the scan's ISMRMRD header) is stored too.
    """
    import ismrmrd

    path = Path(path)
    if not images:
        raise ValueError(f"{path}: no images to write")
    with atomic_path(path) as temp:
        dataset = ismrmrd.Dataset(str(temp), "dataset", mode="w")
        try:
            if xml_header:
                dataset.write_xml_header(xml_header.encode("utf-8"))
            for img in images:
                dataset.append_image(group, img)
        finally:
            dataset.close()
    return path


def read_images(path: str | Path, group: str = "images") -> list[Any]:
    """The ``ismrmrd.Image`` objects stored in ``dataset/<group>`` of ``path`` (read-only)."""
    import ismrmrd

    dataset = ismrmrd.Dataset(str(path), "dataset", mode="r")
    try:
        return [dataset.read_image(group, i) for i in range(dataset.number_of_images(group))]
    finally:
        dataset.close()
