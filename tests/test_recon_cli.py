"""``semrecon recon`` end to end, and its handling of bad input (clear message, exit 2, input untouched)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from semrecon_core.commands.main import main
from semrecon_core.data.images import read_images
from semrecon_core.data.simulate import write_ismrmrd_raw


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.h5"
    return write_ismrmrd_raw(path, matrix=(40, 40), slices=2, coils=4, acceleration=2, acs_width=12, seed=0)


def _rewrite(source: Path, target: Path, change) -> Path:
    """Copy an ISMRMRD raw file acquisition by acquisition, passing each through ``change(number, acq)``."""
    with h5py.File(source, "r") as file:
        xml = file["dataset/xml"][0]
    reader = ismrmrd.Dataset(str(source), "dataset", mode="r")
    writer = ismrmrd.Dataset(str(target), "dataset", mode="w")
    writer.write_xml_header(xml)
    for number in range(reader.number_of_acquisitions()):
        writer.append_acquisition(change(number, reader.read_acquisition(number)))
    reader.close()
    writer.close()
    return target


def test_recon_writes_images_npy_png_and_trace(scan: Path, tmp_path: Path, capsys) -> None:
    before = _digest(scan)
    out = tmp_path / "images.h5"
    extras = ["--npy", str(tmp_path / "img.npy"), "--png", str(tmp_path / "img.png")]
    extras += ["--trace", str(tmp_path / "t.json"), "--iterations", "20", "--series-index", "7"]
    status = main(["recon", str(scan), str(out), *extras])
    assert status == 0
    assert _digest(scan) == before  # input never modified
    printed = capsys.readouterr().out
    assert "CG-SENSE" in printed and "PSNR" in printed and "SSIM" in printed
    images = read_images(out)
    assert [img.image_index for img in images] == [1, 2]
    assert {img.image_series_index for img in images} == {7}
    assert [img.slice for img in images] == [0, 1]
    assert images[0].data.shape == (1, 1, 40, 40) and images[0].data.dtype == np.float32
    assert tuple(images[0].field_of_view) == (220.0, 220.0, 5.0)
    assert images[1].position[2] == pytest.approx(3.0)
    assert "CG-SENSE" in images[0].meta["GADGETRON_ImageComment"]
    array = np.load(tmp_path / "img.npy")
    assert array.shape == (2, 40, 40) and np.iscomplexobj(array)
    np.testing.assert_allclose(np.abs(array[1]), images[1].data[0, 0], rtol=1e-5)
    assert (tmp_path / "img.png").read_bytes()[:4] == b"\x89PNG"
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["iterations"] and "iteration" in trace["iterations"][0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_recon_tv_and_set_options(scan: Path, tmp_path: Path, capsys) -> None:
    status = main(["recon", str(scan), str(tmp_path / "tv.h5"), "--prior", "tv", "--set", "iterations=15"])
    assert status == 0
    assert "lambda 0.003, 15 iterations" in read_images(tmp_path / "tv.h5")[0].meta["GADGETRON_ImageComment"]


def _fails(args: list[str], capsys, *expected: str) -> str:
    status = main(args)
    message = capsys.readouterr().err
    assert status == 2, message
    for text in expected:
        assert text in message
    return message


def test_unknown_property_is_named(scan: Path, tmp_path: Path, capsys) -> None:
    _fails(["recon", str(scan), str(tmp_path / "o.h5"), "--set", "lamda=1"], capsys, "lamda")


def test_non_hdf5_and_truncated_files(scan: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("not a scan\n")
    _fails(["recon", str(text), str(tmp_path / "o.h5")], capsys, "notes.h5", "not an HDF5 file")
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
    before = _digest(truncated)
    _fails(["recon", str(truncated), str(tmp_path / "o.h5")], capsys, "cut.h5", "truncated")
    assert _digest(truncated) == before
    assert not (tmp_path / "o.h5").exists()


def test_hdf5_without_ismrmrd_header(scan: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as file:
        file["something"] = np.zeros(3)
    _fails(["recon", str(bare), str(tmp_path / "o.h5")], capsys, "bare.h5", "without an ISMRMRD header")
    no_xml = tmp_path / "noxml.h5"
    with h5py.File(scan, "r") as source, h5py.File(no_xml, "w") as file:
        source.copy("dataset/data", file, name="dataset/data")
    _fails(["recon", str(no_xml), str(tmp_path / "o.h5")], capsys, "noxml.h5", "no ISMRMRD XML header")


def test_inconsistent_channel_counts(scan: Path, tmp_path: Path, capsys) -> None:
    def drop_channel(number: int, acq):
        if number != 30:
            return acq
        head = acq.getHead()
        head.active_channels = 3
        return ismrmrd.Acquisition(head, np.ascontiguousarray(acq.data[:3]))

    bad = _rewrite(scan, tmp_path / "channels.h5", drop_channel)
    _fails(["recon", str(bad), str(tmp_path / "o.h5")], capsys, "channels.h5", "inconsistent channel counts")


def test_nan_samples(scan: Path, tmp_path: Path, capsys) -> None:
    def poison(number: int, acq):
        if number == 40:
            acq.data[1, 5] = np.nan
        return acq

    bad = _rewrite(scan, tmp_path / "nan.h5", poison)
    _fails(["recon", str(bad), str(tmp_path / "o.h5")], capsys, "nan.h5", "acquisition #40", "NaN or Inf")


def test_mask_without_calibration_region(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    kspace = (rng.standard_normal((4, 32, 32)) + 1j * rng.standard_normal((4, 32, 32))).astype(np.complex64)
    np.save(tmp_path / "k.npy", kspace)
    lines = np.zeros(32, bool)
    lines[::3] = True  # equispaced, no fully sampled centre
    np.save(tmp_path / "mask.npy", lines)
    _fails(
        ["recon", str(tmp_path / "k.npy"), str(tmp_path / "o.h5"), "--mask", str(tmp_path / "mask.npy")],
        capsys,
        "k.npy",
        "no fully sampled calibration region",
    )


def test_matrix_smaller_than_acs(tmp_path: Path, capsys) -> None:
    _fails(
        ["simulate", str(tmp_path / "s.h5"), "--matrix", "16", "--acs", "24"],
        capsys,
        "matrix 16×16 is smaller than the ACS region (24 lines)",
    )
    assert not (tmp_path / "s.h5").exists()


def test_output_may_not_overwrite_the_input(scan: Path, capsys) -> None:
    before = _digest(scan)
    _fails(["recon", str(scan), str(scan)], capsys, "would overwrite the input")
    assert _digest(scan) == before


def test_failed_coil_maps_are_an_error_not_a_wrong_image(tmp_path: Path, capsys) -> None:
    from semrecon_core.data.simulate import builtin_anatomy, simulate_kspace

    # a tiny noise-free scan with a 10-line calibration block: ESPIRiT finds (almost) no sensitivities
    kspace = simulate_kspace(
        builtin_anatomy((24, 32)),
        coils=4,
        acceleration=2,
        acs_width=9,
        noise_std=0,
        mask_kind="equispaced",
        fov_margin=0.0,
    )
    np.save(tmp_path / "tiny.npy", kspace.data[0].numpy())
    _fails(
        ["recon", str(tmp_path / "tiny.npy"), str(tmp_path / "o.h5")],
        capsys,
        "tiny.npy",
        "coil maps cover only",
    )
    assert not (tmp_path / "o.h5").exists()
