"""Cost and value of the data layer (readers + Gadgetron-equivalent buffering).

1. Reading speed. For each raw file, alternating in one process:
   * ``ismrmrd read`` (the reference): the ``ismrmrd`` package's own ``Dataset.read_acquisition`` for every
     acquisition — reading only, no processing;
   * ``read_ismrmrd``: reading + noise prewhitening + readout-oversampling removal + accumulation +
     bucket-to-buffer + KSpace (mask, calibration, headers, ground truth).
   ratio = semrecon median / reference median (wall and this process's CPU time).
2. Value of noise prewhitening. A simulated scan with correlated coil noise (the simulator mixes coils)
   is read with and without the NoiseAdjust step; CG-SENSE (ESPIRiT maps, 30 iterations) is compared
   with the stored ground truth (PSNR after least-squares intensity scaling).

Writes ``benchmarks/results/data.json`` and ``data.md``.
Usage: ``python benchmarks/bench_data.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(function: Any) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def _ismrmrd_read(path: Path) -> None:
    import ismrmrd

    dataset = ismrmrd.Dataset(str(path), "dataset", mode="r")
    for number in range(dataset.number_of_acquisitions()):
        dataset.read_acquisition(number)
    dataset.close()


def _scans(folder: Path) -> dict[str, Path]:
    from semrecon_core.data.simulate import write_ismrmrd_raw

    scans: dict[str, Path] = {}
    tool = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if tool:
        path = folder / "shepp_logan.h5"
        args = [tool, "-m", "128", "-c", "8", "-O", "2", "-a", "2", "-w", "24", "-C", "-r", "2", "-n", "0.05"]
        subprocess.run([*args, "-o", str(path)], check=True, capture_output=True)
        scans["Shepp-Logan tool 128², 8 coils, 4 reps, OS 2, noise scan"] = path
    scans["simulated 256², 16 coils, 4 slices, OS 2, noise scan"] = write_ismrmrd_raw(
        folder / "sim.h5", matrix=(256, 256), slices=4, coils=16, acceleration=4, acs_width=24, seed=0
    )
    return scans


def _speed(scans: dict[str, Path], repeats: int) -> list[dict[str, Any]]:
    from semrecon_core.data.readers import read_ismrmrd

    rows = []
    for name, path in scans.items():
        reference, ours = [], []
        for _ in range(repeats):
            reference.append(_timed(lambda p=path: _ismrmrd_read(p)))
            ours.append(_timed(lambda p=path: read_ismrmrd(p)))
        shape = read_ismrmrd(path).shape
        ref_wall = statistics.median(t[0] for t in reference)
        our_wall = statistics.median(t[0] for t in ours)
        ref_cpu = statistics.median(t[1] for t in reference)
        our_cpu = statistics.median(t[1] for t in ours)
        rows.append(
            {
                "scan": name,
                "kspace_shape": list(shape),
                "ismrmrd_read_s": ref_wall,
                "from_ismrmrd_s": our_wall,
                "ratio_wall": our_wall / ref_wall,
                "ismrmrd_read_cpu_s": ref_cpu,
                "from_ismrmrd_cpu_s": our_cpu,
                "ratio_cpu": our_cpu / ref_cpu,
            }
        )
    return rows


def _without_prewhitening(path: Path) -> Any:
    """The same reading pipeline with the NoiseAdjust step left out (noise scans dropped)."""
    import h5py

    from semrecon_core.data import buffers
    from semrecon_core.data.readers import _read_acquisitions, concatenate, from_recon_buffer

    with h5py.File(path, "r") as file:
        xml = file["dataset/xml"][0].decode()
        acquisitions = [a for a in _read_acquisitions(path, file["dataset"]) if not a.is_flag_set(19)]
        truth = file["dataset/ground_truth"][()]
    header = buffers.parse_header(xml)
    stream = buffers.remove_ro_oversampling(acquisitions, header)
    parts = [
        from_recon_buffer(bit.data, bit.ref, xml)
        for bucket in buffers.accumulate_trigger(stream)
        for bit in buffers.bucket_to_buffer(bucket, header).bits
    ]
    import torch

    return replace(concatenate(parts), ground_truth=torch.from_numpy(truth))


def _prewhitening(folder: Path) -> dict[str, Any]:
    from semrecon_core.config import ReconConfig
    from semrecon_core.data.readers import read_ismrmrd
    from semrecon_core.data.simulate import write_ismrmrd_raw
    from semrecon_core.metrics import psnr
    from semrecon_core.pipeline import reconstruct

    path = write_ismrmrd_raw(
        folder / "noisy.h5",
        matrix=(128, 128),
        slices=2,
        coils=8,
        acceleration=3,
        acs_width=24,
        noise_std=0.02,
        seed=4,
    )
    out: dict[str, Any] = {"scan": "simulated 128², 8 coils, 2 slices, R = 3, noise 0.02 (correlated coils)"}
    for label, kspace in (("with", read_ismrmrd(path)), ("without", _without_prewhitening(path))):
        image = reconstruct(kspace, ReconConfig(backbone="sense", iterations=30, device="cpu")).image.numpy()
        truth = kspace.ground_truth.numpy()
        magnitude = np.abs(image)
        scale = (magnitude * truth).sum(axis=(-2, -1), keepdims=True) / (magnitude**2).sum(axis=(-2, -1), keepdims=True)
        out[f"psnr_{label}_prewhitening_db"] = psnr(truth, magnitude * scale)
    out["gain_db"] = out["psnr_with_prewhitening_db"] - out["psnr_without_prewhitening_db"]
    return out


def main() -> None:
    """Run both measurements and write the JSON and Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        scans = _scans(Path(folder))
        speed = _speed(scans, args.repeats)
        whitening = _prewhitening(Path(folder))
    result = {
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "repeats": args.repeats,
        "reading": speed,
        "prewhitening": whitening,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Data layer: reading cost and prewhitening value",
        "",
        f"Machine: {result['machine']}; medians of {args.repeats} alternating runs",
        "(a shared 2-core machine, other jobs running: compare ratios, not absolute times).",
        "",
        "| scan | KSpace shape | ismrmrd read (s) | read_ismrmrd (s) | ratio wall | ratio CPU |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['scan']} | {tuple(row['kspace_shape'])} | {row['ismrmrd_read_s']:.2f} | "
        f"{row['from_ismrmrd_s']:.2f} | {row['ratio_wall']:.2f} | {row['ratio_cpu']:.2f} |"
        for row in speed
    ]
    lines += [
        "",
        "Reference: the `ismrmrd` package reading every acquisition (no processing).",
        "`read_ismrmrd` reads the whole table at once, then prewhitens, removes readout oversampling,",
        "accumulates, buffers and builds the KSpace.",
        "",
        f"Noise prewhitening ({whitening['scan']}), CG-SENSE PSNR vs ground truth:",
        (
            f"{whitening['psnr_with_prewhitening_db']:.2f} dB with, "
            f"{whitening['psnr_without_prewhitening_db']:.2f} dB without (gain {whitening['gain_db']:+.2f} dB)."
        ),
        "",
    ]
    (RESULTS / "data.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
