"""Soak: 50 scans through one ``semrecon serve`` process, with its memory measured (slow).

Tiny scans (32², 4 coils) and a CG-SENSE reconstruction of a few iterations keep each scan short, so the run
measures what a long session accumulates (images, buffers, logs, threads), not reconstruction time. The
server's resident memory is read from ``/proc/PID/status`` after scan 10 (imports and first-use caches done)
and after scan 50; the growth between them must stay below :data:`MAX_GROWTH_MIB`, and SIGTERM must still stop
the server within 5 s with exit status 0.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("gadgetron")
ismrmrd = pytest.importorskip("ismrmrd")

from semrecon_core.emulation import emulator  # noqa: E402
from tests.helpers import read_ismrmrd_scan  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string"),
]

log = logging.getLogger(__name__)
SCANS = 50
MAX_GROWTH_MIB = 50.0


def _rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _address(process: subprocess.Popen, timeout: float) -> int:
    """The port ``semrecon serve`` prints once it listens; fails after ``timeout`` s."""
    found: list[int] = []

    def reader() -> None:
        for raw in iter(process.stdout.readline, b""):  # type: ignore[union-attr]
            match = re.match(r"semrecon serve: listening on 127\.0\.0\.1:(\d+)", raw.decode("utf-8", "replace"))
            if match:
                found.append(int(match.group(1)))
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert found, f"semrecon serve printed no address within {timeout} s"
    return found[0]


def test_fifty_scans_through_one_server_with_bounded_memory(tmp_path: Path, record_property) -> None:
    from semrecon_core.data.simulate import write_ismrmrd_raw

    scan = write_ismrmrd_raw(tmp_path / "scan.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12, seed=5)
    header, buffers = read_ismrmrd_scan(scan)
    properties = ("backbone=sense", "iterations=3", "device=cpu")
    command = [sys.executable, "-m", "semrecon_core.commands.main", "serve", "--port", "0"]
    for item in properties:
        command += ["--set", item]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        cwd=tmp_path,
    )
    rss: dict[int, float] = {}
    try:
        port = _address(process, timeout=120)
        start = time.monotonic()
        for number in range(1, SCANS + 1):
            run = emulator.run_connect("<configuration/>", header, buffers, port=port, timeout=60)
            assert run.errors == [], (number, run.errors)
            assert len(run.images) == len(buffers), number
            assert all(image.meta["GADGETRON_DataRole"] == "Image" for image in run.images), number
            if number in (10, SCANS):
                rss[number] = _rss_mib(process.pid)
        seconds = time.monotonic() - start
        process.terminate()
        stopping = time.monotonic()
        status = process.wait(timeout=30)
        assert time.monotonic() - stopping < 5, "semrecon serve took more than 5 s to stop after SIGTERM"
        assert status == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]
    growth = rss[SCANS] - rss[10]
    summary = (
        f"soak: {SCANS} scans in {seconds:.1f} s; server RSS {rss[10]:.1f} MiB after scan 10, "
        f"{rss[SCANS]:.1f} MiB after scan {SCANS} ({growth:+.1f} MiB)"
    )
    record_property("soak", summary)
    log.info("%s", summary)
    assert growth < MAX_GROWTH_MIB, f"server memory grew {growth:.1f} MiB between scan 10 and scan {SCANS}"
