"""Conformance with independent ISMRMRD software: libismrmrd and its schema, BART, mrpro's and Gadgetron's rules.

Each test that needs an external tool skips, naming the Debian package, when the tool is absent:
``ismrmrd_test_xml`` (ismrmrd-tools), ``xmllint`` (libxml2-utils) with ``/usr/share/ismrmrd/schema/ismrmrd.xsd``
(ismrmrd-schema), ``bart`` (bart). The rest rewrite simulated scans the way other writers do (discard samples,
zero dwell times) and check the reconstruction against the simulation's ground truth.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from semrecon_core.commands.main import main
from semrecon_core.config import ReconConfig
from semrecon_core.data.buffers import noise_bandwidth_scale
from semrecon_core.data.readers import load_kspace, read_cfl, read_ismrmrd
from semrecon_core.data.simulate import DWELL_TIME_US, RECEIVER_NOISE_BANDWIDTH, write_ismrmrd_raw
from semrecon_core.metrics import psnr
from semrecon_core.pipeline import reconstruct

ismrmrd = pytest.importorskip("ismrmrd")

SCHEMA = Path("/usr/share/ismrmrd/schema/ismrmrd.xsd")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"'{name}' is not on PATH (install the Debian package {package})")
    return path


def _scaled(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    magnitude = np.abs(image).astype(np.float64)
    return magnitude * (magnitude * reference).sum() / (magnitude**2).sum()


def _fitted_psnr(reference: np.ndarray, image: np.ndarray) -> float:
    return psnr(reference, _scaled(reference, image))


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated scan: noise scan, 2× readout oversampling, 32², 4 coils, R = 2, 12 ACS lines."""
    return write_ismrmrd_raw(
        tmp_path_factory.mktemp("scan") / "scan.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12, seed=4
    )


def _rewrite(source: Path, target: Path, change: Callable[[int, Any], Any]) -> Path:
    """Copy an ISMRMRD raw file (header, ground truth) with every acquisition passed through ``change``."""
    reader = ismrmrd.Dataset(str(source), "dataset", mode="r")
    writer = ismrmrd.Dataset(str(target), "dataset", mode="w")
    try:
        writer.write_xml_header(reader.read_xml_header())
        for number in range(reader.number_of_acquisitions()):
            writer.append_acquisition(change(number, reader.read_acquisition(number)))
    finally:
        reader.close()
        writer.close()
    with h5py.File(source, "r") as original, h5py.File(target, "a") as copy:
        copy["dataset/ground_truth"] = original["dataset/ground_truth"][()]
    return target


def _with_discards(acq: Any, pre: int, post: int, centre: int, rng: np.random.Generator) -> Any:
    """``acq`` with ``pre``/``post`` samples of large junk around its data, flagged as discard samples."""
    channels, samples = acq.data.shape
    junk = 100 * (rng.standard_normal((channels, pre + post)) + 1j * rng.standard_normal((channels, pre + post)))
    data = np.concatenate([junk[:, :pre], acq.data, junk[:, pre:]], axis=1).astype(np.complex64)
    head = acq.getHead()
    head.number_of_samples = samples + pre + post
    head.discard_pre, head.discard_post, head.center_sample = pre, post, centre
    return ismrmrd.Acquisition(head, data)


def _header(path: Path) -> str:
    with h5py.File(path, "r") as file:
        raw = file["dataset/xml"][0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# ------------------------------------------------------------------------------ ISMRMRD XML header
def _check_header(xml: str, folder: Path) -> None:
    """The header passes ``ismrmrd_test_xml`` (libismrmrd's parser and serializer) and the ISMRMRD schema."""
    path = folder / "header.xml"
    path.write_text(xml)
    tool = _tool("ismrmrd_test_xml", "ismrmrd-tools")
    # the tool writes raw.xml and processed.xml into its working directory: keep them in the test's folder
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=False, cwd=folder)
    assert result.returncode == 0, f"ismrmrd_test_xml: {result.stderr.strip()}"
    xmllint = _tool("xmllint", "libxml2-utils")
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} is missing (install the Debian package ismrmrd-schema)")
    result = subprocess.run(
        [xmllint, "--noout", "--schema", str(SCHEMA), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"xmllint: {result.stderr.strip()}"


@pytest.mark.parametrize("calibration", ["embedded", "separate"])
def test_simulated_header_passes_libismrmrd_and_the_schema(tmp_path: Path, calibration: str) -> None:
    path = write_ismrmrd_raw(
        tmp_path / "scan.h5", matrix=(32, 40), slices=2, coils=4, acceleration=2, acs_width=12, calibration=calibration
    )
    _check_header(_header(path), tmp_path)


def test_output_images_carry_a_valid_header(scan: Path, tmp_path: Path) -> None:
    """recon and replay copy the scan's header into their images files: it must stay valid there."""
    assert main(["recon", str(scan), str(tmp_path / "recon.h5"), "--iterations", "2", "--device", "cpu"]) == 0
    assert main(["replay", str(scan), str(tmp_path / "replay.h5"), "--set", "iterations=2", "--set", "device=cpu"]) == 0
    for name in ("recon.h5", "replay.h5"):
        with h5py.File(tmp_path / name, "r") as file:
            groups = [key for key in file if "xml" in file[key]]
            assert groups, f"{name}: no ISMRMRD header"
            raw = file[groups[0]]["xml"][0]
        _check_header(raw.decode() if isinstance(raw, bytes) else str(raw), tmp_path)


def test_ground_truth_lives_in_the_last_group(scan: Path) -> None:
    """mrpro opens ``file[list(file.keys())[-1]]``: that must be the ISMRMRD group with the scan."""
    with h5py.File(scan, "r") as file:
        last = file[list(file.keys())[-1]]
        assert {"xml", "data", "ground_truth"} <= set(last.keys())
        count = last["data"].shape[0]
    with ismrmrd.File(str(scan), "r") as file:  # as mrpro's KData.from_file reads it
        dataset = file[list(file.keys())[-1]]
        assert dataset.header.acquisitionSystemInformation.receiverChannels == 4
        assert len(dataset.acquisitions[:]) == count
    assert read_ismrmrd(scan).ground_truth is not None


# ---------------------------------------------------------------------------------- discard samples
@pytest.mark.parametrize(
    ("pre", "post", "centre_counts_from"),
    [(10, 20, "kept"), (8, 8, "acquired")],
    ids=["mrpro-style", "symmetric"],
)
def test_discard_samples_on_every_readout_are_dropped(
    scan: Path, tmp_path: Path, pre: int, post: int, centre_counts_from: str
) -> None:
    """Every acquisition (noise scan included) carries junk discard samples: the k-space is the scan's own."""
    rng = np.random.default_rng(0)

    def pad(_: int, acq: Any) -> Any:
        centre = acq.center_sample + (pre if centre_counts_from == "acquired" else 0)
        return _with_discards(acq, pre, post, centre, rng)

    padded = read_ismrmrd(_rewrite(scan, tmp_path / "padded.h5", pad))
    original = read_ismrmrd(scan)
    assert padded.shape == original.shape
    torch.testing.assert_close(padded.data, original.data, rtol=1e-4, atol=1e-5)
    truth = padded.ground_truth.numpy()
    config = ReconConfig(backbone="sense", iterations=20, device="cpu")
    # measured 25.2 dB, as for the scan without discard samples (zero-filled 18.8 dB)
    assert _fitted_psnr(truth, reconstruct(padded, config).image.numpy()) > 24.0


def test_discard_samples_on_some_readouts_are_dropped(scan: Path, tmp_path: Path) -> None:
    """As in mrpro's test files: the first five imaging readouts carry discard samples (zeros), the rest none."""
    imaging = range(16, 21)  # the scan's 16 noise acquisitions come first

    def pad(number: int, acq: Any) -> Any:
        if number not in imaging:
            return acq
        return _with_discards(acq, 10, 20, acq.center_sample, np.random.default_rng(number))

    padded = read_ismrmrd(_rewrite(scan, tmp_path / "some.h5", pad))
    torch.testing.assert_close(padded.data, read_ismrmrd(scan).data, rtol=1e-4, atol=1e-5)


def test_replay_chain_drops_discard_samples(scan: Path, tmp_path: Path) -> None:
    """The chain's NoiseAdjust → RemoveROOversampling → ... → BucketToBuffer stages drop them too."""
    from semrecon_core.emulation.replay import replay

    rng = np.random.default_rng(1)
    padded = _rewrite(scan, tmp_path / "padded.h5", lambda _, acq: _with_discards(acq, 6, 10, acq.center_sample, rng))
    overrides = {"iterations": "3", "device": "cpu"}
    (expected,) = replay(scan, overrides=overrides).images
    (image,) = replay(padded, overrides=overrides).images
    np.testing.assert_allclose(image.data, expected.data, rtol=1e-3, atol=1e-4 * float(np.abs(expected.data).max()))


# -------------------------------------------------------------------------------------- dwell times
def _dwell_changed(scan: Path, target: Path, dwell: Callable[[int, Any], float]) -> Path:
    def change(number: int, acq: Any) -> Any:
        acq.sample_time_us = dwell(number, acq)
        return acq

    return _rewrite(scan, target, change)


def _is_noise(acq: Any) -> bool:
    return bool(acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))


def test_zero_dwell_times_give_scale_one_like_gadgetron(scan: Path, tmp_path: Path) -> None:
    """sample_time_us = 0 everywhere (mrpro's files), or on the noise scan only: the prewhitening scale is 1."""
    original = read_ismrmrd(scan)
    scale = noise_bandwidth_scale(DWELL_TIME_US, DWELL_TIME_US, RECEIVER_NOISE_BANDWIDTH)
    assert scale == pytest.approx(np.sqrt(2 * RECEIVER_NOISE_BANDWIDTH))
    everywhere = read_ismrmrd(_dwell_changed(scan, tmp_path / "zero.h5", lambda _n, _a: 0.0))
    torch.testing.assert_close(everywhere.data * scale, original.data, rtol=1e-4, atol=1e-5)
    noise_only = _dwell_changed(scan, tmp_path / "noise0.h5", lambda _n, a: 0.0 if _is_noise(a) else DWELL_TIME_US)
    torch.testing.assert_close(read_ismrmrd(noise_only).data * scale, original.data, rtol=1e-4, atol=1e-5)


def test_dwell_time_scale_is_per_acquisition(scan: Path, tmp_path: Path) -> None:
    """A zero dwell time on the first imaging line changes that line's scale only, not the whole scan's."""
    first = 16  # the first acquisition after the 16 noise acquisitions
    changed = read_ismrmrd(
        _dwell_changed(scan, tmp_path / "one0.h5", lambda n, a: 0.0 if n == first else float(a.sample_time_us))
    )
    original = read_ismrmrd(scan)
    with h5py.File(scan, "r") as file:
        line = int(file["dataset/data"]["head"]["idx"]["kspace_encode_step_1"][first])
    scale = noise_bandwidth_scale(DWELL_TIME_US, DWELL_TIME_US, RECEIVER_NOISE_BANDWIDTH)
    others = [y for y in range(original.shape[-2]) if y != line]
    torch.testing.assert_close(changed.data[:, :, others], original.data[:, :, others])
    torch.testing.assert_close(changed.data[:, :, line] * scale, original.data[:, :, line], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- BART
def _bart(bart: str, folder: Path, *args: str) -> None:
    subprocess.run([bart, *args], cwd=folder, check=True, capture_output=True, timeout=120)


def test_bart_kspace_and_masks_agree_and_reconstruct_like_bart_pics(tmp_path: Path) -> None:
    """BART's own phantom, 64 readout × 48 phase, 4 coils, ``bart upat`` lines; masks from upat and pattern.

    semrecon reads the readout as kx and phase as ky: its image is ``bart pics``' transposed, and as close
    to the phantom.
    """
    bart = _tool("bart", "bart")
    _bart(bart, tmp_path, "phantom", "-x", "64", "-s", "4", "coils64")
    _bart(bart, tmp_path, "phantom", "-x", "64", "image64")
    _bart(bart, tmp_path, "resize", "-c", "1", "48", "coils64", "coils")
    _bart(bart, tmp_path, "resize", "-c", "1", "48", "image64", "image")
    _bart(bart, tmp_path, "fft", "-u", "3", "coils", "full")
    _bart(bart, tmp_path, "upat", "-Y", "48", "-Z", "1", "-y", "2", "-c", "16", "lines")
    _bart(bart, tmp_path, "fmac", "full", "lines", "kspace")
    _bart(bart, tmp_path, "pattern", "kspace", "pattern")
    _bart(bart, tmp_path, "ecalib", "-m1", "kspace", "maps")
    _bart(bart, tmp_path, "pics", "-l2", "-r", "0.001", "-i", "30", "kspace", "maps", "pics")
    assert read_cfl(tmp_path / "pattern").shape[:2] == (64, 48)  # (readout, phase), BART's order

    from_pattern = load_kspace(tmp_path / "kspace.cfl", mask=tmp_path / "pattern.cfl")
    from_lines = load_kspace(tmp_path / "kspace.cfl", mask=tmp_path / "lines.cfl")
    assert from_pattern.shape == (1, 4, 48, 64)  # (slices, coils, ky = phase, kx = readout)
    assert torch.equal(from_pattern.mask, from_lines.mask)
    lines = np.abs(read_cfl(tmp_path / "lines")).reshape(48) > 0
    assert torch.equal(from_pattern.mask[0], torch.from_numpy(lines)[:, None].expand(48, 64))  # whole ky lines

    image = reconstruct(from_pattern, ReconConfig(backbone="sense", iterations=30, device="cpu")).image.numpy()[0]
    pics = np.abs(read_cfl(tmp_path / "pics")).reshape(64, 48).T
    truth = np.abs(read_cfl(tmp_path / "image")).reshape(64, 48).T
    assert np.corrcoef(np.abs(image).ravel(), pics.ravel())[0, 1] > 0.99  # same orientation as bart pics
    # measured: 18.56 dB semrecon, 18.55 dB bart pics (both against the coil-free phantom)
    assert _fitted_psnr(truth, image) > _fitted_psnr(truth, pics) - 1.0


# ------------------------------------------------------------------------------ display windows
def test_windows_describe_the_pixels_that_leave_the_chain(scan: Path, tmp_path: Path) -> None:
    """After AutoScale + FloatToUShort (the shipped chains) the window spans the uint16 pixels sent on; without
    them (replay's default chain, ``semrecon recon``) it spans the float pixels."""
    from semrecon_core.data.images import read_images

    chain = Path(__file__).resolve().parents[1] / "config" / "semrecon_cgsense.xml"
    settings = ["--set", "iterations=3", "--set", "device=cpu"]
    assert main(["replay", str(scan), str(tmp_path / "display.h5"), "--config", str(chain), *settings]) == 0
    assert main(["replay", str(scan), str(tmp_path / "float.h5"), *settings]) == 0
    assert main(["recon", str(scan), str(tmp_path / "recon.h5"), "--iterations", "3", "--device", "cpu"]) == 0
    for name, group, dtype in (
        ("display.h5", "image_1", np.uint16),
        ("float.h5", "image_1", np.float32),
        ("recon.h5", "images", np.float32),
    ):
        (image,) = read_images(tmp_path / name, group)
        assert image.data.dtype == dtype, name
        top = float(image.data.max())
        assert dtype == np.float32 or 1000 < top <= 4095, (name, top)  # AutoScale put the 99th percentile at 2048
        assert float(image.meta["GADGETRON_WindowWidth"]) == pytest.approx(top, rel=1e-5), name
        assert float(image.meta["GADGETRON_WindowCenter"]) == pytest.approx(top / 2, rel=1e-5), name


def test_replay_warns_when_the_display_properties_do_not_match_the_chain(
    scan: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from semrecon_core.emulation.replay import replay

    chain = Path(__file__).resolve().parents[1] / "config" / "semrecon_cgsense.xml"
    overrides = {"iterations": "1", "device": "cpu", "display_max_value": "0"}
    with caplog.at_level("WARNING"):
        replay(scan, chain=chain, overrides=overrides)
    assert "display_max_value 0" in caplog.text and "AutoScale max_value 2048" in caplog.text, caplog.text
