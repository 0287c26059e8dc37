"""Overhead of `semrecon replay` over the reconstruction it runs.

For each scan the same buffers are reconstructed in two ways, alternating, in one process:

* ``reconstruction`` (the reference): for every ReconBit of the buffers (prepared beforehand, untimed),
  ``from_recon_buffer`` → ``Pipeline.run`` (ESPIRiT maps, the engine) → ``Reconstruction.images`` — the work
  the gadget cannot avoid;
* ``replay``: :func:`semrecon_core.emulation.replay.replay` on the raw file with the default chain — file
  reading, noise prewhitening, readout-oversampling removal, accumulation, bucket-to-buffer, the
  in-process connection (images round-trip through their wire serialisation), the gadget, and the same
  reconstruction;
* ``replay --protocol`` (once per scan): the gadget in a ``python -m gadgetron`` child over the wire format,
  child start-up (imports) included.

overhead = (replay time − reconstruction time) / reconstruction time, from the fastest of the alternating
runs (other jobs on a shared machine only add time; every run is listed), both for wall time and for this
process's CPU time (``time.process_time``, all threads; the protocol child is not in it: wall time only).
Scans: the ismrmrd-tools Shepp–Logan file of the tests (when the tool is installed) and a `semrecon simulate`
file with 3 slices. CG-SENSE with 30 iterations on the CPU.
Writes ``benchmarks/results/replay.json`` and ``replay.md``.
Usage: ``python benchmarks/bench_replay.py [--repeats 3] [--skip-protocol]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
OVERRIDES = {"backbone": "sense", "prior": "none", "iterations": "30", "device": "cpu"}


def make_scans(directory: Path) -> dict[str, Path]:
    """The raw files to replay: Shepp–Logan (if ismrmrd-tools is installed) and a simulated 3-slice scan."""
    from semrecon_core.data.simulate import write_ismrmrd_raw

    scans: dict[str, Path] = {}
    tool = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if tool:
        path = directory / "shepp_logan.h5"
        subprocess.run(
            [
                tool,
                "-m",
                "128",
                "-c",
                "8",
                "-O",
                "2",
                "-a",
                "2",
                "-w",
                "24",
                "-C",
                "-r",
                "2",
                "-n",
                "0.05",
                "-o",
                str(path),
            ],
            check=True,
            capture_output=True,
        )
        scans["shepp-logan 128², 8 coils, 4 reps"] = path
    else:
        print("ismrmrd_generate_cartesian_shepp_logan not found: Shepp-Logan case skipped", file=sys.stderr)
    scans["simulated 128², 8 coils, 3 slices"] = write_ismrmrd_raw(
        directory / "simulated.h5", matrix=(128, 128), slices=3, coils=8, acceleration=3, seed=0
    )
    return scans


def prepare_buffers(path: Path) -> tuple[str, list[Any]]:
    """The ReconData buffers of a raw file (what the chain's first four gadgets produce)."""
    from semrecon_core.data.buffers import recon_data_from_acquisitions
    from semrecon_core.emulation.replay import read_raw

    header, acquisitions, _ = read_raw(path)
    return header, recon_data_from_acquisitions(list(acquisitions), header, trigger="repetition", split_slices=False)


def reconstruction_only(header: str, buffers: list[Any]) -> tuple[float, float, int]:
    """Wall and CPU seconds for the unavoidable per-buffer work, and the number of images."""
    from semrecon_core.config import ReconConfig
    from semrecon_core.data.readers import from_recon_buffer
    from semrecon_core.pipeline import Pipeline

    pipeline = Pipeline(ReconConfig.from_properties(OVERRIDES))
    start, cpu = time.perf_counter(), time.process_time()
    images = 0
    for recon_data in buffers:
        for bit in recon_data.bits:
            images += len(pipeline.run(from_recon_buffer(bit.data, bit.ref, header)).images())
    return time.perf_counter() - start, time.process_time() - cpu, images


def timed_replay(path: Path, protocol: bool) -> tuple[float, float, int]:
    """Wall and CPU seconds of a whole replay, and the number of images."""
    from semrecon_core.emulation.replay import replay

    start, cpu = time.perf_counter(), time.process_time()
    result = replay(path, overrides=OVERRIDES, protocol=protocol)
    return time.perf_counter() - start, time.process_time() - cpu, len(result.images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-protocol", action="store_true")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    load = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in make_scans(Path(tmp)).items():
            header, buffers = prepare_buffers(path)
            recon_times, replay_times, recon_cpu, replay_cpu = [], [], [], []
            reconstruction_only(header, buffers[:1])  # warm-up: imports, FFT plans
            for _ in range(args.repeats):
                seconds, cpu, n_recon = reconstruction_only(header, buffers)
                recon_times.append(seconds)
                recon_cpu.append(cpu)
                seconds, cpu, n_replay = timed_replay(path, protocol=False)
                replay_times.append(seconds)
                replay_cpu.append(cpu)
                if n_recon != n_replay:
                    raise RuntimeError(f"{name}: replay gave {n_replay} images, the reference {n_recon}")
            recon, rep = min(recon_times), min(replay_times)
            cpu_recon, cpu_rep = min(recon_cpu), min(replay_cpu)
            row: dict[str, Any] = {
                "scan": name,
                "images": n_recon,
                "reconstruction_s": recon,
                "replay_s": rep,
                "overhead": (rep - recon) / recon,
                "reconstruction_cpu_s": cpu_recon,
                "replay_cpu_s": cpu_rep,
                "overhead_cpu": (cpu_rep - cpu_recon) / cpu_recon,
                "reconstruction_runs_s": recon_times,
                "replay_runs_s": replay_times,
            }
            if not args.skip_protocol:
                seconds, _, n_protocol = timed_replay(path, protocol=True)
                if n_protocol != n_recon:
                    raise RuntimeError(f"{name}: protocol replay gave {n_protocol} images, expected {n_recon}")
                row["protocol_replay_s"] = seconds
                row["protocol_overhead"] = (seconds - recon) / recon
            rows.append(row)
            print(
                f"{name}: reconstruction {recon:.2f} s, replay {rep:.2f} s, overhead {row['overhead']:+.1%} "
                f"(CPU time: {row['overhead_cpu']:+.1%})"
            )

    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_at_start": load,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "repeats": args.repeats,
        "overrides": OVERRIDES,
        "command": shlex.join(["python", "benchmarks/bench_replay.py", *sys.argv[1:]]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    _write(RESULTS / "replay.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Replay overhead",
        "",
        f"Made by `{meta['command']}`.",
        "",
        (
            f"{meta['machine']}; CG-SENSE 30 iterations on the CPU; fastest of {args.repeats} alternating runs "
            f"(load average {load} at start, {meta['load_average_at_end']} at end: other jobs shared the "
            "2 cores). overhead = (replay − reconstruction) / reconstruction, where reconstruction = "
            "from_recon_buffer + Pipeline.run (ESPIRiT + engine) + image building on the prepared buffers "
            "(the reference, same run)."
        ),
        "",
        (
            "| scan | images | reconstruction s | replay s | overhead | CPU reconstruction s | CPU replay s "
            "| CPU overhead | protocol replay s | protocol overhead | all runs: reconstruction / replay s |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        protocol = (
            f"{row['protocol_replay_s']:.2f} | {row['protocol_overhead']:+.1%}"
            if "protocol_replay_s" in row
            else "– | –"
        )
        lines.append(
            f"| {row['scan']} | {row['images']} | {row['reconstruction_s']:.2f} | {row['replay_s']:.2f} | "
            f"{row['overhead']:+.1%} | {row['reconstruction_cpu_s']:.2f} | {row['replay_cpu_s']:.2f} | "
            f"{row['overhead_cpu']:+.1%} | {protocol} | {_runs(row['reconstruction_runs_s'])} / "
            f"{_runs(row['replay_runs_s'])} |"
        )
    _write(RESULTS / "replay.md", "\n".join(lines) + "\n")
    return 0


def _runs(seconds: list[float]) -> str:
    """All timings of a case, so that interference from other jobs is visible."""
    return ", ".join(f"{value:.1f}" for value in seconds)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
