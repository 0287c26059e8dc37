"""ISMRMRD image output: headers copied from the acquisitions, crop to the recon matrix, atomic writes."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest
import torch

from semrecon_core.data.images import atomic_path, read_images, to_ismrmrd_images, write_images
from semrecon_core.data.kspace import Geometry, KSpace


def _kspace() -> KSpace:
    headers = []
    for entry in range(2):
        head = ismrmrd.AcquisitionHeader()
        head.position[:] = (1.0, 2.0, 3.0 + entry)
        head.read_dir[:] = (0.0, 1.0, 0.0)
        head.phase_dir[:] = (1.0, 0.0, 0.0)
        head.slice_dir[:] = (0.0, 0.0, 1.0)
        head.patient_table_position[:] = (0.0, 0.0, -100.0)
        head.idx.repetition = entry
        head.idx.average = 1
        head.idx.slice = 4
        head.acquisition_time_stamp = 1234 + entry
        headers.append(head)
    geometry = Geometry((40, 36, 1), (32, 30, 1), (250.0, 225.0, 4.0), (200.0, 187.5, 4.0))
    data = torch.zeros(2, 2, 36, 40, dtype=torch.complex64)
    return KSpace(
        data=data,
        mask=torch.ones(2, 36, 40, dtype=torch.bool),
        calibration=data[:, :, 10:26],
        geometry=geometry,
        headers=tuple(headers),
    )


def test_images_carry_headers_and_recon_geometry_through_a_file(tmp_path) -> None:
    kspace = _kspace()
    image = torch.randn(2, 36, 40, dtype=torch.complex64)
    images = to_ismrmrd_images(image, kspace, series_index=5, meta={"GADGETRON_ImageComment": "CG-SENSE"})
    path = write_images(tmp_path / "out.h5", images, xml_header="<ismrmrdHeader/>")
    back = read_images(path)
    assert len(back) == 2
    for number, img in enumerate(back):
        assert img.data.shape == (1, 1, 30, 32)  # cropped to the recon matrix (y 30, x 32)
        assert img.data.dtype == np.float32
        assert tuple(img.matrix_size) == (32, 30, 1)
        assert tuple(img.field_of_view) == (200.0, 187.5, 4.0)
        assert tuple(img.position) == (1.0, 2.0, 3.0 + number)
        assert tuple(img.read_dir) == (0.0, 1.0, 0.0) and tuple(img.phase_dir) == (1.0, 0.0, 0.0)
        assert tuple(img.patient_table_position) == (0.0, 0.0, -100.0)
        assert (img.repetition, img.average, img.slice) == (number, 1, 4)
        assert img.acquisition_time_stamp == 1234 + number
        assert (img.image_index, img.image_series_index) == (number + 1, 5)
        assert img.image_type == ismrmrd.IMTYPE_MAGNITUDE
        assert img.meta["GADGETRON_ImageComment"] == "CG-SENSE"
        assert img.meta["GADGETRON_DataRole"] == "Image"
        expected = image[number, 3:33, 4:36].abs().numpy()
        np.testing.assert_allclose(img.data[0, 0], expected, rtol=1e-6)
    assert ismrmrd.Image.from_bytes(images[0].to_bytes()).image_index == 1


def test_image_slices_must_match_the_kspace() -> None:
    with pytest.raises(ValueError, match="3 slices, but the k-space has 2"):
        to_ismrmrd_images(torch.zeros(3, 36, 40), _kspace())
    with pytest.raises(ValueError, match="expected \\(slices, y, x\\)"):
        to_ismrmrd_images(torch.zeros(1, 2, 36, 40), _kspace())


def test_failed_write_leaves_the_previous_file_untouched(tmp_path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def write_and_fail() -> None:
        with atomic_path(target) as temp:
            temp.write_bytes(b"partial")
            raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_and_fail()
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]
