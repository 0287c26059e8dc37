"""Raw-acquisition geometry on every path: oversampling decided by the field of view, partial echoes.

The paths share :class:`~semrecon_core.data.readers.ScanAssembler` (recon, replay's buffers, the MRD server) and
:func:`~semrecon_core.data.images.crop_to_recon` (every image), so each defect is tested once there and once
through a command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ismrmrd = pytest.importorskip("ismrmrd")

from semrecon_core.commands.main import main  # noqa: E402
from semrecon_core.data.images import crop_to_recon, read_images  # noqa: E402
from semrecon_core.data.kspace import Geometry, KSpace  # noqa: E402
from semrecon_core.data.readers import read_ismrmrd  # noqa: E402
from semrecon_core.data.simulate import write_ismrmrd_raw  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")


def _rewrite(source: Path, target: Path, *, xml: str | None = None, change=None) -> Path:  # type: ignore[no-untyped-def]
    """A copy of ``source`` with another header and/or each acquisition passed through ``change``."""
    dataset = ismrmrd.Dataset(str(source), "dataset", create_if_needed=False)
    header = dataset.read_xml_header().decode()
    acquisitions = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
    dataset.close()
    out = ismrmrd.Dataset(str(target), "dataset", create_if_needed=True)
    out.write_xml_header((xml or header).encode())
    for acq in acquisitions:
        out.append_acquisition(change(acq) if change else acq)
    out.close()
    return target


def test_readout_oversampling_is_removed_when_the_recon_matrix_is_as_large(tmp_path: Path) -> None:
    """Encoded 64 samples over 2 × 220 mm, recon matrix 64 over 220 mm (interpolation): 32 samples kept."""
    scan = write_ismrmrd_raw(
        tmp_path / "scan.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12, oversampling=2
    )
    dataset = ismrmrd.Dataset(str(scan), "dataset", create_if_needed=False)
    xml = dataset.read_xml_header().decode()
    dataset.close()
    recon = xml.split("<reconSpace>")[1].split("</reconSpace>")[0]
    bigger = recon.replace("<x>32</x><y>32</y>", "<x>64</x><y>64</y>")
    assert bigger != recon
    interpolated = _rewrite(scan, tmp_path / "interpolated.h5", xml=xml.replace(recon, bigger))
    kspace = read_ismrmrd(interpolated)
    assert kspace.info["readout_oversampling"] == 2.0
    assert kspace.shape[-1] == 32  # not 64 samples spanning 440 mm
    assert main(["recon", str(interpolated), str(tmp_path / "out.h5"), "--set", "calib_width=12"]) == 0
    (image,) = read_images(tmp_path / "out.h5", group="images")
    assert image.data.shape[-2:] == (32, 32) and tuple(image.field_of_view)[:2] == pytest.approx((220.0, 220.0))


def test_phase_oversampling_is_cropped_by_the_field_of_view() -> None:
    """Encoded 40 rows over 275 mm, recon 64 rows over 220 mm: the central 32 rows are the recon FOV."""
    geometry = Geometry(
        encoded_matrix=(32, 40, 1), recon_matrix=(64, 64, 1), encoded_fov_mm=(220, 275, 5), recon_fov_mm=(220, 220, 5)
    )
    kspace = KSpace(
        data=torch.zeros(1, 1, 40, 32, dtype=torch.complex64),
        mask=torch.ones(1, 40, 32, dtype=torch.bool),
        calibration=torch.zeros(1, 1, 8, 8, dtype=torch.complex64),
        geometry=geometry,
    )
    image = torch.arange(40 * 32, dtype=torch.float32).reshape(1, 40, 32)
    cropped = crop_to_recon(image, kspace)
    assert tuple(cropped.shape) == (1, 32, 32)
    assert torch.equal(cropped, image[:, 4:36])


def test_full_echo_calibration_goes_with_partial_echo_imaging_lines(tmp_path: Path) -> None:
    """Separate full-echo ACS lines and imaging lines missing their first quarter (zero-padded as Gadgetron)."""
    scan = write_ismrmrd_raw(
        tmp_path / "scan.h5",
        matrix=(32, 32),
        coils=4,
        acceleration=2,
        acs_width=12,
        calibration="separate",
        oversampling=2,
    )
    missing = 16  # of 64 samples

    def partial(acq):  # type: ignore[no-untyped-def]
        if acq.isFlagSet(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) or acq.isFlagSet(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            return acq
        head = acq.getHead()
        head.number_of_samples -= missing
        head.center_sample -= missing
        return ismrmrd.Acquisition(head, np.ascontiguousarray(acq.data[:, missing:]))

    full = read_ismrmrd(scan)
    echo = read_ismrmrd(_rewrite(scan, tmp_path / "partial.h5", change=partial))
    assert echo.shape == full.shape
    sampled = full.mask[0].any(dim=1)
    # the calibration block is the full echo's; the imaging lines keep their measured samples
    torch.testing.assert_close(echo.calibration, full.calibration)
    centre = slice(24, 32)  # well inside the measured part of the readout after oversampling removal
    error = (echo.data[0][:, sampled][..., centre] - full.data[0][:, sampled][..., centre]).abs().max()
    assert float(error) < 0.2 * float(full.data[0][:, sampled][..., centre].abs().max())
    assert main(["recon", str(tmp_path / "partial.h5"), str(tmp_path / "out.h5"), "--set", "calib_width=12"]) == 0
    for chain in ("semrecon_cgsense", "semrecon_tv"):
        config = Path(__file__).resolve().parents[1] / "config" / f"{chain}.xml"
        output = tmp_path / f"{chain}.h5"
        args = ["--set", "calib_width=12", "--set", "device=cpu", "--set", "iterations=5"]
        assert main(["replay", str(tmp_path / "partial.h5"), str(output), "--config", str(config), *args]) == 0
