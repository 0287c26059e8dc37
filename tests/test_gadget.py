"""The gadget target: properties first, images and meta, pass-through, labelled fallbacks."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from semrecon_core.config import ConfigError  # noqa: E402
from semrecon_core.gadgetron.chain import InProcessConnection  # noqa: E402
from semrecon_core.gadgetron.gadget import SemreconGadget, reconstruct  # noqa: E402
from semrecon_core.gadgetron.properties import settings_from_configuration  # noqa: E402

SLICES = 2


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    """A small simulated 2-slice scan (4 coils, 64×64, R = 2, 16 embedded ACS lines) as ReconData."""
    from semrecon_core.data.buffers import recon_data_from_acquisitions
    from semrecon_core.data.simulate import write_ismrmrd_raw

    path = write_ismrmrd_raw(
        tmp_path_factory.mktemp("gadget") / "scan.h5",
        matrix=(64, 64),
        slices=SLICES,
        coils=4,
        acceleration=2,
        acs_width=16,
        seed=1,
    )
    dataset = ismrmrd.Dataset(str(path), "dataset", mode="r")
    try:
        header = dataset.read_xml_header().decode("utf-8")
        acquisitions = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
    finally:
        dataset.close()
    recon_data = recon_data_from_acquisitions(acquisitions, header, trigger="repetition", split_slices=True)
    assert len(recon_data) == 1 and len(recon_data[0].bits) == SLICES
    return header, recon_data


def _run(header: str, items: list, configuration: str) -> list:
    sent: list = []
    reconstruct(InProcessConnection(items, header, configuration, sent.append))
    return sent


def _properties(**values: str) -> str:
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in values.items())
    return f"<configuration>{body}</configuration>"


def test_images_per_slice_with_geometry_and_meta(scan: tuple[str, list]) -> None:
    header, recon_data = scan
    acquisition = ismrmrd.Acquisition.from_array(np.ones((4, 16), np.complex64))
    sent = _run(header, [acquisition, *recon_data], _properties(backbone="sense", iterations="10", series_index="5"))
    assert isinstance(sent[0], ismrmrd.Acquisition) and np.array_equal(sent[0].data, acquisition.data)
    images = sent[1:]
    assert len(images) == SLICES
    for number, image in enumerate(images):
        assert image.data.shape == (1, 1, 64, 64) and image.data.dtype == np.float32
        assert tuple(image.matrix_size) == (64, 64, 1)
        assert image.image_type == ismrmrd.IMTYPE_MAGNITUDE
        assert (image.image_index, image.image_series_index, image.slice) == (number + 1, 5, number)
        meta = image.meta
        assert meta["GADGETRON_DataRole"] == "Image"
        assert meta["GADGETRON_ImageComment"].startswith("semrecon CG-SENSE")
        assert meta["GADGETRON_SeqDescription"] == "_semrecon_sense_none"
        assert float(meta["GADGETRON_WindowWidth"]) > 0
        assert float(image.data.max()) > 0 and np.isfinite(image.data).all()
    # slices are 6 mm apart along the slice normal (5 mm thickness + 1 mm gap in the simulation)
    assert images[1].position[2] - images[0].position[2] == pytest.approx(6.0)


def test_properties_are_validated_before_the_first_buffer(scan: tuple[str, list]) -> None:
    header, _ = scan

    def never() -> object:
        raise AssertionError("the gadget read a message before validating its properties")
        yield

    with pytest.raises(ConfigError, match="lamda"):
        reconstruct(InProcessConnection(never(), header, _properties(lamda="1"), lambda item: None))
    with pytest.raises(ConfigError, match="series_index"):
        settings_from_configuration(_properties(series_index="first"))


def test_nan_buffer_gives_labelled_fallback_and_scan_continues(
    scan: tuple[str, list], caplog: pytest.LogCaptureFixture
) -> None:
    header, recon_data = scan
    broken = copy.deepcopy(recon_data[0])
    broken.bits[0].data.data[5, 10, 0, 1] = np.nan
    if broken.bits[0].ref is not None:
        broken.bits[0].ref.data[:] = np.nan
    with caplog.at_level(logging.ERROR):
        images = _run(header, [broken], _properties(backbone="sense", iterations="10"))
    assert len(images) == SLICES
    first, second = images
    assert "NaN" in caplog.text
    assert first.meta["GADGETRON_DataRole"] == "Fallback"
    assert first.meta["GADGETRON_ImageComment"].startswith("FALLBACK zero-filled RSS")
    assert "NaN" in first.meta["GADGETRON_ImageComment"]
    assert first.data.shape == (1, 1, 64, 64) and first.data.max() > 0 and np.isfinite(first.data).all()
    assert (first.image_index, first.slice) == (1, 0)
    assert second.meta["GADGETRON_DataRole"] == "Image"  # the next buffer is reconstructed normally
    assert (second.image_index, second.slice) == (2, 1)


def test_buffer_without_calibration_lines_falls_back(scan: tuple[str, list]) -> None:
    header, recon_data = scan
    broken = copy.deepcopy(recon_data[0])
    bit = broken.bits[1]
    bit.ref = None
    lines = np.flatnonzero(np.abs(bit.data.data).sum(axis=(0, 2, 3, 4, 5, 6)) > 0)
    bit.data.data[:, lines[1::2]] = 0  # keep every other acquired line: no fully sampled centre remains
    for line in lines[1::2]:
        bit.data.headers[line, 0, 0, 0, 0] = ismrmrd.AcquisitionHeader()
    images = _run(header, [broken], _properties(backbone="sense", iterations="10"))
    assert [image.meta["GADGETRON_DataRole"] for image in images] == ["Image", "Fallback"]
    comment = images[1].meta["GADGETRON_ImageComment"]
    assert comment.startswith("FALLBACK") and "calibration" in comment.lower()
    assert images[1].data.max() > 0 and images[1].slice == 1


def test_missing_bank_falls_back_to_labelled_cg_sense(scan: tuple[str, list], tmp_path: Path) -> None:
    header, recon_data = scan
    missing = tmp_path / "no_such_bank.safetensors"
    images = _run(header, recon_data, _properties(backbone="unet", prior="semantic", bank=str(missing), device="cpu"))
    assert len(images) == SLICES
    for image in images:
        comment = image.meta["GADGETRON_ImageComment"]
        assert comment.startswith("FALLBACK CG-SENSE (unet+semantic failed:")
        assert "no_such_bank" in comment
        assert image.meta["GADGETRON_DataRole"] == "Fallback"
        assert image.data.max() > 0


def test_quality_answer_of_an_image_language_prior_goes_into_meta(scan: tuple[str, list]) -> None:
    header, recon_data = scan

    class AnsweringPrior:
        label = "tv (answering)"

        def loss(self, image):  # TV-like smoothness, differentiable
            return (image[..., 1:, :] - image[..., :-1, :]).abs().mean()

        def answer(self, image):
            return [{"answer": "High-quality", "choice": "high", "p_high": 0.8, "p_low": 0.2}] * image.shape[0]

    settings = settings_from_configuration(_properties(backbone="zero-filled"))
    gadget = SemreconGadget(settings, __import__("ismrmrd").xsd.CreateFromDocument(header), prior=AnsweringPrior())
    images = gadget.process(recon_data[0])
    assert images[0].meta["SEMRECON_QualityAnswer"] == "High-quality"
    assert images[0].meta["SEMRECON_QualityChoice"] == "high"
    assert images[0].meta["SEMRECON_P_HIGH"] == "0.8000"


def test_gadget_module_installs_the_gadgetron_fixes() -> None:
    gadgets = str(Path(__file__).resolve().parents[1] / "gadgets")
    sys.path.insert(0, gadgets)
    try:
        import semrecon_gadget

        from semrecon_core.gadgetron import compat
    finally:
        sys.path.remove(gadgets)
    assert compat.installed()
    assert semrecon_gadget.reconstruct is reconstruct
