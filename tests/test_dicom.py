"""DICOM output (``--dicom``): valid MR images (dciodvfy), the ISMRMRD pixels and geometry, stable UIDs, atomicity."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import ismrmrd
import numpy as np
import pydicom
import pytest

from semrecon_core.commands.main import main
from semrecon_core.data.dicom import quantise, series_description, write_dicom_series
from semrecon_core.data.images import read_images
from semrecon_core.data.simulate import write_ismrmrd_raw

DCIODVFY = shutil.which("dciodvfy")

HEADER = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <subjectInformation>
    <patientName>Phantom^Test</patientName><patientWeight_kg>70</patientWeight_kg>
    <patientID>P-042</patientID><patientBirthdate>1980-02-03</patientBirthdate><patientGender>O</patientGender>
  </subjectInformation>
  <studyInformation>
    <studyDate>2026-11-30</studyDate><studyTime>10:11:12</studyTime><studyID>S7</studyID>
    <studyInstanceUID>1.2.826.0.1.3680043.8.498.123</studyInstanceUID>
  </studyInformation>
  <measurementInformation><patientPosition>HFS</patientPosition><protocolName>knee</protocolName>
  </measurementInformation>
  <acquisitionSystemInformation><systemVendor>semrecon</systemVendor><systemFieldStrength_T>3</systemFieldStrength_T>
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>127740000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>6</x><y>4</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>30</x><y>24</y><z>3</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>6</x><y>4</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>30</x><y>24</y><z>3</z></fieldOfView_mm></reconSpace>
    <encodingLimits/><trajectory>cartesian</trajectory>
  </encoding>
  <sequenceParameters><TR>500</TR><TE>12</TE><flipAngle_deg>90</flipAngle_deg></sequenceParameters>
</ismrmrdHeader>
"""


def _dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy reports for ``path`` (it writes its report to stderr)."""
    assert DCIODVFY is not None
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _rescaled(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _centre_from_dicom(ds: pydicom.Dataset) -> np.ndarray:
    """ISMRMRD's image centre from the DICOM plane: IPP + (nx−1)/2·dx·row direction + (ny−1)/2·dy·column direction."""
    row, column = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    ipp = np.array(ds.ImagePositionPatient, float)
    return ipp + (ds.Columns - 1) / 2 * dx * row + (ds.Rows - 1) / 2 * dy * column


def _check_against_image(ds: pydicom.Dataset, image: ismrmrd.Image) -> None:
    plane = image.data.reshape(image.data.shape[-2:]).astype(np.float64)
    assert (ds.Rows, ds.Columns) == plane.shape
    np.testing.assert_array_less(np.abs(_rescaled(ds) - plane), float(ds.RescaleSlope) / 2 * (1 + 1e-6) + 1e-12)
    np.testing.assert_allclose(_centre_from_dicom(ds), image.position, atol=1e-4)
    np.testing.assert_allclose(ds.ImageOrientationPatient, [*image.read_dir, *image.phase_dir], atol=1e-6)
    nx, ny = image.matrix_size[:2]
    fov = image.field_of_view
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [fov[1] / ny, fov[0] / nx], rtol=1e-6)
    assert float(ds.SliceThickness) == pytest.approx(fov[2])
    assert ds.InstanceNumber == image.image_index and ds.SeriesNumber == image.image_series_index


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dicom_scan") / "scan.h5"
    return write_ismrmrd_raw(path, matrix=(32, 32), slices=2, coils=4, acceleration=2, acs_width=12, seed=3)


@pytest.fixture(scope="module")
def recon_dicom(scan: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("recon_dicom")
    assert main(["recon", str(scan), str(folder / "out.h5"), "--dicom", str(folder / "dicom"), "--prior", "tv"]) == 0
    return folder / "out.h5", folder / "dicom"


def test_recon_dicom_holds_the_ismrmrd_pixels_and_geometry(recon_dicom: tuple[Path, Path]) -> None:
    out, directory = recon_dicom
    images = read_images(out)
    files = sorted(directory.glob("*.dcm"))
    assert [f.name for f in files] == ["series001_image0001.dcm", "series001_image0002.dcm"]
    datasets = [pydicom.dcmread(f) for f in files]
    for ds, image in zip(datasets, images, strict=True):
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        _check_against_image(ds, image)
        assert ds.SeriesDescription == "semrecon sense + tv"
        assert "CS-TV" in ds.ImageComments
        assert float(ds.WindowCenter) == pytest.approx(float(image.meta["GADGETRON_WindowCenter"]))
        assert ds.PatientPosition == "HFS" and ds.Manufacturer == "semrecon" and ds.ProtocolName == "semrecon simulate"
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 2
    assert datasets[0].FrameOfReferenceUID == datasets[1].FrameOfReferenceUID
    assert not list(directory.parent.glob(".*.tmp"))


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_recon_dicom_passes_dciodvfy(recon_dicom: tuple[Path, Path]) -> None:
    for path in sorted(recon_dicom[1].glob("*.dcm")):
        assert _dciodvfy_errors(path) == [], path


def test_uids_are_stable_and_differ_between_methods(scan: Path, recon_dicom: tuple[Path, Path], tmp_path: Path) -> None:
    assert main(["recon", str(scan), str(tmp_path / "a.h5"), "--dicom", str(tmp_path / "a"), "--prior", "tv"]) == 0
    assert main(["recon", str(scan), str(tmp_path / "b.h5"), "--dicom", str(tmp_path / "b")]) == 0

    def uids(directory: Path) -> list[tuple[str, str, str]]:
        found = [pydicom.dcmread(f) for f in sorted(directory.glob("*.dcm"))]
        return [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in found]

    first, again, other = uids(recon_dicom[1]), uids(tmp_path / "a"), uids(tmp_path / "b")
    assert first == again  # the same scan reconstructed the same way: the same UIDs
    assert other[0][0] == first[0][0]  # the same study
    assert other[0][1] != first[0][1] and other[0][2] != first[0][2]  # CG-SENSE is another series


def _oblique_image(index: int, data: np.ndarray, position: tuple[float, float, float]) -> ismrmrd.Image:
    angle = np.deg2rad(25.0)
    tilt = np.deg2rad(10.0)
    read = np.array([np.cos(angle), np.sin(angle), 0.0])
    phase = np.array([-np.sin(angle) * np.cos(tilt), np.cos(angle) * np.cos(tilt), np.sin(tilt)])
    image = ismrmrd.Image.from_array(
        data.astype(np.float32), image_index=index, image_series_index=3, field_of_view=(30.0, 24.0, 3.0)
    )
    image.read_dir, image.phase_dir = tuple(read), tuple(phase)
    image.slice_dir = tuple(np.cross(read, phase))
    image.position = position
    image.meta = ismrmrd.Meta({"GADGETRON_ImageComment": "oblique", "GADGETRON_SeqDescription": "_semrecon_unet_tv"})
    return image


def test_oblique_geometry_matches_an_independent_voxel_mapping(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images = [
        _oblique_image(1, rng.uniform(0.2, 3.0, (4, 6)), (10.0, -20.5, 33.0)),
        _oblique_image(2, rng.uniform(0.2, 3.0, (4, 6)), (10.5, -21.0, 36.0)),
    ]
    written = write_dicom_series(tmp_path / "oblique", images, xml_header=HEADER)
    assert list(written) == [3]
    for path, image in zip(written[3], images, strict=True):
        ds = pydicom.dcmread(path)
        _check_against_image(ds, image)
        # every voxel: DICOM's mapping (column i along the row direction, row j along the column direction)
        # equals ISMRMRD's (x along read_dir, y along phase_dir, both about the image centre)
        row, column = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        read, phase, centre = np.array(image.read_dir), np.array(image.phase_dir), np.array(image.position)
        for j in range(4):
            for i in range(6):
                dicom = np.array(ds.ImagePositionPatient, float) + i * dx * row + j * dy * column
                mrd = centre + (i - 2.5) * 5.0 * read + (j - 1.5) * 6.0 * phase
                np.testing.assert_allclose(dicom, mrd, atol=1e-4)
        if DCIODVFY is not None:
            assert _dciodvfy_errors(path) == []
        # the header's patient and study fields; its study UID is kept
        assert str(ds.PatientName) == "Phantom^Test" and ds.PatientID == "P-042" and ds.PatientSex == "O"
        assert ds.PatientBirthDate == "19800203" and ds.StudyDate == "20261130" and ds.StudyTime == "101112"
        assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.123" and ds.StudyID == "S7"
        assert float(ds.RepetitionTime) == 500 and float(ds.EchoTime) == 12
        assert float(ds.MagneticFieldStrength) == 3 and float(ds.ImagingFrequency) == pytest.approx(127.74)


def test_oblique_geometry_agrees_with_nibabel(tmp_path: Path) -> None:
    wrappers = pytest.importorskip("nibabel.nicom.dicomwrappers", reason="nibabel (extra demo) is not installed")
    image = _oblique_image(1, np.ones((4, 6)), (1.0, 2.0, 3.0))
    path = write_dicom_series(tmp_path / "nib", [image])[3][0]
    affine = wrappers.wrapper_from_data(pydicom.dcmread(path)).affine
    # nibabel's affine maps (row index, column index, slice) to LPS millimetres
    centre = affine @ np.array([1.5, 2.5, 0.0, 1.0])
    np.testing.assert_allclose(centre[:3], image.position, atol=1e-4)


def test_quantisation_reproduces_the_float_pixels_to_half_a_step() -> None:
    rng = np.random.default_rng(5)
    for plane in (rng.uniform(-3.0, 1e3, (7, 5)), rng.uniform(0, 1e-7, (3, 3)), np.full((2, 2), 4.25)):
        pixels, slope, intercept = quantise(plane)
        assert pixels.dtype == np.uint16 and slope > 0
        assert np.abs(pixels * slope + intercept - plane).max() <= slope / 2 * (1 + 1e-6) + 1e-15
        assert len(pydicom.valuerep.format_number_as_ds(slope)) <= 16
    counts = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert quantise(counts)[1:] == (1.0, 0.0) and np.array_equal(quantise(counts)[0], counts)


def test_series_description_names_backbone_prior_encoder_and_random_weights() -> None:
    comment = (
        "semrecon U-Net (warm start, LoRA rank 4) + semantic image prior (centred, paper) with Janus image-only "
        "encoder (/models/tiny-janus, layers 1/2) RANDOM WEIGHTS; lambda 0.0016 (preset paper)"
    )
    text = series_description(
        {"GADGETRON_ImageComment": comment, "GADGETRON_SeqDescription": "_semrecon_unet_semantic"}
    )
    assert text == "semrecon unet + semantic (tiny-janus) RANDOM WEIGHTS"
    long = comment.replace("/models/tiny-janus", "x" * 80)
    text = series_description({"GADGETRON_ImageComment": long, "GADGETRON_SeqDescription": "_semrecon_unet_semantic"})
    assert len(text) <= 64 and text.endswith("RANDOM WEIGHTS")
    fallback = {"GADGETRON_ImageComment": "FALLBACK CG-SENSE (x)", "GADGETRON_SeqDescription": "_semrecon_unet_tv"}
    assert series_description(fallback) == "semrecon unet + tv FALLBACK"


def _tree(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_dicom_output_is_all_or_nothing(scan: Path, tmp_path: Path, capsys) -> None:
    good = _oblique_image(1, np.ones((4, 6)), (0.0, 0.0, 0.0))
    bad = _oblique_image(2, np.ones((4, 6)), (0.0, 0.0, 1.0))
    bad.read_dir = (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="read_dir"):
        write_dicom_series(tmp_path / "none", [good, bad])
    assert not (tmp_path / "none").exists() and not list(tmp_path.iterdir())
    # a previous output is replaced as a whole; a directory holding anything else is refused before recon
    previous = tmp_path / "previous"
    write_dicom_series(previous, [good, _oblique_image(2, np.ones((4, 6)), (0.0, 0.0, 1.0))])
    write_dicom_series(previous, [good])
    assert [p.name for p in previous.iterdir()] == ["series003_image0001.dcm"]
    (previous / "notes.txt").write_text("mine")
    before = _tree(previous)
    status = main(["recon", str(scan), str(tmp_path / "o.h5"), "--dicom", str(previous)])
    assert status == 2 and "notes.txt" in capsys.readouterr().err
    assert _tree(previous) == before and not (tmp_path / "o.h5").exists()
    assert main(["recon", str(scan), str(tmp_path / "same"), "--dicom", str(tmp_path / "same")]) == 2
    assert "is also OUT" in capsys.readouterr().err and not (tmp_path / "same").exists()
    (tmp_path / "file").write_text("x")
    assert main(["recon", str(scan), str(tmp_path / "o.h5"), "--dicom", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_replay_writes_one_dicom_series_per_image_series(scan: Path, tmp_path: Path) -> None:
    directory = tmp_path / "dicom"
    assert main(["replay", str(scan), str(tmp_path / "out.h5"), "--dicom", str(directory)]) == 0
    images = read_images(tmp_path / "out.h5", "image_1")
    files = sorted(directory.glob("*.dcm"))
    assert len(files) == len(images) == 2
    for path, image in zip(files, images, strict=True):
        _check_against_image(pydicom.dcmread(path), image)
