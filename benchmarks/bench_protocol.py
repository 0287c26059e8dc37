"""Throughput of the Gadgetron wire protocol for realistic ReconData buffers.

Buffers (complex64 data ``[E0, E1, E2, CHA, N, S, LOC]`` + one AcquisitionHeader per line):

* ``knee-slice``: one slice of a fastMRI-like knee scan, 15 coils × 640 readout (2× oversampled) × 320
  lines (24.6 MB) — what BucketToBuffer(split_slices=true) sends per slice;
* ``knee-volume``: the whole scan in one buffer, 15 × 640 × 320 × 35 slices (860 MB, 11 200 headers).

Cases, each over a TCP connection on 127.0.0.1 (sender thread, receiver in the main thread), time from
the first byte written to the last object read, the fastest of ``--repeats`` runs (other jobs on a shared
machine only add time; every run is in the JSON):

* ``raw``: ``sendall`` / ``recv_into`` of the serialised bytes — the ceiling of the loopback socket;
* ``gadgetron-python``: gadgetron 1.4.1's ``write_recon_data`` / ``read_recon_data`` through its
  ``Connection.SocketWrapper`` as shipped (data already complex64, so its numpy-2 defect does not trigger) —
  the reference; ``ratio`` = its time / the case's time. Timed for every buffer before anything installs
  semrecon's fixes, which patch the package for the rest of the process;
* ``semrecon``: what a scan goes through: the emulator's writer (:mod:`semrecon_core.emulation.wire`:
  gadgetron-python's writer into a stream that gathers small writes) to the gadget's reader
  (gadgetron-python's ``SocketWrapper`` and ``read_recon_data``), both with
  :mod:`semrecon_core.gadgetron.compat` installed;
* ``round-trip``: the emulator launching ``python -m gadgetron`` with gadgetron's example pass-through
  target (fixes installed, as the semrecon gadget installs them), which reads each buffer and sends it back
  (2 × bytes moved; child start-up excluded).

Writes ``benchmarks/results/protocol.json`` and ``protocol.md``. Needs about 6 GiB of memory for the
volume case; about a minute in all.
Usage: ``python benchmarks/bench_protocol.py [--repeats 5] [--skip-volume]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"knee-slice": (640, 320, 15, 1), "knee-volume": (640, 320, 15, 35)}


def make_recon_data(readout: int, lines: int, coils: int, slices: int) -> Any:
    """One ReconBit of random complex64 data with a header per line and a sampling description."""
    import ismrmrd
    from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription

    rng = np.random.default_rng(0)
    data = np.empty((readout, lines, 1, coils, 1, 1, slices), dtype=np.complex64, order="F")
    data.real = rng.standard_normal(data.shape, dtype=np.float32)
    data.imag = rng.standard_normal(data.shape, dtype=np.float32)
    headers = np.empty((lines, 1, 1, 1, slices), dtype=object)
    for line, slice_ in np.ndindex(lines, slices):
        head = ismrmrd.AcquisitionHeader()
        head.idx.kspace_encode_step_1, head.idx.slice = line, slice_
        head.number_of_samples, head.active_channels = readout, coils
        headers[line, 0, 0, 0, slice_] = head
    sampling = SamplingDescription()
    sampling.encoded_matrix[:] = (readout, lines, 1)
    sampling.recon_matrix[:] = (readout // 2, lines, 1)
    return ReconData([ReconBit(ReconBuffer(data, None, None, headers, sampling), None)])


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    return client, accepted


def _timed_transfer(send: Callable[[socket.socket], None], receive: Callable[[socket.socket], Any]) -> float:
    sender_sock, receiver_sock = _loopback_pair()
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            send(sender_sock)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    thread = threading.Thread(target=sender)
    start = time.perf_counter()
    thread.start()
    result = receive(receiver_sock)
    seconds = time.perf_counter() - start
    thread.join()
    sender_sock.close()
    receiver_sock.close()
    if errors:
        raise errors[0]
    del result
    return seconds


def case_raw(payload: bytes) -> float:
    """Bytes only: the loopback ceiling."""

    def receive(sock: socket.socket) -> np.ndarray:
        buffer = np.empty(len(payload), dtype=np.uint8)  # not zero-filled, like the readers' arrays
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            done += sock.recv_into(view[done:])
        return buffer

    return _timed_transfer(lambda sock: sock.sendall(payload), receive)


def case_gadgetron(recon_data: Any) -> float:
    """gadgetron-python 1.4.1's own serialisers through its SocketWrapper, as shipped (unpatched)."""
    from gadgetron.external import constants
    from gadgetron.external.connection import Connection
    from gadgetron.types.recon_data import read_recon_data, write_recon_data

    from semrecon_core.gadgetron import compat

    assert not compat.installed(), "the reference must be gadgetron-python as shipped"

    def send(sock: socket.socket) -> None:
        write_recon_data(Connection.SocketWrapper(sock), recon_data)

    def receive(sock: socket.socket) -> Any:
        wrapper = Connection.SocketWrapper(sock)
        mid = constants.GadgetMessageIdentifier.unpack(wrapper.read(2))[0]
        assert mid == constants.GADGET_MESSAGE_RECON_DATA
        return read_recon_data(wrapper)

    return _timed_transfer(send, receive)


def case_semrecon(recon_data: Any) -> float:
    """The emulator's writer to the gadget's reader, semrecon's fixes installed."""
    from gadgetron.external import constants
    from gadgetron.external.connection import Connection
    from gadgetron.types.recon_data import read_recon_data

    from semrecon_core.emulation import wire
    from semrecon_core.gadgetron import compat

    compat.install()

    def send(sock: socket.socket) -> None:
        wire.write_item(wire.SocketStream(sock), recon_data)

    def receive(sock: socket.socket) -> Any:
        wrapper = Connection.SocketWrapper(sock)
        mid = constants.GadgetMessageIdentifier.unpack(wrapper.read(2))[0]
        assert mid == constants.GADGET_MESSAGE_RECON_DATA
        return read_recon_data(wrapper)

    return _timed_transfer(send, receive)


# The child of the round trip: gadgetron's example pass-through target with the fixes installed.
PASS_THROUGH = """from semrecon_core.gadgetron import compat

compat.install()

from gadgetron.examples.pass_through import pass_through
"""


def case_round_trip(recon_data: Any, header_xml: str, gadget_dir: Path) -> float:
    """Emulator → ``python -m gadgetron`` pass-through child → emulator; session time only."""
    from semrecon_core.emulation import emulator

    run = emulator.run_external(
        "<configuration/>",
        header_xml,
        [recon_data],
        module="semrecon_bench_pass_through",
        target="pass_through",
        gadget_path=[gadget_dir],
        timeout=600,
    )
    assert len(run.items) == 1 and np.array_equal(run.items[0].bits[0].data.data, recon_data.bits[0].data.data)
    return run.seconds


HEADER_XML = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>640</x><y>320</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>280</x><y>140</y><z>3</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm></reconSpace>
    <encodingLimits/>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
"""


def measure(sizes: dict[str, tuple[int, int, int, int]], repeats: int, gadget_dir: Path) -> dict[str, dict]:
    """Every case for every buffer: fastest of ``repeats`` runs, MB/s and ratio against gadgetron-python."""
    import io

    from gadgetron.types.recon_data import write_recon_data

    buffers: dict[str, tuple[Any, bytes]] = {}
    results: dict[str, dict] = {}
    for name, (readout, lines, coils, slices) in sizes.items():
        recon_data = make_recon_data(readout, lines, coils, slices)
        serialised = io.BytesIO()
        write_recon_data(serialised, recon_data)  # complex64 data: the same bytes as with the fixes
        buffers[name] = (recon_data, serialised.getvalue())
        megabytes = len(buffers[name][1]) / 1e6
        results[name] = {
            "dims": [readout, lines, 1, coils, 1, 1, slices],
            "headers": lines * slices,
            "megabytes": megabytes,
            "repeats": repeats,
            "warmup": megabytes < 100,
            "cases": {},
        }
    # gadgetron-python as shipped first: the fixes the other cases install patch it for the rest of the process
    runners: dict[str, tuple[Callable[[Any, bytes], float], float]] = {
        "gadgetron-python": (lambda recon_data, _: case_gadgetron(recon_data), 1.0),
        "raw": (lambda _, payload: case_raw(payload), 1.0),
        "semrecon": (lambda recon_data, _: case_semrecon(recon_data), 1.0),
        "round-trip": (lambda recon_data, _: case_round_trip(recon_data, HEADER_XML, gadget_dir), 2.0),
    }
    for case, (runner, moved) in runners.items():
        for name, (recon_data, payload) in buffers.items():
            size = results[name]
            if size["warmup"]:
                runner(recon_data, payload)  # warm-up: first-touch page faults, imports
            times = [runner(recon_data, payload) for _ in range(size["repeats"])]
            seconds = min(times)  # other jobs on a shared machine only add time
            entry = {"seconds": seconds, "all_seconds": times, "MB_per_s": moved * size["megabytes"] / seconds}
            size["cases"][case] = entry
            print(f"{name:12s} {case:17s} {seconds:8.3f} s  {entry['MB_per_s']:8.0f} MB/s", flush=True)
    for size in results.values():
        reference = size["cases"]["gadgetron-python"]["seconds"]
        for entry in size["cases"].values():
            entry["ratio_vs_gadgetron_python"] = reference / entry["seconds"]
    return results


def _markdown(result: dict) -> str:
    lines = [
        "# Gadgetron wire protocol throughput",
        "",
        (
            f"{result['machine']}; over TCP on 127.0.0.1, fastest of `repeats` transfers (after one warm-up "
            f"for buffers under 100 MB) (load average at start {result['load_average']}). gadgetron-python: "
            "its serialisers as shipped (1.4.1); semrecon: the emulator's writer to the gadget's reader, both "
            "gadgetron-python's with semrecon's fixes (`semrecon_core.gadgetron.compat`) installed. ratio = "
            "gadgetron-python time / case time. round-trip moves the buffer twice (to a `python -m gadgetron` "
            "pass-through child and back)."
        ),
        "",
        "| buffer | dims [E0,E1,E2,CHA,N,S,LOC] | MB | repeats | case | seconds | MB/s | ratio |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, size in result["buffers"].items():
        for case, entry in size["cases"].items():
            lines.append(
                f"| {name} | {size['dims']} | {size['megabytes']:.1f} | {size['repeats']} | {case} | "
                f"{entry['seconds']:.3f} | "
                f"{entry['MB_per_s']:.0f} | {entry['ratio_vs_gadgetron_python']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        temporary = handle.name
    Path(temporary).replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="transfers per case and buffer (fastest reported)")
    parser.add_argument("--skip-volume", action="store_true", help="only the one-slice buffer")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in SIZES.items() if not (args.skip_volume and k == "knee-volume")}
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as gadget_dir:
        (Path(gadget_dir) / "semrecon_bench_pass_through.py").write_text(PASS_THROUGH)
        result["buffers"] = measure(sizes, args.repeats, Path(gadget_dir))
    _write_atomic(RESULTS / "protocol.json", json.dumps(result, indent=2) + "\n")
    _write_atomic(RESULTS / "protocol.md", _markdown(result))
    print(f"wrote {RESULTS / 'protocol.json'} and {RESULTS / 'protocol.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
