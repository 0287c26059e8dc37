"""Same file + same configuration ⇒ the same pixels on every path, for every backbone and prior.

The paths: ``semrecon recon``; ``semrecon replay`` with the gadget in this process and with ``--protocol``
(a ``python -m gadgetron`` child over the wire protocol); and ``semrecon serve`` (a :class:`GadgetServer`
on a free port, fed by ``semrecon replay --protocol`` through a ``<connect>`` chain). The chains are
``config/semrecon_cgsense.xml`` without its display gadgets (AutoScale, FloatToUShort) and without its
properties, so every path sees exactly the properties given here and returns float magnitudes.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from semrecon_core.commands.main import main  # noqa: E402
from semrecon_core.data.images import read_images  # noqa: E402
from semrecon_core.gadgetron.serve import GadgetServer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")

CHAIN = Path(__file__).resolve().parents[1] / "config" / "semrecon_cgsense.xml"
DISPLAY_GADGETS = ("AutoScaleGadget", "FloatToUShortGadget")
DEEP = ("unet", "unrolled", "inr")
PRIORS = ("none", "tv", "semantic")
CASES = [
    ("zero-filled", "none"),
    ("sense", "none"),
    ("sense", "tv"),
    # about 10 s each on 2 CPU cores
    *(pytest.param(backbone, prior, marks=pytest.mark.slow) for backbone in DEEP for prior in PRIORS),
]
# Small networks and few iterations: the test is about the paths, not about image quality.
DEEP_PROPERTIES = {"iterations": "3", "width": "8", "depth": "3"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated single-slice scan: 32×32, 4 coils, R = 2, 12 ACS lines, noise scan, 2× readout oversampling."""
    from semrecon_core.data.simulate import write_ismrmrd_raw

    path = tmp_path_factory.mktemp("same_pixels") / "scan.h5"
    return write_ismrmrd_raw(path, matrix=(32, 32), slices=2, coils=4, acceleration=2, acs_width=12, seed=3)


@pytest.fixture(scope="module")
def model(tiny_janus_bank: tuple[Path, Path]) -> dict[str, str]:
    """Properties of the semantic prior: a tiny random Janus and a bank built with it."""
    tiny, bank = tiny_janus_bank
    return {"encoder": str(tiny), "bank": str(bank)}


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """``{"execute": chain, "connect": chain}`` files; the connect chain points at a running server."""
    server = GadgetServer(port=0)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    folder = tmp_path_factory.mktemp("chains")
    paths = {"execute": folder / "execute.xml", "connect": folder / "connect.xml"}
    _write_chain(paths["execute"], connect_port=None)
    _write_chain(paths["connect"], connect_port=server.address[1])
    yield paths
    stop.set()
    thread.join(30)
    server.close()
    assert not thread.is_alive(), "the server thread did not stop"


def _write_chain(path: Path, *, connect_port: int | None) -> None:
    """The CG-SENSE chain without display gadgets and properties; with ``connect_port``: a ``<connect>`` node."""
    tree = ET.parse(CHAIN)
    stream = tree.getroot().find("stream")
    for gadget in stream.findall("gadget"):
        if gadget.findtext("classname") in DISPLAY_GADGETS:
            stream.remove(gadget)
    external = stream.find("external")
    external.find("configuration").clear()
    if connect_port is not None:
        external.remove(external.find("execute"))
        ET.SubElement(external, "connect", port=str(connect_port), address="127.0.0.1")
    tree.write(path)


def _settings(properties: dict[str, str]) -> list[str]:
    return [arg for name, value in properties.items() for arg in ("--set", f"{name}={value}")]


def _images(command: str, raw: Path, output: Path, *options: object, group: str = "image_1") -> list:
    """Run ``semrecon COMMAND RAW OUTPUT OPTIONS...`` and read the images it wrote."""
    assert main([command, str(raw), str(output), *map(str, options)]) == 0
    return read_images(output, group=group)


@pytest.mark.parametrize(("backbone", "prior"), CASES)
def test_every_path_gives_the_same_pixels(
    backbone: str, prior: str, raw: Path, model: dict[str, str], chains: dict[str, Path], tmp_path: Path
) -> None:
    properties = {"backbone": backbone, "prior": prior, "device": "cpu", "iterations": "5"}
    if backbone in DEEP:
        properties.update(DEEP_PROPERTIES)
    if prior == "semantic":
        properties.update(model)
    settings = _settings(properties)
    execute, connect = chains["execute"], chains["connect"]
    paths = {
        "recon": _images("recon", raw, tmp_path / "recon.h5", *settings, group="images"),
        "replay": _images("replay", raw, tmp_path / "replay.h5", "--config", execute, *settings),
        "replay --protocol": _images("replay", raw, tmp_path / "wire.h5", "--config", execute, "--protocol", *settings),
        "serve": _images("replay", raw, tmp_path / "serve.h5", "--config", connect, "--protocol", *settings),
    }
    reference = paths["recon"]
    assert len(reference) == 2
    comment = reference[0].meta["GADGETRON_ImageComment"]
    for name, images in paths.items():
        assert len(images) == 2, name
        for number, image in enumerate(images):
            assert image.meta["GADGETRON_DataRole"] == "Image", f"{name}: {image.meta['GADGETRON_ImageComment']}"
            assert image.meta["GADGETRON_ImageComment"] == comment, name
            assert image.slice == number and image.data.dtype == np.float32 and image.data.max() > 0, name
            np.testing.assert_array_equal(image.data, reference[number].data, err_msg=f"{name} != semrecon recon")


def test_calibration_width_is_honoured_alike_on_every_path(
    chains: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``calib_width`` 16 and 24 on a scan with 24 ACS lines: recon = replay for each, and the two differ."""
    from semrecon_core.data.simulate import write_ismrmrd_raw

    folder = tmp_path_factory.mktemp("calib_width")
    raw = write_ismrmrd_raw(folder / "scan.h5", matrix=(64, 64), slices=2, coils=4, acceleration=2, acs_width=24)
    pixels = {}
    for width in (16, 24):
        settings = _settings({"backbone": "sense", "device": "cpu", "calib_width": str(width)})
        recon = _images("recon", raw, folder / f"recon{width}.h5", *settings, group="images")
        replay = _images("replay", raw, folder / f"replay{width}.h5", "--config", chains["execute"], *settings)
        for ours, theirs in zip(recon, replay, strict=True):
            np.testing.assert_array_equal(ours.data, theirs.data, err_msg=f"calib_width {width}")
        pixels[width] = np.stack([image.data for image in recon])
    assert np.abs(pixels[16] - pixels[24]).max() > 1e-3 * pixels[24].max()
