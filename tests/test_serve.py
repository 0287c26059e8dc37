"""``semrecon serve``: scans one after another over ``<connect>`` with the model loaded once, a client
that dies or stays silent ends only its own scan, bad properties are reported, SIGTERM stops the server
gracefully (the scan in progress finishes, new ones get an ERROR), a second signal at once."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gadgetron")
ismrmrd = pytest.importorskip("ismrmrd")

from semrecon_core.emulation import emulator, wire  # noqa: E402
from semrecon_core.gadgetron import serve  # noqa: E402
from tests.helpers import read_ismrmrd_scan, read_replies  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")


@pytest.fixture(scope="module")
def scan(shepp_logan_raw) -> tuple[str, list]:
    """A small Shepp-Logan raw file (4 coils, 32², R=2, 16 ACS lines) as ``(xml header, [ReconData])``."""
    return read_ismrmrd_scan(shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1))


@pytest.fixture(scope="module")
def semantic_properties(tiny_janus_bank: tuple[Path, Path]) -> dict[str, str]:
    """Properties of a semantic reconstruction with a tiny random Janus and a bank built from it."""
    tiny, path = tiny_janus_bank
    return {
        "backbone": "unet",
        "prior": "semantic",
        "encoder": str(tiny),
        "bank": str(path),
        "iterations": "1",
        "device": "cpu",
    }


@pytest.fixture
def server_thread() -> Iterator:
    """Start a :class:`GadgetServer` in a thread: ``start(**kwargs) -> server``; stopped afterwards."""
    started: list[tuple[serve.GadgetServer, threading.Event, threading.Thread]] = []

    def start(**kwargs: object) -> serve.GadgetServer:
        server = serve.GadgetServer(**kwargs)
        stop = threading.Event()
        thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
        thread.start()
        started.append((server, stop, thread))
        return server

    yield start
    for server, stop, thread in started:
        stop.set()
        thread.join(30)
        server.close()
        assert not thread.is_alive(), "the server thread did not stop"


def test_two_scans_in_a_row_load_the_model_once(scan, semantic_properties, server_thread, monkeypatch) -> None:
    from semrecon_core.priors import bank as bank_module
    from semrecon_core.priors import factory

    header, buffers = scan
    loads = {"encoder": 0, "bank": 0}
    load_encoder, load_bank = factory._encoder_for, bank_module.load_bank

    def counting_encoder(*args, **kwargs):
        loads["encoder"] += 1
        return load_encoder(*args, **kwargs)

    def counting_bank(*args, **kwargs):
        loads["bank"] += 1
        return load_bank(*args, **kwargs)

    monkeypatch.setattr(factory, "_encoder_for", counting_encoder)
    monkeypatch.setattr(bank_module, "load_bank", counting_bank)
    factory.clear_cache()
    try:
        server = server_thread(properties=semantic_properties)
        server.preload()
        assert loads == {"encoder": 1, "bank": 1}
        for number in (1, 2):
            run = emulator.run_connect("<configuration/>", header, buffers[:1], port=server.address[1], timeout=120)
            assert run.errors == [] and [image.image_series_index for image in run.images] == [2, 1]  # preview
            image = run.images[1]
            comment = image.meta["GADGETRON_ImageComment"]
            assert "semantic" in comment and "FALLBACK" not in comment, comment
            assert image.data.shape[-2:] == (32, 32) and np.isfinite(image.data).all()
            assert server.scans == number
        assert loads == {"encoder": 1, "bank": 1}, "the encoder or bank was loaded again for the second scan"
    finally:
        factory.clear_cache()


def test_scan_configuration_overrides_base_and_set_wins(scan, server_thread) -> None:
    header, buffers = scan
    server = server_thread(properties={"backbone": "sense", "iterations": "3"}, overrides={"series_index": "9"})
    configuration = "<configuration><property name='backbone' value='zero-filled'/></configuration>"
    run = emulator.run_connect(configuration, header, buffers[:1], port=server.address[1], timeout=60)
    assert run.errors == [] and len(run.images) == 1
    assert "zero-filled" in run.images[0].meta["GADGETRON_ImageComment"]
    assert run.images[0].image_series_index == 9


def test_bad_scan_properties_are_reported_and_the_next_scan_is_served(scan, server_thread) -> None:
    header, buffers = scan
    server = server_thread(properties={"backbone": "zero-filled"})
    bad = "<configuration><property name='backbone' value='resnet'/></configuration>"
    run = emulator.run_connect(bad, header, buffers[:1], port=server.address[1], timeout=60)
    assert run.items == [] and len(run.errors) == 1
    assert "property 'backbone'" in run.errors[0] and "resnet" in run.errors[0]
    run = emulator.run_connect("<configuration/>", header, buffers[:1], port=server.address[1], timeout=60)
    assert run.errors == [] and len(run.images) == 1


def test_a_client_that_dies_or_stays_silent_ends_only_its_scan(scan, server_thread) -> None:
    header, buffers = scan
    server = server_thread(properties={"backbone": "zero-filled"}, idle_timeout=1.0)
    port = server.address[1]
    # Gadgetron dies after CONFIG + HEADER
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = wire.SocketStream(sock)
        wire.write_config(stream, "<configuration/>")
        wire.write_header(stream, header)
    # Gadgetron connects and says nothing
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    deadline = time.monotonic() + 10
    while server.scans < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    run = emulator.run_connect("<configuration/>", header, buffers[:1], port=port, timeout=60)
    silent.close()
    assert len(run.images) == 1 and server.scans == 3
    assert time.monotonic() - start < 30


def test_server_rejects_bad_base_properties_before_listening() -> None:
    with pytest.raises(ValueError, match="unknown configuration properties: colour"):
        serve.GadgetServer(properties={"colour": "blue"})


def test_cli_serve_binds_loopback_and_stops_on_sigterm(scan, tmp_path: Path) -> None:
    header, buffers = scan
    with _cli_serve(tmp_path) as (process, port):
        run = emulator.run_connect("<configuration/>", header, buffers[:1], port=port, timeout=60)
        assert len(run.images) == 1
        process.terminate()
        assert process.wait(timeout=10) == 0
        rest = process.stdout.read().decode()
        assert "stopped after 1 scan(s)" in rest


def test_cli_serve_names_a_bad_property(capsys) -> None:
    from semrecon_core.commands.main import main

    assert main(["serve", "--port", "0", "--set", "iterations=many"]) == 2
    assert "property 'iterations'" in capsys.readouterr().err


@contextlib.contextmanager
def _cli_serve(
    cwd: Path, options: tuple[str, ...] = ("--set", "backbone=zero-filled")
) -> Iterator[tuple[subprocess.Popen, int]]:
    """``semrecon serve --port 0 OPTIONS`` (default ``--set backbone=zero-filled``) run in ``cwd``: ``(process,
    port)`` once it listens on loopback (checked); killed afterwards if still running."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "semrecon_core.commands.main", "serve", "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
    )
    try:
        line = _read_line(process, timeout=60)
        match = re.match(r"semrecon serve: listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield process, int(match.group(1))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line the process prints, skipping log lines; fails the test after ``timeout`` s."""
    lines: list[str] = []

    def reader() -> None:
        for raw in iter(process.stdout.readline, b""):
            text = raw.decode("utf-8", "replace").strip()
            if text.startswith("semrecon serve:"):
                lines.append(text)
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert lines, f"semrecon serve printed no address within {timeout} s"
    return lines[0]


def test_cli_serve_needs_an_external_node_and_a_port(tmp_path: Path, capsys) -> None:
    from semrecon_core.commands.main import main

    chain = tmp_path / "chain.xml"
    chain.write_text(
        "<configuration><stream><gadget><name>Finish</name><dll>gadgetron_mricore</dll>"
        "<classname>ImageFinishGadget</classname></gadget></stream></configuration>"
    )
    assert main(["serve", "--config", str(chain), "--port", "0"]) == 2
    assert f"{chain}: the chain has no <external> node" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "--port: give a port" in capsys.readouterr().err


# ------------------------------------------------------------------------------ hostile and silent clients


def _session_start(header: str, configuration: bytes = b"<configuration/>") -> bytes:
    class Collect:
        data = bytearray()

        def write(self, data) -> None:
            self.data += memoryview(data).cast("B")

    out = Collect()
    wire.write_header(out, header)
    return struct.pack("<HI", 2, len(configuration)) + configuration + bytes(out.data)


def test_hostile_clients_do_not_hold_up_a_good_scan(scan, server_thread) -> None:
    header, buffers = scan
    server = server_thread(properties={"backbone": "zero-filled"}, idle_timeout=120.0)
    port = server.address[1]
    claims_4_gib = socket.create_connection(("127.0.0.1", port), timeout=10)
    claims_4_gib.sendall(struct.pack("<HI", 2, 2**32 - 1) + b"<configuration")  # ... and goes silent
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    half_config = socket.create_connection(("127.0.0.1", port), timeout=10)
    half_config.sendall(_session_start(header)[:20])
    deadline = time.monotonic() + 10
    while server.scans < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    try:
        run = emulator.run_connect("<configuration/>", header, buffers[:1], port=port, timeout=30)
        assert run.errors == [] and len(run.images) == 1
        assert time.monotonic() - start < 30
        _, errors = read_replies(claims_4_gib, timeout=5)
        assert len(errors) == 1 and "CONFIG claims 4.0 GiB" in errors[0] and "16.0 MiB" in errors[0], errors
    finally:
        for sock in (claims_4_gib, silent, half_config):
            sock.close()


def test_refused_messages_get_an_error_naming_them_and_the_next_scan_is_served(scan, server_thread) -> None:
    header, buffers = scan
    server = server_thread(properties={"backbone": "zero-filled"}, idle_timeout=60.0)
    port = server.address[1]
    dims = (4096, 4096, 1024, 16, 1, 1, 1)  # 2**38 complex64 samples: 2 TiB
    cases = {
        "ReconData claiming 2 TiB": (
            _session_start(header) + struct.pack("<HQQ7Q", 1023, 1, len(dims), *dims),
            ("ReconData bit 0 data", "2.0 TiB", "allowed"),
        ),
        "unknown message id": (_session_start(header) + struct.pack("<H", 1234) + b"\0" * 32, ("message id 1234",)),
        "non-UTF-8 CONFIG": (
            _session_start(header, b"<configuration><property name='backbone' value='\xff'/></configuration>"),
            ("CONFIG", "UTF-8"),
        ),
        "HEADER first": (_session_start(header)[len(b"<configuration/>") + 6 :], ("expected CONFIG", "id 3 (HEADER)")),
    }
    for name, (raw, expected) in cases.items():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            start = time.monotonic()
            _, errors = read_replies(sock, timeout=10)
            assert time.monotonic() - start < 5, name
        assert len(errors) == 1, (name, errors)
        for word in expected:
            assert word in errors[0], (name, errors[0])
    run = emulator.run_connect("<configuration/>", header, buffers[:1], port=port, timeout=60)
    assert run.errors == [] and len(run.images) == 1


def test_connections_beyond_the_limit_are_refused_with_an_error(scan, server_thread) -> None:
    header, buffers = scan
    server = server_thread(properties={"backbone": "zero-filled"}, max_connections=1)
    port = server.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10):  # a silent client holds the one slot
        deadline = time.monotonic() + 10
        while server.active < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            _, errors = read_replies(second, timeout=10)
        assert len(errors) == 1 and "--max-connections" in errors[0], errors
    deadline = time.monotonic() + 10
    while server.active and time.monotonic() < deadline:
        time.sleep(0.05)
    run = emulator.run_connect("<configuration/>", header, buffers[:1], port=port, timeout=60)
    assert len(run.images) == 1


def test_stop_returns_within_seconds_with_silent_clients_connected() -> None:
    server = serve.GadgetServer(properties={"backbone": "zero-filled"})
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    clients = [socket.create_connection(server.address, timeout=10) for _ in range(3)]
    try:
        clients[1].sendall(struct.pack("<HI", 2, 1000) + b"<configuration")
        deadline = time.monotonic() + 10
        while server.scans < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        start = time.monotonic()
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - start < 5
    finally:
        for client in clients:
            client.close()
        server.close()


def test_cli_serve_stops_within_5_s_of_sigterm_with_a_silent_client(tmp_path: Path) -> None:
    with _cli_serve(tmp_path) as (process, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            time.sleep(1.0)  # accepted: the server is waiting for its CONFIG
            process.terminate()
            start = time.monotonic()
            status = process.wait(timeout=30)
            assert time.monotonic() - start < 5, f"semrecon serve took {time.monotonic() - start:.1f} s to stop"
        assert status == 0
        assert "stopped after 1 scan(s)" in process.stdout.read().decode()


# ------------------------------------------------------------------------------ graceful stop

# A U-Net + TV scan whose fit runs until its time budget ({budget} s), with a CG-SENSE preview first.
_TV_SCAN = (
    "<configuration><property name='backbone' value='unet'/><property name='prior' value='tv'/>"
    "<property name='width' value='4'/><property name='depth' value='2'/><property name='iterations' value='1000000'/>"
    "<property name='time_budget_s' value='{budget}'/><property name='preview' value='true'/><property name='device' "
    "value='cpu'/></configuration>"
)


def _scan_in_thread(header: str, buffers: list, port: int, budget: float) -> tuple[threading.Thread, dict]:
    """Run one TV scan against ``port`` in a thread: ``(thread, result)`` with ``run`` (or ``error``) and ``end``."""
    result: dict = {}

    def client() -> None:
        try:
            result["run"] = emulator.run_connect(
                _TV_SCAN.format(budget=budget), header, buffers[:1], port=port, timeout=60
            )
        except Exception as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc
        result["end"] = time.monotonic()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_lets_the_running_scan_finish_refuses_new_ones_and_exits_within_the_grace_period(
    scan, tmp_path: Path
) -> None:
    header, buffers = scan
    grace = 15.0  # ample on a loaded machine: the scan takes about 3 s alone
    with _cli_serve(tmp_path, ("--grace-s", f"{grace:g}")) as (process, port):
        thread, result = _scan_in_thread(header, buffers, port, budget=1.0)
        time.sleep(0.5)
        process.terminate()
        signalled = time.monotonic()
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as late:  # a scan after the signal
            late.sendall(_session_start(header))
            items, errors = read_replies(late, timeout=10)
        assert items == [] and len(errors) == 1 and "the server is stopping" in errors[0], errors
        thread.join(60)
        status = process.wait(timeout=30)
        exited = time.monotonic()
        rest = process.stdout.read().decode()
    assert "error" not in result, result.get("error")
    run = result["run"]
    assert result["end"] > signalled + 0.3, "the scan ended before the signal: it did not test a running scan"
    assert run.errors == [] and [image.image_series_index for image in run.images] == [2, 1], run.errors
    fitted = run.images[1]
    assert fitted.meta["GADGETRON_DataRole"] == "Image"
    assert fitted.meta["GADGETRON_ImageComment"].endswith("(time budget)")
    assert fitted.data.shape[-2:] == (32, 32) and np.isfinite(fitted.data).all() and fitted.data.max() > 0
    assert status == 0 and exited - signalled < grace, f"exited {exited - signalled:.1f} s after SIGTERM"
    assert exited - result["end"] < 5, "the server did not exit once its last scan had finished"
    assert "stopped after 1 scan(s)" in rest


def test_a_scan_still_running_after_the_grace_period_is_closed_with_an_error(scan) -> None:
    header, buffers = scan
    server = serve.GadgetServer(properties={"backbone": "zero-filled"})
    stop = threading.Event()
    done = threading.Thread(target=server.serve_forever, args=(stop,), kwargs={"grace_s": 0.5}, daemon=True)
    done.start()
    try:
        thread, result = _scan_in_thread(header, buffers, server.address[1], budget=4.0)
        deadline = time.monotonic() + 10
        while server.active < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        start = time.monotonic()
        done.join(10)
        assert not done.is_alive() and time.monotonic() - start < 0.5 + 2.5
        thread.join(30)
    finally:
        server.close()
    run = result["run"]
    assert len(run.errors) == 1 and "the server is stopping" in run.errors[0] and "cut off" in run.errors[0]
    assert all(image.image_series_index == 2 for image in run.images)  # at most the preview went out


def test_a_second_signal_stops_the_server_at_once(scan, tmp_path: Path) -> None:
    header, buffers = scan
    with _cli_serve(tmp_path, ("--grace-s", "30")) as (process, port):
        thread, _ = _scan_in_thread(header, buffers, port, budget=20.0)
        time.sleep(1.0)
        process.terminate()
        time.sleep(0.3)
        process.terminate()
        start = time.monotonic()
        status = process.wait(timeout=30)
        assert time.monotonic() - start < 3, f"took {time.monotonic() - start:.1f} s after the second signal"
        thread.join(30)
    assert status == 130
