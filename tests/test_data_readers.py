"""Readers and Gadgetron-equivalent buffering: ISMRMRD (Shepp–Logan tool files), fastMRI, .npy, BART .cfl."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from semrecon_core.data.buffers import (
    crop_readout,
    drop_discarded_samples,
    noise_bandwidth_scale,
    noise_prewhitener,
    recon_data_from_acquisitions,
)
from semrecon_core.data.readers import calibration_region, load_kspace, read_fastmri, read_ismrmrd
from semrecon_core.metrics import psnr
from tests.helpers import require_tool


def _scaled(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    magnitude = np.abs(image)
    factor = (magnitude * reference).sum(axis=(-2, -1), keepdims=True) / (magnitude**2).sum(
        axis=(-2, -1), keepdims=True
    )
    return magnitude * factor


@pytest.fixture(scope="module")
def shepp_logan_file(shepp_logan_raw: Callable[..., Path]) -> Path:
    """The tool's file (64² to stay fast; the issue's example uses 128²): noise scan,
    2× readout oversampling, R = 2 with 24 ACS lines, 2 × 2 repetitions."""
    return shepp_logan_raw(matrix=64, coils=8, acs=24, repetitions=2)


def test_shepp_logan_file_loads_with_prewhitening_oversampling_and_calibration(shepp_logan_file) -> None:
    kspace = read_ismrmrd(shepp_logan_file)
    # repetitions (2) × acceleration (2) = 4 interleaved repetitions, each its own entry
    assert kspace.shape == (4, 8, 64, 64)  # readout 128 → 64 after oversampling removal
    assert kspace.info == {"noise_scans": 1, "readout_oversampling": 2.0}
    assert kspace.geometry.recon_matrix == (64, 64, 1)
    assert [h.idx.repetition for h in kspace.headers] == [0, 1, 2, 3]
    # R = 2 outside the ACS; the interleaved repetitions sample even / odd lines
    rows = kspace.mask.any(dim=-1)
    assert rows[0, ::2].all() and not rows[0, 1:20:2].any()
    assert rows[1, 1::2].all() and not rows[1, 0:20:2].any()
    # calibration from the 24 reference lines (PARALLEL_CALIBRATION + CALIBRATION_AND_IMAGING)
    assert kspace.calibration.shape == (4, 8, 24, 64)
    assert kspace.ground_truth is not None and kspace.ground_truth.shape == (4, 64, 64)


def test_shepp_logan_cg_sense_is_close_to_the_stored_phantom(shepp_logan_file) -> None:
    from semrecon_core.config import ReconConfig
    from semrecon_core.pipeline import Pipeline, reconstruct

    kspace = read_ismrmrd(shepp_logan_file).select([0, 1])  # even and odd lines: enough, and faster
    assert [h.idx.repetition for h in kspace.headers] == [0, 1]
    config = ReconConfig(backbone="sense", iterations=30, device="cpu")
    maps = Pipeline(config).estimate_maps(kspace)
    result = reconstruct(kspace, config, maps=maps)
    truth = kspace.ground_truth.numpy()
    zero_filled = reconstruct(kspace, config.replace(backbone="zero-filled"), maps=maps).image.numpy()
    value = psnr(truth, _scaled(truth, result.image.numpy()))
    baseline = psnr(truth, _scaled(truth, zero_filled))
    # measured: CG-SENSE 25.8 dB vs zero-filled 17.9 dB (noise 0.05, R = 2, 8 coils, 64², intensity-scaled)
    assert value > 24.0
    assert value > baseline + 5.0


def test_prewhitening_decorrelates_coil_noise() -> None:
    import ismrmrd

    rng = np.random.default_rng(0)
    mixing = np.eye(4) + 0.5 * rng.standard_normal((4, 4))
    noise = [
        ismrmrd.Acquisition.from_array(
            (mixing @ (rng.standard_normal((4, 512)) + 1j * rng.standard_normal((4, 512)))).astype(np.complex64),
            sample_time_us=5.0,
        )
        for _ in range(8)
    ]
    whitener = noise_prewhitener(noise, acquisition_dwell_time_us=5.0, receiver_noise_bandwidth=0.5)
    test = mixing @ (rng.standard_normal((4, 20000)) + 1j * rng.standard_normal((4, 20000)))
    covariance = np.cov(whitener @ test)
    # scale² = 2 · dwell ratio · bandwidth = 1: identity covariance
    np.testing.assert_allclose(covariance, np.eye(4), atol=0.06)


def test_noise_bandwidth_scale_is_gadgetrons() -> None:
    # sqrt(2 · dwell_data / dwell_noise · receiver noise bandwidth)
    assert noise_bandwidth_scale(5.0, 2.5, 0.793) == pytest.approx(np.sqrt(2 * 2 * 0.793))
    assert noise_bandwidth_scale(2.5, 5.0, 0.5) == pytest.approx(np.sqrt(0.5))
    # 1.0 when either dwell time is 0 (no ZeroDivisionError, no zeroed scan)
    assert noise_bandwidth_scale(0.0, 5.0, 0.793) == 1.0
    assert noise_bandwidth_scale(5.0, 0.0, 0.793) == 1.0
    assert noise_bandwidth_scale(0.0, 0.0, 0.793) == 1.0


def test_discard_samples_are_dropped_and_the_centre_kept() -> None:
    import ismrmrd

    data = np.arange(3 * 40, dtype=np.float32).reshape(3, 40).astype(np.complex64)
    # mrpro's files: the centre counts from the first kept sample
    acq = ismrmrd.Acquisition.from_array(data, discard_pre=4, discard_post=6, center_sample=15)
    (kept,) = drop_discarded_samples([acq])
    np.testing.assert_array_equal(kept.data, data[:, 4:34])
    assert (kept.number_of_samples, kept.center_sample, kept.discard_pre, kept.discard_post) == (30, 15, 0, 0)
    assert acq.number_of_samples == 40 and acq.discard_pre == 4  # the input is left alone
    # a symmetric readout's centre counts from the first acquired sample
    (kept,) = drop_discarded_samples(
        [ismrmrd.Acquisition.from_array(data, discard_pre=5, discard_post=5, center_sample=20)]
    )
    assert (kept.number_of_samples, kept.center_sample) == (30, 15)
    with pytest.raises(ValueError, match=r"discard_pre 30 \+ discard_post 10 leave none of its 40 samples"):
        list(drop_discarded_samples([ismrmrd.Acquisition.from_array(data, discard_pre=30, discard_post=10)]))


def test_readout_crop_keeps_the_central_field_of_view() -> None:
    def fft(x: np.ndarray) -> np.ndarray:
        return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x), norm="ortho"))

    def ifft(k: np.ndarray) -> np.ndarray:
        return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k), norm="ortho"))

    image = np.zeros(64, np.complex64)
    image[20:44] = 1 + np.sin(np.arange(24)) + 0.5j  # object inside the central half of the FOV
    cropped = crop_readout(fft(image), 32)
    assert cropped.shape == (32,)
    np.testing.assert_allclose(ifft(cropped), image[16:48], atol=1e-5)


def test_recon_data_has_the_gadgetron_wire_layout(tmp_path) -> None:
    import h5py
    from gadgetron.types.recon_data import ReconBuffer, SamplingDescription

    from semrecon_core.data.readers import _read_acquisitions
    from semrecon_core.data.simulate import write_ismrmrd_raw

    path = write_ismrmrd_raw(tmp_path / "s.h5", matrix=(32, 40), slices=2, coils=4, acceleration=2, acs_width=12)
    with h5py.File(path, "r") as file:
        acquisitions = _read_acquisitions(path, file["dataset"])
        xml = file["dataset/xml"][0].decode()
    (recon_data,) = recon_data_from_acquisitions(acquisitions, xml)
    assert len(recon_data.bits) == 2  # split by slice
    bit = recon_data.bits[1]
    assert isinstance(bit.data, ReconBuffer) and isinstance(bit.data.sampling, SamplingDescription)
    assert bit.data.data.shape == (40, 32, 1, 4, 1, 1, 1)  # [E0, E1, E2, CHA, N, S, LOC], readout 80 → 40
    assert bit.data.data.dtype == np.complex64
    assert bit.data.headers.shape == (32, 1, 1, 1, 1)
    assert bit.data.headers[16, 0, 0, 0, 0].idx.slice == 1
    assert tuple(bit.data.sampling.encoded_matrix) == (40, 32, 1)
    assert tuple(bit.data.sampling.recon_matrix) == (40, 32, 1)
    assert list(bit.data.sampling.sampling_limits[1])[1] == 16
    assert bit.ref is not None and bit.ref.data.shape[3] == 4
    # ref holds only the 12 calibration lines
    filled = [h.number_of_samples > 0 for h in bit.ref.headers[:, 0, 0, 0, 0]]
    assert sum(filled) == 12


def test_calibration_region_finds_the_fully_sampled_centre() -> None:
    mask = np.zeros((32, 20), bool)
    mask[::4] = True
    mask[12:22] = True
    rows, cols = calibration_region(mask)
    assert (rows.start, rows.stop) == (12, 22) and (cols.start, cols.stop) == (0, 20)
    square = np.zeros((32, 32), bool)
    square[10:22, 11:23] = True
    rows, cols = calibration_region(square)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (12, 12)


def test_npy_reader_with_mask_and_input_left_alone(tmp_path) -> None:
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((3, 32, 24)) + 1j * rng.standard_normal((3, 32, 24))).astype(np.complex64)
    np.save(tmp_path / "k.npy", data)
    lines = np.zeros(32, bool)
    lines[::4] = True
    lines[11:21] = True
    np.save(tmp_path / "m.npy", lines)
    kspace = load_kspace(tmp_path / "k.npy", mask=tmp_path / "m.npy")
    assert kspace.shape == (1, 3, 32, 24)
    assert torch.equal(kspace.mask[0, :, 0], torch.from_numpy(lines))
    assert kspace.data[0, :, 23].abs().sum() == 0  # unsampled line zeroed in the copy
    assert kspace.calibration.shape == (1, 3, 10, 24)
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), data)


def test_bart_cfl_reader(tmp_path) -> None:
    rng = np.random.default_rng(2)
    kspace = (rng.standard_normal((2, 4, 30, 20)) + 1j * rng.standard_normal((2, 4, 30, 20))).astype(np.complex64)
    # BART order: (readout x, phase y, z, coils, 1 ... , slices at dim 13)
    bart = np.zeros((20, 30, 1, 4) + (1,) * 9 + (2,), np.complex64)
    bart[:, :, 0, :, ..., :] = np.transpose(kspace, (3, 2, 1, 0)).reshape(20, 30, 4, *(1,) * 9, 2)
    (tmp_path / "k.hdr").write_text("# Dimensions\n" + " ".join(str(n) for n in bart.shape) + "\n")
    bart.ravel(order="F").tofile(tmp_path / "k.cfl")
    loaded = load_kspace(tmp_path / "k.cfl")
    np.testing.assert_array_equal(loaded.data.numpy(), kspace)
    assert loaded.calibration.shape[-2:] == (30, 20)


def _write_cfl(base: Path, array: np.ndarray) -> None:
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(n) for n in array.shape) + "\n")
    np.asarray(array, np.complex64).ravel(order="F").tofile(base.with_suffix(".cfl"))


@pytest.mark.parametrize(("readout", "phase"), [(24, 30), (32, 32)])
def test_bart_masks_are_read_in_barts_order(tmp_path, readout: int, phase: int) -> None:
    """A .cfl mask is (readout, phase) like BART's k-space and ``bart pattern``: readout → kx, phase → ky."""
    rng = np.random.default_rng(3)
    kspace = (rng.standard_normal((readout, phase, 1, 2)) + 1j * rng.standard_normal((readout, phase, 1, 2))).astype(
        np.complex64
    )
    lines = np.zeros(phase, bool)
    lines[::3] = True
    lines[phase // 2 - 6 : phase // 2 + 6] = True
    mask = np.zeros((readout, phase), bool)
    mask[:, lines] = True
    mask[: readout // 4, ~lines] = True  # a few early readout samples on every other line: not symmetric
    _write_cfl(tmp_path / "k", kspace)
    _write_cfl(tmp_path / "mask", mask.astype(np.complex64))
    expected = torch.from_numpy(mask.T.copy())  # (ky, kx)
    loaded = load_kspace(tmp_path / "k.cfl", mask=tmp_path / "mask.cfl")
    assert loaded.shape == (1, 2, phase, readout)
    assert torch.equal(loaded.mask[0], expected)
    # the same k-space as .npy (coils, ky, kx) with the same BART mask
    np.save(tmp_path / "k.npy", np.transpose(kspace[:, :, 0], (2, 1, 0)))
    assert torch.equal(load_kspace(tmp_path / "k.npy", mask=tmp_path / "mask.cfl").mask[0], expected)
    # `bart upat` lines: (1, phase), the same for every readout sample
    _write_cfl(tmp_path / "lines", lines[None].astype(np.complex64))
    assert torch.equal(
        load_kspace(tmp_path / "k.cfl", mask=tmp_path / "lines.cfl").mask[0, :, 0], torch.from_numpy(lines)
    )
    _write_cfl(tmp_path / "wrong", np.ones((phase + 1, readout), np.complex64))
    with pytest.raises(ValueError, match=r"wrong\.cfl: BART mask dimensions \(readout"):
        load_kspace(tmp_path / "k.cfl", mask=tmp_path / "wrong.cfl")


def test_bart_tool_output_reads(tmp_path) -> None:
    bart = require_tool("bart")
    subprocess.run([bart, "phantom", "-x", "32", "-s", "4", str(tmp_path / "img")], check=True, capture_output=True)
    subprocess.run([bart, "fft", "-u", "3", str(tmp_path / "img"), str(tmp_path / "ksp")], check=True)
    kspace = load_kspace(tmp_path / "ksp.cfl")
    assert kspace.shape == (1, 4, 32, 32) and kspace.mask.all()


def _fastmri_file(path, *, slices=2, coils=4, ny=24, nx=32, fully_sampled=False):
    """A small fastMRI-style file: readout (2× oversampled) along rows, columns = phase encoding."""
    import h5py

    from semrecon_core.data.simulate import _coil_kspace, builtin_anatomy

    images = builtin_anatomy((ny, nx), slices)
    full = _coil_kspace(images, coils, np.random.default_rng(0), oversampling=2)  # (s, c, ny, 2nx)
    column_mask = np.zeros(ny, bool)
    column_mask[::2] = True
    column_mask[8:16] = True
    column_mask |= fully_sampled
    kspace = np.swapaxes(full, -1, -2) * column_mask  # (s, c, rows = 2nx readout, cols = ny)
    xml = f"""<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<experimentalConditions><H1resonanceFrequency_Hz>127000000</H1resonanceFrequency_Hz></experimentalConditions>
<encoding><encodedSpace><matrixSize><x>{2 * nx}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>{4 * nx}</x><y>{2 * ny}</y><z>3</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>
<fieldOfView_mm><x>{2 * nx}</x><y>{2 * ny}</y><z>3</z></fieldOfView_mm></reconSpace>
<encodingLimits/><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""
    with h5py.File(path, "w") as file:
        file["kspace"] = kspace.astype(np.complex64)
        file["mask"] = column_mask.astype(np.float32)
        file["ismrmrd_header"] = xml
        file["reconstruction_rss"] = np.swapaxes(images, -1, -2)
    return images


def test_fastmri_reader_puts_phase_encoding_on_ky(tmp_path) -> None:
    images = _fastmri_file(tmp_path / "f.h5")
    kspace = read_fastmri(tmp_path / "f.h5")
    assert kspace.shape == (2, 4, 24, 32)  # (slices, coils, ky = columns, kx = readout without oversampling)
    assert kspace.mask[0, :, 0].sum() == 16 and kspace.mask[0, 9].all()
    assert kspace.calibration.shape == (2, 4, 9, 32)  # lines 8..16 (16 is also an even line)
    np.testing.assert_allclose(kspace.ground_truth.numpy(), images)
    # fully sampled: the coil-combined image (unit-RSS coil maps) is the stored image
    _fastmri_file(tmp_path / "full.h5", fully_sampled=True)
    from semrecon_core.physics.fft import ifft2c

    full = read_fastmri(tmp_path / "full.h5")
    rss = ifft2c(full.data).abs().pow(2).sum(1).sqrt().numpy()
    np.testing.assert_allclose(rss, images, atol=1e-4)


def test_partial_fourier_lines_are_placed_by_the_encoding_centre(tmp_path) -> None:
    import h5py
    import ismrmrd

    from semrecon_core.data.simulate import write_ismrmrd_raw

    full_path = write_ismrmrd_raw(
        tmp_path / "full.h5",
        matrix=(40, 32),
        coils=4,
        acceleration=1,
        acs_width=12,
        noise_scan=False,
        oversampling=1,
    )
    # partial Fourier: lines 0..11 never acquired, the rest renumbered from 0 with the centre at 8
    with h5py.File(full_path, "r") as file:
        xml = file["dataset/xml"][0].decode()
    block = "<minimum>0</minimum><maximum>39</maximum><center>20</center>"
    assert block in xml
    reader = ismrmrd.Dataset(str(full_path), "dataset", mode="r")
    writer = ismrmrd.Dataset(str(tmp_path / "partial.h5"), "dataset", mode="w")
    writer.write_xml_header(xml.replace(block, "<minimum>0</minimum><maximum>27</maximum><center>8</center>").encode())
    for number in range(reader.number_of_acquisitions()):
        acq = reader.read_acquisition(number)
        if acq.idx.kspace_encode_step_1 >= 12:
            acq.idx.kspace_encode_step_1 -= 12
            writer.append_acquisition(acq)
    reader.close()
    writer.close()

    full = read_ismrmrd(full_path)
    partial = read_ismrmrd(tmp_path / "partial.h5")
    rows = partial.mask[0].any(dim=-1)
    assert not rows[:12].any() and rows[12:].all()
    assert torch.equal(partial.data[:, :, 12:], full.data[:, :, 12:])
    assert partial.data[:, :, :12].abs().sum() == 0
    assert partial.calibration.shape == (1, 4, 12, 32)


def test_averages_become_separate_entries(tmp_path) -> None:
    import ismrmrd

    from semrecon_core.data.simulate import write_ismrmrd_raw

    source = write_ismrmrd_raw(tmp_path / "one.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12)
    reader = ismrmrd.Dataset(str(source), "dataset", mode="r")
    writer = ismrmrd.Dataset(str(tmp_path / "two.h5"), "dataset", mode="w")
    writer.write_xml_header(reader.read_xml_header())
    acquisitions = [reader.read_acquisition(i) for i in range(reader.number_of_acquisitions())]
    for average in (0, 1):
        for acq in acquisitions:
            if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and average:
                continue
            acq.idx.average = average
            writer.append_acquisition(acq)
    reader.close()
    writer.close()
    kspace = read_ismrmrd(tmp_path / "two.h5")
    assert kspace.shape == (2, 4, 32, 32)
    assert [h.idx.average for h in kspace.headers] == [0, 1]
    assert torch.equal(kspace.data[0], kspace.data[1])


def test_ismrmrd_stream_reads_like_the_hdf5_file(tmp_path) -> None:
    import ismrmrd
    from ismrmrd.serialization import ProtocolSerializer

    from semrecon_core.data.simulate import write_ismrmrd_raw

    path = write_ismrmrd_raw(tmp_path / "scan.h5", matrix=(32, 32), slices=2, coils=4, acceleration=2, acs_width=12)
    dataset = ismrmrd.Dataset(str(path), "dataset", mode="r")
    header = ismrmrd.xsd.CreateFromDocument(dataset.read_xml_header())
    with (tmp_path / "scan.mrd").open("wb") as handle, ProtocolSerializer(handle) as stream:
        stream.serialize(header)
        for number in range(dataset.number_of_acquisitions()):
            stream.serialize(dataset.read_acquisition(number))
    dataset.close()
    from_file = load_kspace(path)
    from_stream = load_kspace(tmp_path / "scan.mrd")
    assert from_stream.info == from_file.info
    assert torch.equal(from_stream.data, from_file.data) and torch.equal(from_stream.mask, from_file.mask)
    (tmp_path / "junk.mrd").write_bytes(b"\x07\x00garbage")
    with pytest.raises(ValueError, match=r"junk\.mrd: not an HDF5 file"):
        load_kspace(tmp_path / "junk.mrd")


def test_ismrmrd_group_under_another_name_is_found(tmp_path) -> None:
    import h5py

    from semrecon_core.data.simulate import write_ismrmrd_raw

    path = write_ismrmrd_raw(tmp_path / "scan.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12)
    with h5py.File(path, "r") as source, h5py.File(tmp_path / "renamed.h5", "w") as target:
        source.copy("dataset", target, name="meas_0042")
    assert load_kspace(tmp_path / "renamed.h5").shape == load_kspace(path).shape
