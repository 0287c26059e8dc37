"""Reconstructed images as ISMRMRD images, and writing them to an ISMRMRD file atomically.

Images are float32 magnitudes cropped to the recon matrix; position, orientation, patient table
position, slice/repetition/average/... counters and time stamps are copied from the acquisition
header kept for each KSpace slice, the field of view from the recon space.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from semrecon_core.data.kspace import KSpace


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` on success.

    On success the temporary file is renamed over ``path`` (``os.replace``), on failure removed, so readers
    never see a half-written output.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: output directory {path.parent} does not exist")
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temp
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def crop_to_recon(image: torch.Tensor | np.ndarray, kspace: KSpace) -> torch.Tensor | np.ndarray:
    """Centre-crop ``(..., y, x)`` to the recon matrix of ``kspace`` where the image is larger."""
    recon_x, recon_y = kspace.geometry.recon_matrix[:2]
    ny, nx = image.shape[-2:]
    top = max((ny - recon_y) // 2, 0) if recon_y < ny else 0
    left = max((nx - recon_x) // 2, 0) if recon_x < nx else 0
    return image[..., top : top + min(recon_y, ny), left : left + min(recon_x, nx)]


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
        values = ismrmrd.Meta(
            {
                "GADGETRON_DataRole": "Image",
                "GADGETRON_WindowCenter": f"{float(plane.max()) / 2:.6g}",
                "GADGETRON_WindowWidth": f"{float(plane.max()):.6g}",
            }
        )
        values.update(
            {key: value if isinstance(value, list) else ascii_text(str(value)) for key, value in (meta or {}).items()}
        )
        img.meta = values
        images.append(img)
    return images


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
