"""``semrecon serve --mrd``: an MRD client built only on ``ismrmrd.serialization`` against the MRD server.

The client (:func:`stream`) frames CONFIG_FILE, CONFIG_TEXT, the header, every acquisition of a raw file and
CLOSE with ``ismrmrd``'s own ``ProtocolSerializer`` and reads the replies with its ``ProtocolDeserializer``;
nothing of semrecon's sending code is involved.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer  # noqa: E402

from semrecon_core.commands.main import main  # noqa: E402
from semrecon_core.data.images import read_images  # noqa: E402
from semrecon_core.gadgetron.properties import settings_from_properties  # noqa: E402
from semrecon_core.mrd.server import SHIPPED_CHAINS, MRDServer, find_chains  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")

FAST = {"device": "cpu", "espirit": "torch", "calib_width": 12}
DEEP = {"iterations": 3, "width": 8, "depth": 3, "checkpoint": "", "time_budget_s": 0, "autocast": "none"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``semrecon simulate``: 3 slices of 32², 4 coils, R = 2, 12 embedded ACS lines, noise scan, 2× oversampling."""
    path = tmp_path_factory.mktemp("mrd") / "scan.h5"
    args = ["--matrix", "32", "--coils", "4", "--slices", "3", "--acceleration", "2", "--acs", "12"]
    assert main(["simulate", str(path), *args, "--noise-scan", "--oversampling", "2"]) == 0
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[MRDServer]:
    """An MRD server on a free loopback port, short timeouts."""
    mrd = MRDServer(port=0, idle_timeout=5.0, handshake_timeout=5.0, max_connections=4)
    stop = threading.Event()
    thread = threading.Thread(target=mrd.serve_forever, args=(stop,), daemon=True)
    thread.start()
    yield mrd
    stop.set()
    thread.join(30)
    mrd.close()
    assert not thread.is_alive(), "the MRD server did not stop"


def acquisitions(path: Path) -> tuple[Any, list[Any]]:
    """The header and acquisitions of an ISMRMRD raw file, read with ``ismrmrd`` only."""
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        header = ismrmrd.xsd.CreateFromDocument(dataset.read_xml_header())
        return header, [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
    finally:
        dataset.close()


def stream(port: int, items: list[Any], *, timeout: float = 120.0) -> list[Any]:
    """Send ``items`` (then CLOSE) with ``ismrmrd.serialization``; every reply up to the server's CLOSE."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        replies: list[Any] = []

        def read() -> None:
            with sock.makefile("rb") as incoming:
                try:
                    replies.extend(ProtocolDeserializer(incoming).deserialize())
                except (EOFError, OSError):
                    replies.append(EOFError)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        with sock.makefile("wb") as outgoing:
            serializer = ProtocolSerializer(outgoing)
            try:
                for item in items:
                    serializer.serialize(item)
                serializer.close()
            except OSError:  # the server closed after an error: its reply is read below
                pass
        reader.join(timeout)
        assert not reader.is_alive(), "no CLOSE from the server"
    return replies


def texts(replies: list[Any]) -> list[str]:
    return [item for item in replies if isinstance(item, str)]


def images(replies: list[Any]) -> list[Any]:
    return [item for item in replies if isinstance(item, ismrmrd.Image)]


def recon_reference(raw: Path, chain: str, overrides: dict[str, Any], out: Path) -> list[Any]:
    """``semrecon recon`` with the chain's reconstruction settings plus ``overrides``."""
    properties = {**find_chains(SHIPPED_CHAINS)[chain], **{k: str(v) for k, v in overrides.items()}}
    config = settings_from_properties(properties, source=chain).config
    settings = [arg for name, value in config.to_properties().items() for arg in ("--set", f"{name}={value}")]
    assert main(["recon", str(raw), str(out), *settings]) == 0
    return read_images(out, group="images")


def _config_text(overrides: dict[str, Any]) -> str:
    return json.dumps({k: (v if not isinstance(v, str) or v else "") for k, v in overrides.items()})


@pytest.mark.parametrize("chain", ["semrecon_cgsense", "semrecon_tv", "semrecon_semantic"])
def test_an_ismrmrd_client_gets_the_pixels_of_semrecon_recon(
    chain: str, raw: Path, server: MRDServer, tiny_janus_bank: tuple[Path, Path], tmp_path: Path
) -> None:
    overrides: dict[str, Any] = dict(FAST)
    if chain == "semrecon_tv":
        overrides["iterations"] = 20
    if chain == "semrecon_semantic":
        tiny, bank = tiny_janus_bank
        overrides.update(DEEP, encoder=str(tiny), bank=str(bank))
    header, acqs = acquisitions(raw)
    replies = stream(server.address[1], [ConfigFile(chain), ConfigText(_config_text(overrides)), header, *acqs])
    assert not texts(replies), texts(replies)
    received = images(replies)
    reference = recon_reference(raw, chain, overrides, tmp_path / "recon.h5")
    assert len(reference) == 3
    final = [image for image in received if image.image_series_index == 1]
    if chain == "semrecon_semantic":  # the preview series (2) comes first, all of it before the first final image
        series = [int(image.image_series_index) for image in received]
        assert series == [2, 2, 2, 1, 1, 1]
        assert received[0].meta["GADGETRON_ImageComment"].startswith("semrecon preview")
    assert len(final) == 3
    for number, (got, want) in enumerate(zip(final, reference, strict=True)):
        assert got.meta["GADGETRON_DataRole"] == "Image", got.meta["GADGETRON_ImageComment"]
        assert got.meta["GADGETRON_ImageComment"] == want.meta["GADGETRON_ImageComment"]
        assert (got.slice, got.image_index) == (number, number + 1)
        assert tuple(got.field_of_view) == pytest.approx(tuple(want.field_of_view))
        assert tuple(got.position) == pytest.approx(tuple(want.position))
        assert got.data.shape == want.data.shape == (1, 1, 32, 32)
        np.testing.assert_allclose(got.data, want.data, rtol=1e-5, atol=1e-5 * float(want.data.max()))


def test_each_volume_is_sent_as_soon_as_its_last_acquisition_is_in(raw: Path, server: MRDServer) -> None:
    """The images of a volume come before the client's CLOSE: the server does not wait for the end."""
    header, acqs = acquisitions(raw)
    with socket.create_connection(("127.0.0.1", server.address[1]), timeout=60) as sock:
        outgoing = sock.makefile("wb")
        serializer = ProtocolSerializer(outgoing)
        for item in [ConfigFile("semrecon_cgsense"), ConfigText(json.dumps(FAST)), header, *acqs]:
            serializer.serialize(item)
        outgoing.flush()  # no CLOSE yet
        incoming = sock.makefile("rb")
        first = next(ProtocolDeserializer(incoming).deserialize())
        assert isinstance(first, ismrmrd.Image) and first.image_series_index == 1
        serializer.close()
        outgoing.close()
        rest = list(ProtocolDeserializer(incoming).deserialize())
        assert len(images(rest)) == 2 and not texts(rest)
        incoming.close()


def _error(replies: list[Any]) -> str:
    errors = [text for text in texts(replies) if text.startswith("ERROR ")]
    assert errors, f"no ERROR text in {replies}"
    assert not images(replies)
    return errors[0]


def test_faults_get_an_error_text_and_leave_the_next_scan_alone(raw: Path, server: MRDServer) -> None:
    header, acqs = acquisitions(raw)
    port = server.address[1]
    config = ConfigText(json.dumps(FAST))
    message = _error(stream(port, [ConfigFile("semrecon_nothing"), header, *acqs[:3]]))
    assert (
        "semrecon_nothing" in message
        and "semrecon_cgsense, semrecon_connect, semrecon_semantic, semrecon_tv" in message
    )
    assert "not JSON" in _error(stream(port, [ConfigText("{iterations: 3"), header]))
    assert "unknown configuration properties: iterationz" in _error(
        stream(port, [ConfigText('{"iterationz": 3}'), header])
    )
    assert "ACQUISITION before the METADATA_XML" in _error(stream(port, [config, *acqs[:2]]))
    assert "CLOSE before any METADATA_XML" in _error(stream(port, [config]))
    # a header that is no ISMRMRD header: raw frames (ismrmrd's serializer only writes parsed headers)
    replies = _raw(port, struct.pack("<HI", 3, 12) + b"<notismrmrd>")
    assert "METADATA_XML: not a usable ISMRMRD header" in _error(replies)
    assert "unknown message id 4242" in _error(_raw(port, struct.pack("<H", 4242)))
    huge = _error(_raw(port, struct.pack("<HI", 2, 0xFFFFFFFF)))  # a CONFIG_TEXT claiming 4 GiB
    assert "claims 4294967295 bytes" in huge
    head = ismrmrd.AcquisitionHeader()
    head.active_channels, head.number_of_samples = 1024, 65535  # 512 MiB of samples claimed
    xml = ismrmrd.xsd.ToXML(header).encode()
    claim = struct.pack("<HI", 3, len(xml)) + xml + struct.pack("<H", 1008) + bytes(head)
    assert "more than the" in _error(_raw(port, claim))
    # a client vanishing mid-scan while two others stream at once: both are served in full
    results: list[list[Any]] = []
    with socket.create_connection(("127.0.0.1", port)) as gone:
        gone.sendall(struct.pack("<HI", 3, len(xml)) + xml)
        serializer = ProtocolSerializer(gone.makefile("wb"))
        for acq in acqs[:20]:
            serializer.serialize(acq)
        clients = [threading.Thread(target=lambda: results.append(stream(port, [config, header, *acqs]))) for _ in "ab"]
        for client in clients:
            client.start()
    for client in clients:
        client.join(120)
    assert len(results) == 2
    for replies in results:
        assert len(images(replies)) == 3 and not texts(replies)
    after = stream(port, [config, header, *acqs])
    assert len(images(after)) == 3 and not texts(after)
    np.testing.assert_array_equal(images(after)[0].data, images(results[0])[0].data)


def _raw(port: int, payload: bytes) -> list[Any]:
    """Send hand-made frames (what ``ismrmrd``'s serializer would refuse to write); the replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        with sock.makefile("rb") as incoming:
            try:
                return list(ProtocolDeserializer(incoming).deserialize())
            except (EOFError, OSError):
                return [EOFError]


def test_waveforms_are_ignored(raw: Path, server: MRDServer) -> None:
    header, acqs = acquisitions(raw)
    waveform = ismrmrd.Waveform.from_array(np.arange(40, dtype=np.uint32).reshape(2, 20))
    replies = stream(server.address[1], [ConfigText(json.dumps(FAST)), header, waveform, *acqs])
    assert len(images(replies)) == 3 and not texts(replies)


def test_shepp_logan_zero_filled_within_half_a_db_of_ismrmrd_recon(tmp_path: Path, server: MRDServer) -> None:
    """``ismrmrd_generate_cartesian_shepp_logan`` (noise, 2× oversampling) via the server vs ismrmrd's own recon."""
    from tests.helpers import require_tool

    generate = require_tool("ismrmrd_generate_cartesian_shepp_logan")
    recon = require_tool("ismrmrd_recon_cartesian_2d")
    path = tmp_path / "phantom.h5"
    args = ["-m", "64", "-c", "4", "-O", "2", "-a", "1", "-C", "-n", "0.05", "-o", str(path)]
    subprocess.run([generate, *args], check=True, capture_output=True, timeout=120)
    header, acqs = acquisitions(path)
    replies = stream(server.address[1], [ConfigText(json.dumps({**FAST, "backbone": "zero-filled"})), header, *acqs])
    assert not texts(replies), texts(replies)
    (image,) = images(replies)
    rss_config = {**FAST, "backbone": "zero-filled", "combine": "rss"}  # ismrmrd's own combination
    replies = stream(server.address[1], [ConfigText(json.dumps(rss_config)), header, *acqs])
    assert not texts(replies), texts(replies)
    (served_rss,) = images(replies)
    theirs_path = tmp_path / "theirs.h5"
    shutil.copy(path, theirs_path)
    subprocess.run([recon, str(theirs_path)], check=True, capture_output=True, timeout=120)
    import h5py

    with h5py.File(theirs_path, "r") as file:
        phantom, raw = file["dataset/phantom"][()], file["dataset/cpp/data"][()]
        truth = np.abs(phantom["real"] + 1j * phantom["imag"]).reshape(64, 64)
        theirs = np.abs(np.asarray(raw, dtype=np.float32)).reshape(64, 64)  # magnitude (RSS)
    ours = np.abs(image.data.reshape(64, 64))
    # the same coil images as the server assembles them (ScanAssembler: prewhitened, oversampling removed), RSS
    from semrecon_core.data.readers import ScanAssembler
    from semrecon_core.physics.coils import rss
    from semrecon_core.physics.fft import ifft2c

    assembler = ScanAssembler(ismrmrd.xsd.ToXML(header), source="phantom")
    (volume,) = [v for acq in acqs for v in assembler.push(acq)] + assembler.finish()
    combined = np.abs(rss(ifft2c(volume.data)).numpy()[0])
    mine, other, same = _psnr(ours, truth), _psnr(theirs, truth), _psnr(combined, truth)
    served = _psnr(np.abs(served_rss.data.reshape(64, 64)), truth)
    logging.getLogger(__name__).warning(
        "shepp-logan PSNR: zero-filled via serve --mrd %.2f dB (combine=rss %.2f dB), its coil images' RSS %.2f dB, "
        "ismrmrd_recon_cartesian_2d (RSS) %.2f dB",
        mine,
        served,
        same,
        other,
    )
    assert abs(served - other) <= 0.5, (served, other)  # the served RSS image within 0.5 dB of ismrmrd's
    assert abs(same - other) <= 0.5, (same, other)  # the same combination: the same image within 0.5 dB
    assert mine >= other - 0.5, (mine, other)  # semrecon's coil-combined zero-filled image is no worse


def _psnr(image: np.ndarray, truth: np.ndarray) -> float:
    """PSNR against ``truth`` after the least-squares scale (the units differ: prewhitened or not)."""
    scale = float((image * truth).sum() / (image * image).sum())
    error = float(np.mean((scale * image - truth) ** 2))
    return 10 * np.log10(float(truth.max()) ** 2 / error)


def test_dicom_output_of_each_finished_scan(raw: Path, tmp_path: Path) -> None:
    """``--dicom DIR``: the images a scan was sent are also written as one DICOM series per image series."""
    pydicom = pytest.importorskip("pydicom")
    mrd = MRDServer(port=0, idle_timeout=5.0, handshake_timeout=5.0, dicom=tmp_path / "dicom")
    stop = threading.Event()
    thread = threading.Thread(target=mrd.serve_forever, args=(stop,), kwargs={"max_scans": 1}, daemon=True)
    thread.start()
    header, acqs = acquisitions(raw)
    replies = stream(mrd.address[1], [ConfigText(json.dumps(FAST)), header, *acqs])
    thread.join(30)
    mrd.close()
    assert len(images(replies)) == 3
    (folder,) = (tmp_path / "dicom").iterdir()
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 3
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in files] == [1, 2, 3]


@pytest.mark.slow
def test_fifty_scans_through_one_mrd_server_with_memory_growth_under_5_percent(raw: Path) -> None:
    """``semrecon serve --mrd`` as a process: 50 scans, RSS after scan 50 ≤ 1.05 × after scan 10; SIGTERM stops it."""
    import re
    import sys
    import time

    command = [sys.executable, "-m", "semrecon_core.commands.main", "serve", "--mrd", "--port", "0"]
    for name, value in {**FAST, "iterations": 3}.items():
        command += ["--set", f"{name}={value}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        match = re.match(r"semrecon serve: listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match.group(1))
        header, acqs = acquisitions(raw)
        rss: dict[int, float] = {}
        for number in range(1, 51):
            replies = stream(port, [header, *acqs])
            assert len(images(replies)) == 3 and not texts(replies), number
            if number in (10, 50):
                status = Path(f"/proc/{process.pid}/status").read_text()
                rss[number] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        stopping = time.monotonic()
        process.send_signal(15)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - stopping < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]
    growth = rss[50] / rss[10] - 1
    logging.getLogger(__name__).warning(
        "mrd soak: RSS %.1f MiB after scan 10, %.1f MiB after scan 50 (%+.1f %%)", rss[10], rss[50], 100 * growth
    )
    assert growth <= 0.05, rss
