"""The gadget target: properties first, images true to the scan, ``calib_width`` honoured, pass-through,
labelled fallbacks (never zeros)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from semrecon_core.config import ConfigError, ReconConfig  # noqa: E402
from semrecon_core.data.images import Display, displayed  # noqa: E402
from semrecon_core.emulation.chain import InProcessConnection  # noqa: E402
from semrecon_core.gadgetron.gadget import SemreconGadget, reconstruct  # noqa: E402
from semrecon_core.gadgetron.properties import settings_from_configuration  # noqa: E402
from semrecon_core.metrics import psnr, ssim  # noqa: E402

SLICES = 2
# Measured on this scan: CG-SENSE (10 iterations) 27.6 dB / SSIM 0.84, zero-filled RSS 21.7 dB / 0.64;
# an all-zero image 12.6 dB / 0.29, the truth transposed 11.3 dB / 0.24, noise 13.4 dB / 0.05.
CG_SENSE = (25.0, 0.75)
RSS = (18.0, 0.5)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list, np.ndarray]:
    """A simulated 2-slice scan (4 coils, 64×64, R = 2, 16 embedded ACS lines): ``(header, [ReconData], truth)``.

    ``truth`` is the simulation's magnitude image ``(slices, y, x)`` on the recon matrix.
    """
    from semrecon_core.data.buffers import recon_data_from_acquisitions
    from semrecon_core.data.readers import read_ismrmrd
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
    return header, recon_data, read_ismrmrd(path).ground_truth.numpy()


def _run(header: str, items: list, configuration: str) -> list:
    sent: list = []
    reconstruct(InProcessConnection(items, header, configuration, sent.append))
    return sent


def _properties(**values: str) -> str:
    """A ``<configuration>`` of ``values``; no preview series unless asked for."""
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in {"preview": "false", **values}.items())
    return f"<configuration>{body}</configuration>"


def _pixels(images: list) -> np.ndarray:
    """The float magnitudes ``(images, y, x)``."""
    return np.stack([np.asarray(image.data[0, 0], dtype=np.float64) for image in images])


def _assert_true_to(truth: np.ndarray, images: list, bounds: tuple[float, float]) -> None:
    """PSNR and SSIM against ``truth`` after least-squares intensity scaling reach ``bounds``."""
    pixels = _pixels(images)
    assert pixels.max() > 0, "the image is all zero"
    scaled = pixels * (truth * pixels).sum() / (pixels * pixels).sum()
    measured = psnr(truth, scaled), ssim(truth, scaled)
    assert measured[0] >= bounds[0] and measured[1] >= bounds[1], f"PSNR {measured[0]:.1f} dB, SSIM {measured[1]:.3f}"


def test_the_truth_bounds_reject_zero_and_wrong_images(scan: tuple[str, list, np.ndarray]) -> None:
    *_, truth = scan

    class Image:
        def __init__(self, plane: np.ndarray) -> None:
            self.data = plane[None, None]

    noise = np.random.default_rng(0).random(truth.shape)
    for wrong in (truth.transpose(0, 2, 1), np.roll(truth, 8, axis=-1), noise):
        with pytest.raises(AssertionError, match="PSNR"):
            _assert_true_to(truth, [Image(plane) for plane in wrong], RSS)
    with pytest.raises(AssertionError, match="all zero"):
        _assert_true_to(truth, [Image(plane) for plane in 0 * truth], RSS)


def test_images_per_slice_with_geometry_and_meta(scan: tuple[str, list, np.ndarray]) -> None:
    header, recon_data, truth = scan
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
        shown = displayed(image.data, Display())  # the pixels after the chain's AutoScale and FloatToUShort
        assert float(meta["GADGETRON_WindowWidth"]) == pytest.approx(float(shown.max()), rel=1e-5)
    _assert_true_to(truth, images, CG_SENSE)
    # slices are 6 mm apart along the slice normal (5 mm thickness + 1 mm gap in the simulation)
    assert images[1].position[2] - images[0].position[2] == pytest.approx(6.0)


def test_the_gadget_honours_calib_width(scan: tuple[str, list, np.ndarray]) -> None:
    from semrecon_core.data.readers import from_recon_buffer
    from semrecon_core.pipeline import Pipeline

    header, recon_data, _ = scan
    bit = recon_data[0].bits[0]
    images = _run(header, [copy.deepcopy(recon_data[0])], _properties(backbone="zero-filled", calib_width="10"))
    kspace = from_recon_buffer(bit.data, bit.ref, header)
    config = ReconConfig(backbone="zero-filled", calib_width=10)
    maps = Pipeline(config).estimate_maps(kspace)
    assert not np.allclose(maps, Pipeline(config.replace(calib_width=16)).estimate_maps(kspace), atol=1e-3)
    expected = Pipeline(config).run(kspace, maps=maps).images()
    np.testing.assert_array_equal(_pixels(images[:1]), _pixels(expected))


def test_properties_are_validated_before_the_first_buffer(scan: tuple[str, list, np.ndarray]) -> None:
    header, *_ = scan

    def never() -> object:
        raise AssertionError("the gadget read a message before validating its properties")
        yield

    with pytest.raises(ConfigError, match="lamda"):
        reconstruct(InProcessConnection(never(), header, _properties(lamda="1"), lambda item: None))
    with pytest.raises(ConfigError, match="series_index"):
        settings_from_configuration(_properties(series_index="first"))


def test_nan_buffer_gives_labelled_rss_and_scan_continues(
    scan: tuple[str, list, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    header, recon_data, truth = scan
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
    assert first.meta["GADGETRON_ImageComment"].startswith("FALLBACK zero-filled RSS (sense+none failed:")
    assert "NaN" in first.meta["GADGETRON_ImageComment"]
    assert first.data.shape == (1, 1, 64, 64) and np.isfinite(first.data).all()
    assert (first.image_index, first.slice) == (1, 0)
    _assert_true_to(truth[:1], [first], RSS)
    assert second.meta["GADGETRON_DataRole"] == "Image"  # the next buffer is reconstructed normally
    assert (second.image_index, second.slice) == (2, 1)
    _assert_true_to(truth[1:], [second], CG_SENSE)


def test_buffer_without_calibration_lines_falls_back(scan: tuple[str, list, np.ndarray]) -> None:
    header, recon_data, truth = scan
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
    assert comment.startswith("FALLBACK zero-filled RSS") and "calibration" in comment.lower()
    assert images[1].slice == 1 and images[1].data.max() > 0
    _assert_true_to(truth[:1], images[:1], CG_SENSE)


def test_cg_sense_failing_too_gives_labelled_rss(scan: tuple[str, list, np.ndarray]) -> None:
    header, recon_data, truth = scan
    images = _run(header, recon_data, _properties(backbone="sense", calib_width="4"))  # narrower than the kernel
    assert [image.slice for image in images] == list(range(SLICES))
    for image in images:
        comment = image.meta["GADGETRON_ImageComment"]
        assert comment.startswith("FALLBACK zero-filled RSS (sense+none failed:") and "; CG-SENSE: " in comment
        assert "ESPIRiT kernel" in comment and image.meta["GADGETRON_DataRole"] == "Fallback"
    _assert_true_to(truth, images, RSS)


def test_missing_bank_falls_back_to_labelled_cg_sense(scan: tuple[str, list, np.ndarray], tmp_path: Path) -> None:
    header, recon_data, truth = scan
    missing = tmp_path / "no_such_bank.safetensors"
    images = _run(header, recon_data, _properties(backbone="unet", prior="semantic", bank=str(missing), device="cpu"))
    assert len(images) == SLICES
    for image in images:
        comment = image.meta["GADGETRON_ImageComment"]
        assert comment.startswith("FALLBACK CG-SENSE (unet+semantic failed:")
        assert "no_such_bank" in comment
        assert image.meta["GADGETRON_DataRole"] == "Fallback"
    _assert_true_to(truth, images, CG_SENSE)


def test_quality_answer_of_an_image_language_prior_goes_into_meta(scan: tuple[str, list, np.ndarray]) -> None:
    header, recon_data, _ = scan

    class AnsweringPrior:
        label = "tv (answering)"

        def loss(self, image):  # TV-like smoothness, differentiable
            return (image[..., 1:, :] - image[..., :-1, :]).abs().mean()

        def status(self, image):
            return {}

        def answer(self, image):
            return [{"answer": "High-quality", "choice": "high", "p_high": 0.8, "p_low": 0.2}] * image.shape[0]

    settings = settings_from_configuration(_properties(backbone="zero-filled"))
    gadget = SemreconGadget(settings, header, prior=AnsweringPrior())
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


def test_a_configuration_that_is_not_utf8_is_named_unless_it_declares_its_encoding() -> None:
    from semrecon_core.gadgetron.properties import parse_properties

    latin1 = b"<configuration><property name='bank' value='caf\xe9.safetensors'/></configuration>"
    with pytest.raises(ConfigError, match=r"^the CONFIG: not UTF-8 text \(byte 0xe9 at offset 47 of 79\)"):
        parse_properties(latin1, source="the CONFIG")
    declared = b'<?xml version="1.0" encoding="ISO-8859-1"?>' + latin1
    assert parse_properties(declared, source="the CONFIG") == {"bank": "café.safetensors"}


def test_preview_series_goes_out_first_then_the_fitted_series(scan: tuple[str, list, np.ndarray]) -> None:
    """A fitted backbone: per buffer a CG-SENSE preview in series 2 at once, then the fitted images in series 1."""
    header, recon_data, truth = scan
    properties = _properties(backbone="unet", prior="tv", iterations="3", width="4", depth="2", preview="true")
    images = _run(header, recon_data, properties)
    assert [(image.image_series_index, image.image_index, image.slice) for image in images] == [
        (2, 1, 0),
        (1, 1, 0),
        (2, 2, 1),
        (1, 2, 1),
    ]  # split_slices: one buffer per slice, each with its preview before its fitted image
    previews = [image for image in images if image.image_series_index == 2]
    for image in previews:
        assert image.meta["GADGETRON_ImageComment"].startswith("semrecon preview CG-SENSE")
        assert image.meta["GADGETRON_DataRole"] == "Image"
    _assert_true_to(truth, previews, CG_SENSE)
    fitted = [image for image in images if image.image_series_index == 1]
    assert all(image.meta["GADGETRON_ImageComment"].endswith("; 3 it (iterations)") for image in fitted)
    alone = _run(header, recon_data, _properties(backbone="sense"))  # the preview is the CG-SENSE chain's image
    np.testing.assert_allclose(_pixels(previews), _pixels(alone), rtol=1e-5, atol=1e-6)


def test_no_preview_when_turned_off_or_for_a_classical_backbone(scan: tuple[str, list, np.ndarray]) -> None:
    header, recon_data, _ = scan
    off = _run(header, recon_data, _properties(backbone="unet", iterations="2", width="4", depth="2"))
    classical = _run(header, recon_data, _properties(backbone="sense", preview="true", preview_series_index="9"))
    for images in (off, classical):
        assert [image.image_series_index for image in images] == [1] * SLICES


def test_a_failed_fit_sends_its_preview_again_as_the_labelled_fallback(
    scan: tuple[str, list, np.ndarray], tmp_path: Path
) -> None:
    header, recon_data, truth = scan
    missing = tmp_path / "no_such_bank.safetensors"
    properties = _properties(backbone="unet", prior="semantic", bank=str(missing), device="cpu", preview="true")
    images = _run(header, recon_data, properties)
    previews = [image for image in images if image.image_series_index == 2]
    fallbacks = [image for image in images if image.image_series_index == 1]
    assert len(previews) == len(fallbacks) == SLICES
    for image in fallbacks:
        assert image.meta["GADGETRON_ImageComment"].startswith("FALLBACK CG-SENSE (unet+semantic failed:")
        assert image.meta["GADGETRON_DataRole"] == "Fallback"
    np.testing.assert_array_equal(_pixels(fallbacks), _pixels(previews))
    _assert_true_to(truth, fallbacks, CG_SENSE)


def test_preview_properties_are_validated() -> None:
    with pytest.raises(ConfigError, match="property 'preview': expected true or false, found 'maybe'"):
        settings_from_configuration(_properties(preview="maybe"))
    with pytest.raises(ConfigError, match="property 'preview_series_index': expected >= 0, found -1"):
        settings_from_configuration(_properties(preview_series_index="-1"))


def test_a_calib_width_wider_than_the_data_is_narrowed_with_a_warning(
    scan: tuple[str, list, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """The data carry 16 calibration lines: calib_width 24 (the chains' default) says what ESPIRiT uses instead."""
    header, recon_data, _ = scan
    with caplog.at_level(logging.WARNING):
        _run(header, recon_data, _properties(backbone="sense", iterations="3", calib_width="24"))
    assert "calib_width 24 is wider than the calibration region 16×64 the data carry; ESPIRiT uses 16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _run(header, recon_data, _properties(backbone="sense", iterations="3", calib_width="16"))
    assert "calib_width" not in caplog.text
