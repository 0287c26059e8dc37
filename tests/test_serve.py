"""``semrecon serve``: scans one after another over ``<connect>`` with the model loaded once, a client
that dies or stays silent ends only its own scan, bad properties are reported, SIGTERM stops the server."""

from __future__ import annotations

import os
import re
import socket
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

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")


@pytest.fixture(scope="module")
def scan(shepp_logan_raw) -> tuple[str, list]:
    """A small Shepp-Logan raw file (4 coils, 32², R=2, 16 ACS lines) as ``(xml header, [ReconData])``."""
    from semrecon_core.data.buffers import recon_data_from_acquisitions

    path = shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1)
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        header = dataset.read_xml_header().decode("utf-8")
        acquisitions = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
    finally:
        dataset.close()
    return header, recon_data_from_acquisitions(acquisitions, header)


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
            assert run.errors == [] and len(run.images) == 1
            image = run.images[0]
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
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "semrecon_core.commands.main", "serve", "--port", "0", "--set", "backbone=zero-filled"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        line = _read_line(process, timeout=60)
        match = re.match(r"semrecon serve: listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        run = emulator.run_connect("<configuration/>", header, buffers[:1], port=int(match.group(1)), timeout=60)
        assert len(run.images) == 1
        process.terminate()
        assert process.wait(timeout=10) == 0
        rest = process.stdout.read().decode()
        assert "stopped after 1 scan(s)" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()


def test_cli_serve_names_a_bad_property(capsys) -> None:
    from semrecon_core.commands.main import main

    assert main(["serve", "--port", "0", "--set", "iterations=many"]) == 2
    assert "property 'iterations'" in capsys.readouterr().err


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
