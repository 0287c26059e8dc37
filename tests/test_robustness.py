"""Faults a scanner site meets on the Gadgetron side, with the gadget launched exactly as Gadgetron launches it
(``python -m gadgetron PORT semrecon_gadget reconstruct`` with ``gadgets/`` appended to ``PYTHONPATH``):
Gadgetron going away before the HEADER is complete, oversized claims, unknown messages, bad CONFIGs. Each
case ends with a message naming the problem (and an ERROR to Gadgetron when it still listens) and a non-zero
exit within 5 s; nothing spins or waits for data that never comes."""

from __future__ import annotations

import logging
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from gadgetron.external import constants  # noqa: E402

from semrecon_core.emulation import emulator, wire  # noqa: E402
from tests.helpers import cpu_seconds, process_exited, read_ismrmrd_scan, read_replies, wait_until_idle  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")

GADGETS = Path(__file__).resolve().parents[1] / "gadgets"
CONFIGURATION = "<configuration><property name='backbone' value='zero-filled'/></configuration>"
# Exit statuses of the gadget process (README, "Gadgetron"): refused with an ERROR, Gadgetron went away.
REFUSED, GONE = 2, 3
EXIT_WITHIN = 5.0


@pytest.fixture(scope="module")
def scan(shepp_logan_raw) -> tuple[str, list]:
    """A small Shepp-Logan raw file (4 coils, 32², R=2, 16 ACS lines) as ``(xml header, [ReconData])``."""
    return read_ismrmrd_scan(shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1))


# ------------------------------------------------------------------------------------------- helpers


def _text_message(mid: int, body: bytes, claimed: int | None = None) -> bytes:
    """CONFIG / HEADER framing: ``uint16`` id, ``uint32`` length (``claimed`` if given), body."""
    return struct.pack("<HI", mid, len(body) if claimed is None else claimed) + body


def _config(text: str | bytes = CONFIGURATION) -> bytes:
    return _text_message(constants.GADGET_MESSAGE_CONFIG, text.encode() if isinstance(text, str) else text)


def _header(header_xml: str) -> bytes:
    out = _Buffer()
    wire.write_header(out, header_xml)
    return bytes(out.data)


class _Buffer:
    """A write-only stream collecting what the wire writers produce."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += memoryview(data).cast("B")


def _message(item) -> bytes:
    out = _Buffer()
    wire.write_item(out, item)
    return bytes(out.data)


def _exit_status(gadget: emulator.GadgetProcess, since: float, within: float = EXIT_WITHIN) -> int:
    """The child's exit status; fails if it is still running ``within`` s after ``since`` (monotonic)."""
    while not process_exited(gadget.pid):
        assert time.monotonic() - since < within, (
            f"the gadget was still running {within:.0f} s later "
            f"(CPU {cpu_seconds(gadget.pid):.1f} s)\n--- gadget log ---\n{gadget.log()}"
        )
        time.sleep(0.05)
    gadget.cpu_at_exit = cpu_seconds(gadget.pid)  # type: ignore[attr-defined]
    return gadget.stop()


def _launch() -> emulator.GadgetProcess:
    return emulator.GadgetProcess("semrecon_gadget", "reconstruct", gadget_path=[GADGETS])


# ------------------------------------------------------------- Gadgetron goes away before the HEADER


def _before_header(scan_header: str) -> dict[str, bytes]:
    whole_config = _config()
    return {
        "nothing at all": b"",
        "half a message id": whole_config[:1],
        "partial CONFIG": whole_config[: len(whole_config) // 2],
        "partial HEADER": whole_config + _header(scan_header)[:40],
        "CONFIG claiming 4 GiB": _text_message(constants.GADGET_MESSAGE_CONFIG, b"<config", claimed=2**32 - 1),
    }


@pytest.mark.parametrize(
    "case", ["nothing at all", "half a message id", "partial CONFIG", "partial HEADER", "CONFIG claiming 4 GiB"]
)
def test_gadget_exits_when_gadgetron_goes_away_before_the_header(scan, case: str) -> None:
    header, _ = scan
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_before_header(header)[case])
        time.sleep(0.2)  # the gadget reads what there is and waits for the rest
        cpu_before = cpu_seconds(gadget.pid)
        sock.close()
        status = _exit_status(gadget, time.monotonic())
        log = gadget.log()
    assert gadget.cpu_at_exit - cpu_before < 1.0, "the gadget spun after Gadgetron went away"
    assert status in (GONE, REFUSED), f"exit status {status}\n{log}"
    if case == "CONFIG claiming 4 GiB":
        assert "CONFIG" in log and "4.0 GiB" in log
    else:
        assert "Gadgetron closed the connection" in log, log
    assert "Traceback" not in log, log


def test_config_claiming_4_gib_is_refused_with_an_error_while_gadgetron_listens() -> None:
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_text_message(constants.GADGET_MESSAGE_CONFIG, b"<configuration/>", claimed=2**32 - 1))
        sent = time.monotonic()
        _, errors = read_replies(sock, timeout=EXIT_WITHIN)  # Gadgetron stays connected and says nothing more
        status = _exit_status(gadget, sent)
        sock.close()
    assert status == REFUSED
    assert len(errors) == 1 and "CONFIG" in errors[0], errors
    assert "4.0 GiB" in errors[0] and "16.0 MiB" in errors[0], errors[0]


def test_a_first_message_other_than_config_is_refused_naming_it(scan) -> None:
    header, _ = scan
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_header(header))
        sent = time.monotonic()
        _, errors = read_replies(sock, timeout=EXIT_WITHIN)
        status = _exit_status(gadget, sent)
        sock.close()
    assert status == REFUSED
    assert len(errors) == 1 and "expected CONFIG" in errors[0] and "id 3 (HEADER)" in errors[0], errors


# ------------------------------------------------------------------------- after the HEADER


def _loaded(gadget: emulator.GadgetProcess, header: str, config: bytes | None = None) -> socket.socket:
    """Accept the child, send CONFIG + HEADER and wait until it has imported the gadget and waits for data."""
    sock = gadget.accept(timeout=60)
    sock.sendall((_config() if config is None else config) + _header(header))
    wait_until_idle(gadget.pid)
    return sock


def test_unknown_message_id_is_an_error_naming_it(scan) -> None:
    header, buffers = scan
    good = _message(buffers[0])
    with _launch() as gadget:
        sock = _loaded(gadget, header)
        sock.sendall(good + struct.pack("<H", 1234) + b"\0" * 64 + good + struct.pack("<H", 4))
        sent = time.monotonic()
        items, errors = read_replies(sock, timeout=60)
        status = _exit_status(gadget, sent, within=60)
        sock.close()
        log = gadget.log()
    assert status == REFUSED, log
    assert len(errors) == 1 and "message id 1234" in errors[0], errors
    assert "message id 1234" in log
    assert len([item for item in items if isinstance(item, ismrmrd.Image)]) == 1, "the first buffer gets its image"


def test_recon_data_claiming_2_tib_is_refused_before_allocating(scan) -> None:
    header, _ = scan
    dims = (4096, 4096, 1024, 16, 1, 1, 1)  # 2**38 complex64 samples: 2 TiB
    claim = struct.pack("<HQQ", constants.GADGET_MESSAGE_RECON_DATA, 1, len(dims)) + struct.pack("<7Q", *dims)
    with _launch() as gadget:
        sock = _loaded(gadget, header)
        sock.sendall(claim)  # and nothing more: Gadgetron stays connected
        sent = time.monotonic()
        _, errors = read_replies(sock, timeout=EXIT_WITHIN)
        status = _exit_status(gadget, sent)
        sock.close()
        log = gadget.log()
    assert status == REFUSED, log
    assert len(errors) == 1, log
    assert "ReconData" in errors[0] and "data" in errors[0] and "2.0 TiB" in errors[0], errors[0]
    assert "allowed" in errors[0]
    assert "Traceback" not in log and "Unable to allocate" not in log, log


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (b"<configuration><property name='backbone' value='\xff\xfe'/></configuration>", ("CONFIG", "UTF-8")),
        (b"<configuration><property name='lamda' value='1'/></configuration>", ("lamda",)),
        (b"<configuration><property name='backbone' value='resnet'/></configuration>", ("backbone", "resnet")),
    ],
    ids=["non-UTF-8 CONFIG", "unknown property", "bad value"],
)
def test_configuration_errors_are_sent_to_gadgetron_before_exiting(scan, config: bytes, expected) -> None:
    header, buffers = scan
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_config(config) + _header(header) + _message(buffers[0]))
        items, errors = read_replies(sock, timeout=60)
        received = time.monotonic()
        status = _exit_status(gadget, received)
        sock.close()
        log = gadget.log()
    assert status == REFUSED, log
    assert items == [] and len(errors) == 1, (items, errors)
    for word in expected:
        assert word in errors[0], errors[0]
    assert "Traceback" not in log, log


def test_the_gadget_log_of_a_protocol_run_reaches_the_caller(scan, caplog: pytest.LogCaptureFixture) -> None:
    """``semrecon replay --protocol`` logs a buffer's failure as the in-process path does."""
    import copy

    header, buffers = scan
    broken = copy.deepcopy(buffers[0])
    broken.bits[0].data.data[0, 0] = np.nan
    with caplog.at_level(logging.WARNING):
        run = emulator.run_external(
            CONFIGURATION,
            header,
            [broken],
            module="semrecon_gadget",
            target="reconstruct",
            gadget_path=[GADGETS],
            timeout=60,
        )
    assert len(run.images) == 1 and run.images[0].meta["GADGETRON_DataRole"] == "Fallback"
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("cannot be reconstructed" in r.getMessage() and "NaN" in r.getMessage() for r in errors), caplog.text


def test_replay_protocol_logs_a_nan_buffer_like_the_in_process_path(
    shepp_logan_raw, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    import h5py

    from semrecon_core.emulation.replay import replay

    path = tmp_path / "nan.h5"
    shutil.copyfile(shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1), path)
    with h5py.File(path, "r+") as file:
        rows = file["dataset/data"]
        last = rows[rows.shape[0] - 1]
        last["data"][0] = np.nan
        rows[rows.shape[0] - 1] = last
    logged = {}
    for protocol in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = replay(path, overrides={"backbone": "zero-filled"}, protocol=protocol)
        roles = [image.meta["GADGETRON_DataRole"] for image in result.images]
        assert roles.count("Fallback") == 1, roles  # the buffer with the NaN sample; the scan goes on
        logged[protocol] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("cannot be reconstructed" in m and "NaN" in m for m in logged[False]), logged[False]
    assert len(logged[True]) == len(logged[False]), logged
    for in_process, over_the_wire in zip(logged[False], logged[True], strict=True):
        assert over_the_wire.endswith(in_process), (in_process, over_the_wire)
