"""Outputs of ``semrecon recon`` and ``semrecon replay``: image order, orientation without a header, pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from semrecon_core.commands.main import main
from semrecon_core.data.images import read_images
from semrecon_core.data.simulate import write_ismrmrd_raw


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-slice scan whose slices were acquired in the interleaved order 0, 2, 1."""
    folder = tmp_path_factory.mktemp("interleaved")
    source = write_ismrmrd_raw(
        folder / "ordered.h5", matrix=(32, 32), slices=3, coils=4, acceleration=2, acs_width=12, seed=1
    )
    with h5py.File(source, "r") as file:
        xml = file["dataset/xml"][0]
    reader = ismrmrd.Dataset(str(source), "dataset", mode="r")
    acquisitions = [reader.read_acquisition(i) for i in range(reader.number_of_acquisitions())]
    reader.close()
    target = folder / "interleaved.h5"
    writer = ismrmrd.Dataset(str(target), "dataset", mode="w")
    writer.write_xml_header(xml)
    ordered = [acq for slice_index in (0, 2, 1) for acq in acquisitions if acq.idx.slice == slice_index]
    for acq in ordered:  # the last line acquired ends the repetition and the measurement
        for flag in (ismrmrd.ACQ_LAST_IN_REPETITION, ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            if acq is ordered[-1]:
                acq.setFlag(flag)
            else:
                acq.clearFlag(flag)
        writer.append_acquisition(acq)
    writer.close()
    return target


def _check_slice_order(images: list) -> None:
    assert [img.slice for img in images] == [0, 1, 2]
    assert [img.image_index for img in images] == [1, 2, 3]
    heights = [float(img.position[2]) for img in images]
    assert heights == sorted(heights) and len(set(heights)) == 3


def test_recon_numbers_interleaved_slices_in_slice_order(interleaved: Path, tmp_path: Path) -> None:
    out, npy = tmp_path / "images.h5", tmp_path / "images.npy"
    assert main(["recon", str(interleaved), str(out), "--npy", str(npy)]) == 0
    images = read_images(out)
    _check_slice_order(images)
    stack = np.load(npy)
    for plane, image in zip(stack, images, strict=True):
        np.testing.assert_allclose(np.abs(plane), image.data[0, 0], rtol=1e-5, atol=1e-7)


def test_default_replay_numbers_interleaved_slices_in_slice_order(interleaved: Path, tmp_path: Path) -> None:
    out = tmp_path / "replayed.h5"
    assert main(["replay", str(interleaved), str(out)]) == 0
    _check_slice_order(read_images(out, "image_1"))


def _headerless_kspace(folder: Path) -> tuple[Path, Path]:
    """The same 2-slice scan as ``.npy`` ``(slices, coils, ky, kx)`` and as BART ``.cfl`` (no geometry in either)."""
    from semrecon_core.data.simulate import builtin_anatomy, simulate_kspace

    scan = simulate_kspace(builtin_anatomy((28, 28), 2), coils=4, acceleration=2, acs_width=12)
    data = scan.data.numpy()
    np.save(folder / "k.npy", data)
    bart = np.transpose(data, (3, 2, 1, 0)).reshape(data.shape[3], data.shape[2], 1, data.shape[1], *(1,) * 9, 2)
    (folder / "k.hdr").write_text("# Dimensions\n" + " ".join(str(n) for n in bart.shape) + "\n")
    bart.ravel(order="F").tofile(folder / "k.cfl")
    return folder / "k.npy", folder / "k.cfl"


def test_headerless_input_gets_the_identity_orientation_and_says_so(tmp_path: Path, caplog) -> None:
    for source in _headerless_kspace(tmp_path):
        out = tmp_path / f"{source.suffix[1:]}.h5"
        assert main(["recon", str(source), str(out), "--backbone", "zero-filled"]) == 0
        images = read_images(out)
        assert len(images) == 2
        for number, image in enumerate(images):
            assert tuple(image.read_dir) == (1.0, 0.0, 0.0)
            assert tuple(image.phase_dir) == (0.0, 1.0, 0.0)
            assert tuple(image.slice_dir) == (0.0, 0.0, 1.0)
            assert "identity" in image.meta["SEMRECON_Orientation"]
            assert float(image.position[2]) == pytest.approx(number - 0.5)  # slices 1 mm apart, centred
        assert "no orientation" in caplog.text


def test_recon_into_a_closed_pipe_writes_its_outputs_and_exits_like_a_killed_pipe_writer(
    interleaved: Path, tmp_path: Path
) -> None:
    """``semrecon recon IN OUT | head``: the reader is gone when the summary is printed (status 141, no message)."""
    out = tmp_path / "piped.h5"
    command = [sys.executable, "-m", "semrecon_core.commands.main", "recon", str(interleaved), str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # like head after its lines: nobody reads the summary
    errors = child.stderr.read().decode()
    assert child.wait(timeout=300) == 141, errors
    assert "Traceback" not in errors and "Broken pipe" not in errors and "error" not in errors
    assert [img.slice for img in read_images(out)] == [0, 1, 2]
