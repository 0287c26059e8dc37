"""Bank sources from a site's own images: PNG, TIFF, DICOM, ISMRMRD image files and fastMRI RSS files.

Each format is written here with its own library (Pillow, pydicom, ismrmrd, h5py) from one known image and read
back by :func:`read_source`; a folder of all of them builds a bank through ``semrecon bank build``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from semrecon_core.priors.bank_sources import expand_sources, read_source

N = 48


@pytest.fixture
def image() -> np.ndarray:
    """A ``(N, N)`` image in [0, 1] with structure in both directions."""
    y, x = np.mgrid[0:N, 0:N] / N
    return ((np.sin(6 * x) * np.cos(4 * y) + 1) / 2).astype(np.float32)


def _png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    Image.fromarray(pixels, mode=mode).save(path)
    return path


def _dicom(path: Path, stored: np.ndarray, *, slope: float = 1.0, samples: int = 1, inverted: bool = False) -> Path:
    pydicom = pytest.importorskip("pydicom", reason="DICOM sources need pydicom: pip install 'semrecon[semantic]'")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.Rows, dataset.Columns = stored.shape[-2:]
    dataset.SamplesPerPixel = samples
    dataset.PhotometricInterpretation = "RGB" if samples > 1 else ("MONOCHROME1" if inverted else "MONOCHROME2")
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, 0.0
    if samples > 1:
        dataset.PlanarConfiguration = 0
        stored = np.repeat(stored[..., None], samples, axis=-1)
    dataset.PixelData = stored.astype("<u2").tobytes()
    dataset.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == stored.shape[0]
    return path


def test_png_tiff_dicom_ismrmrd_and_fastmri_images_read_as_written(tmp_path: Path, image: np.ndarray) -> None:
    import h5py
    import ismrmrd
    from PIL import Image

    from semrecon_core.data.images import write_images

    grey8 = np.round(image * 255).astype(np.uint8)
    grey16 = np.round(image * 65535).astype(np.uint16)
    written = {
        "8-bit PNG": (_png(tmp_path / "a.png", grey8), grey8[None]),
        "16-bit PNG": (_png(tmp_path / "b.png", grey16), grey16[None]),
        "DICOM (slope 2)": (_dicom(tmp_path / "c.dcm", grey16, slope=2.0), 2.0 * grey16[None]),
        "DICOM MONOCHROME1": (_dicom(tmp_path / "c1.dcm", grey16, inverted=True), grey16.max() - grey16[None]),
    }
    pages = [Image.fromarray(grey8), Image.fromarray(grey8[::-1].copy())]
    pages[0].save(tmp_path / "d.tif", save_all=True, append_images=pages[1:])
    written["2-page TIFF"] = (tmp_path / "d.tif", np.stack([grey8, grey8[::-1]]))
    complex_image = (image * np.exp(1j * image)).astype(np.complex64)
    write_images(tmp_path / "e.h5", [ismrmrd.Image.from_array(image * k) for k in (1.0, 2.0)])
    written["ISMRMRD images"] = (tmp_path / "e.h5", np.stack([image, 2 * image]))
    write_images(tmp_path / "e_complex.h5", [ismrmrd.Image.from_array(complex_image)])
    written["ISMRMRD complex images"] = (tmp_path / "e_complex.h5", image[None])
    ushort = np.round(300 + image * 60000).astype(np.uint16)  # Gadgetron's usual output; squares overflow 16 bits
    write_images(tmp_path / "e_ushort.h5", [ismrmrd.Image.from_array(ushort)])
    written["ISMRMRD unsigned short images"] = (tmp_path / "e_ushort.h5", ushort[None].astype(np.float32))
    short = np.round(image * 30000).astype(np.int16)
    write_images(tmp_path / "e_short.h5", [ismrmrd.Image.from_array(short)])
    written["ISMRMRD short images"] = (tmp_path / "e_short.h5", short[None].astype(np.float32))
    with h5py.File(tmp_path / "f.h5", "w") as file:
        file["reconstruction_rss"] = np.stack([image, image.T])
    written["fastMRI RSS"] = (tmp_path / "f.h5", np.stack([image, image.T]))
    for what, (path, expected) in written.items():
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        source = read_source(path, "positives")
        assert source.kspace is None, what
        np.testing.assert_allclose(source.images.real.numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=what)
        assert source.images.imag.abs().max() == 0 and source.sha256 == before, what
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before, f"{what}: input modified"


def test_a_folder_finds_dicom_files_by_their_preamble(tmp_path: Path, image: np.ndarray) -> None:
    grey16 = np.round(image * 1000).astype(np.uint16)
    _dicom(tmp_path / "IM0001", grey16)
    _dicom(tmp_path / "1.2.840.113619.2.55", grey16)  # a UID for a name: its "suffix" is .55
    _dicom(tmp_path / "DICOMDIR", grey16)  # the media index (here any DICOM file under that name): not an image
    (tmp_path / "notes.txt").write_text("not an image")
    _png(tmp_path / "a.png", np.round(image * 255).astype(np.uint8))
    found = expand_sources([tmp_path], "positives")
    assert [p.name for p in found] == ["1.2.840.113619.2.55", "IM0001", "a.png"]
    np.testing.assert_array_equal(read_source(found[0], "positives").images.real.numpy(), grey16[None])


def test_broken_image_files_are_named_errors(tmp_path: Path, image: np.ndarray) -> None:
    from PIL import Image

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "text.dcm").write_text("not DICOM")
    colour = _dicom(tmp_path / "colour.dcm", np.round(image * 1000).astype(np.uint16), samples=3)
    _png(tmp_path / "tiny.png", np.zeros((4, 4), np.uint8))
    pages = [Image.fromarray(np.zeros((16, 16), np.uint8)), Image.fromarray(np.zeros((8, 16), np.uint8))]
    pages[0].save(tmp_path / "mixed.tif", save_all=True, append_images=pages[1:])
    cases = {
        "mixed.tif": "pages of different sizes [(8, 16), (16, 16)]",
        "broken.png": "cannot be read as an image",
        "text.dcm": "not a readable DICOM file",
        colour.name: "SamplesPerPixel 3; expected 1",
        "tiny.png": "at least 8×8 pixels, found shape (1, 4, 4)",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            read_source(tmp_path / name, "positives")
        assert name in str(error.value)


def test_bank_build_from_a_folder_of_mixed_images(
    tiny_janus: Path, tmp_path: Path, image: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    """48² images: the simulated negatives' ACS band shrinks to what R = 8 allows (48 / 8 = 6 lines)."""
    from semrecon_core.commands.main import main
    from semrecon_core.priors.bank import load_bank

    folder = tmp_path / "site"
    folder.mkdir()
    _png(folder / "a.png", np.round(image * 255).astype(np.uint8))
    _dicom(folder / "IM0001", np.round(image.T * 1000).astype(np.uint16))
    out = tmp_path / "bank.safetensors"
    code = main(
        ["bank", "build", str(out), "--positives", str(folder), "--encoder", str(tiny_janus), "--device", "cpu"]
    )
    assert code == 0, capsys.readouterr().err
    bank = load_bank(out)
    assert bank.positives[0].shape[0] == 2 and bank.negatives[0].shape[0] == 8  # four simulated negatives per slice
    sources = [s for s in bank.metadata["sources"] if s["role"] == "positive"]
    assert sorted(Path(s["path"]).name for s in sources) == ["IM0001", "a.png"]
    assert all(len(s["sha256"]) == 64 and len(s["simulated_negatives_R"]) == 4 for s in sources)
