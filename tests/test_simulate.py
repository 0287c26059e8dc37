"""The scan simulator: in-memory KSpace and ISMRMRD raw files that round-trip through the readers."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import h5py
import ismrmrd
import numpy as np
import pytest
import torch

from semrecon_core.config import ReconConfig
from semrecon_core.data.readers import read_ismrmrd
from semrecon_core.data.simulate import (
    FOV_MARGIN,
    builtin_anatomy,
    coil_maps,
    place_in_fov,
    simulate_kspace,
    write_ismrmrd_raw,
)
from semrecon_core.metrics import psnr
from semrecon_core.pipeline import Pipeline, reconstruct


def _scaled(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    magnitude = np.abs(image)
    numerator = (magnitude * reference).sum(axis=(-2, -1), keepdims=True)
    return magnitude * numerator / (magnitude**2).sum(axis=(-2, -1), keepdims=True)


def test_simulate_kspace_properties() -> None:
    image = builtin_anatomy((48, 40))
    kspace = simulate_kspace(
        image, coils=6, acceleration=3, acs_width=12, mask_kind="equispaced", fov_margin=0.0, seed=3
    )
    assert kspace.shape == (1, 6, 48, 40) and kspace.data.dtype == torch.complex64
    assert kspace.mask[0].any(dim=1).sum() == 16  # round(48 / 3) lines
    assert kspace.acceleration == pytest.approx(3.0)
    # the 12 ACS lines, plus any equispaced line that happens to touch them
    assert kspace.calibration.shape[:2] == (1, 6) and kspace.calibration.shape[-1] == 40
    assert 12 <= kspace.calibration.shape[-2] <= 14
    np.testing.assert_allclose(kspace.ground_truth.numpy(), image / image.max())
    assert (kspace.data[~kspace.mask.unsqueeze(1).expand_as(kspace.data)] == 0).all()
    again = simulate_kspace(
        image, coils=6, acceleration=3, acs_width=12, mask_kind="equispaced", fov_margin=0.0, seed=3
    )
    assert torch.equal(kspace.data, again.data)  # deterministic from the seed


def test_coil_maps_have_unit_rss() -> None:
    maps = coil_maps(8, (32, 24))
    np.testing.assert_allclose(np.sqrt((np.abs(maps) ** 2).sum(axis=0)), 1.0, rtol=1e-5)


def test_matrix_smaller_than_acs_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the ACS"):
        simulate_kspace(np.ones((16, 16)), acs_width=24)


def test_raw_file_round_trip_with_slices_noise_scan_and_oversampling(tmp_path) -> None:
    path = write_ismrmrd_raw(
        tmp_path / "scan.h5", matrix=(48, 48), slices=3, coils=6, acceleration=2, acs_width=16, seed=1
    )
    with h5py.File(path, "r") as file:
        header = ismrmrd.xsd.CreateFromDocument(file["dataset/xml"][0].decode())
        heads = file["dataset/data"]["head"]
        flags = heads["flags"]
    encoding = header.encoding[0]
    assert (encoding.encodedSpace.matrixSize.x, encoding.reconSpace.matrixSize.x) == (96, 48)
    assert encoding.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 2
    assert encoding.encodingLimits.slice.maximum == 2
    noise = (flags & (1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))) > 0
    assert noise[:16].all() and not noise[16:].any()
    last = (flags & (1 << (ismrmrd.ACQ_LAST_IN_MEASUREMENT - 1))) > 0
    assert last[-1] and last.sum() == 1
    assert ((flags & (1 << (ismrmrd.ACQ_LAST_IN_SLICE - 1))) > 0).sum() == 3
    calibration = (flags & (1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING - 1))) > 0
    assert calibration.sum() == 3 * 16

    kspace = read_ismrmrd(path)
    assert kspace.shape == (3, 6, 48, 48)
    assert kspace.info == {"noise_scans": 16, "readout_oversampling": 2.0}
    assert [h.idx.slice for h in kspace.headers] == [0, 1, 2]
    positions = [h.position[2] for h in kspace.headers]
    assert positions == pytest.approx([-6.0, 0.0, 6.0])  # 5 mm slices + 1 mm gap along the normal
    assert kspace.ground_truth.shape == (3, 48, 48)

    config = ReconConfig(backbone="sense", iterations=30, device="cpu")
    maps = Pipeline(config).estimate_maps(kspace)
    image = reconstruct(kspace, config, maps=maps).image.numpy()
    zero_filled = reconstruct(kspace, config.replace(backbone="zero-filled"), maps=maps).image.numpy()
    truth = kspace.ground_truth.numpy()
    value = psnr(truth, _scaled(truth, image))
    baseline = psnr(truth, _scaled(truth, zero_filled))
    # measured: CG-SENSE 28.3 dB, zero-filled 21.0 dB (48², 6 coils, R = 2 Gaussian mask, 16 ACS lines)
    assert value > 27.0
    assert value > baseline + 5.0


def test_separate_calibration_lines_come_from_the_reference(tmp_path) -> None:
    path = write_ismrmrd_raw(
        tmp_path / "sep.h5",
        matrix=(40, 32),
        coils=4,
        acceleration=2,
        acs_width=12,
        calibration="separate",
        noise_scan=False,
        oversampling=1,
        seed=2,
    )
    kspace = read_ismrmrd(path)
    assert kspace.info == {"noise_scans": 0, "readout_oversampling": 1.0}
    assert kspace.shape == (1, 4, 40, 32)
    assert kspace.calibration.shape == (1, 4, 12, 32)
    # reference lines are separate measurements (own noise), not copies of the imaging lines
    centre = kspace.data[0, :, 14:26]
    assert not torch.allclose(kspace.calibration[0], centre)
    assert torch.allclose(kspace.calibration[0], centre, atol=0.1, rtol=0.0)


def test_simulate_cli_writes_a_readable_file_from_an_image(tmp_path) -> None:
    from semrecon_core.commands.main import main

    image = np.zeros((40, 40), np.float32)
    image[10:30, 12:28] = 1.0
    np.save(tmp_path / "img.npy", image)
    status = main(
        [
            "simulate",
            str(tmp_path / "s.h5"),
            "--image",
            str(tmp_path / "img.npy"),
            "--coils",
            "4",
            "--acs",
            "12",
            "--acceleration",
            "2",
            "--no-noise-scan",
            "--oversampling",
            "1",
        ]
    )
    assert status == 0
    kspace = read_ismrmrd(tmp_path / "s.h5")
    margin = round(FOV_MARGIN * 40)  # the object inside the field of view: zeros on each side
    np.testing.assert_allclose(kspace.ground_truth[0].numpy(), np.pad(image, margin))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_header_leaves_out_the_version_and_follows_the_schema_order(tmp_path) -> None:
    """libismrmrd refuses a <version> other than its own; the schema's xs:sequence fixes the element order."""
    path = write_ismrmrd_raw(tmp_path / "scan.h5", matrix=(32, 32), slices=2, coils=4, acceleration=2, acs_width=12)
    with h5py.File(path, "r") as file:
        xml = file["dataset/xml"][0].decode()
    root = ET.fromstring(xml)
    assert root.find("{http://www.ismrm.org/ISMRMRD}version") is None
    # ismrmrd's schema bindings write elements in the schema's order: a header in that order survives unchanged
    again = ET.fromstring(ismrmrd.xsd.ToXML(ismrmrd.xsd.CreateFromDocument(xml)))
    assert [e.tag for e in root.iter()] == [e.tag for e in again.iter()]


def test_ground_truth_is_kept_inside_the_ismrmrd_group(tmp_path) -> None:
    """One top-level group, as ismrmrd-tools writes (readers such as mrpro open the file's last group)."""
    path = write_ismrmrd_raw(tmp_path / "scan.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12)
    with h5py.File(path, "r") as file:
        assert list(file.keys()) == ["dataset"]
        truth = file["dataset/ground_truth"][()]
    kspace = read_ismrmrd(path)
    np.testing.assert_array_equal(kspace.ground_truth.numpy(), truth)
    # files written before keep it in a top-level group 'semrecon': still read
    with h5py.File(path, "a") as file:
        file.move("dataset/ground_truth", "semrecon/ground_truth")
    np.testing.assert_array_equal(read_ismrmrd(path).ground_truth.numpy(), truth)


def test_place_in_fov_pads_every_side_and_refuses_bad_margins() -> None:
    images = np.ones((2, 40, 20), np.float32)
    placed = place_in_fov(images, 0.1)
    assert placed.shape == (2, 48, 24)
    assert placed[:, 4:44, 2:22].min() == 1.0 and placed.sum() == images.sum()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fov_margin"):
            place_in_fov(images, bad)


@pytest.mark.parametrize("name", ["pd_01", "pd_05"])
def test_a_cropped_knee_inside_the_field_of_view_is_a_fair_case(shared_data, name: str) -> None:
    """Real knee crops touch every edge: only inside a margin is ESPIRiT-map CG-SENSE above zero-filled."""
    from skimage.transform import resize

    path = shared_data / "knee_fastmri_rss" / f"{name}.npy"

    image = resize(np.load(path), (96, 96), anti_aliasing=True)
    scores = {}
    for margin in (0.0, FOV_MARGIN):
        kspace = simulate_kspace(image, coils=8, acceleration=4, acs_width=20, fov_margin=margin, seed=0)
        config = ReconConfig(backbone="sense", calib_width=20)
        maps = Pipeline(config).estimate_maps(kspace)
        sense = psnr(kspace.ground_truth, reconstruct(kspace, config, maps=maps).image)
        zero = psnr(kspace.ground_truth, reconstruct(kspace, config.replace(backbone="zero-filled"), maps=maps).image)
        scores[margin] = sense - zero
    assert scores[FOV_MARGIN] > 1.0, scores  # fair: CG-SENSE clearly above zero-filled
    assert scores[0.0] < scores[FOV_MARGIN] - 2.0, scores  # the edge-touching crop is the cause
