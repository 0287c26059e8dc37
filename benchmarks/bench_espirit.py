"""ESPIRiT coil maps: semrecon's batched torch version vs ``bart ecalib -m1`` and sigpy's ``EspiritCalib``.

Case (issue 11): the real fastMRI knee slice ``../shared/data/knee_fastmri_rss/pd_00.npy`` (320 × 320) made
multicoil by :func:`semrecon_core.data.simulate.simulate_kspace` with 15 birdcage coils, R = 4 (1-D Gaussian
mask), 24 ACS lines; maps from the 24 × 24 calibration centre, kernel 6, thresholds 0.02 / 0.95 (sigpy's
defaults; BART runs at its own defaults but ``-m1 -r 24``). Optionally a volume: the 11 PD knee slices cycled
to ``--volume-slices`` slices, torch in one batched call vs BART once per slice (sigpy is not timed on it).

All three run in the same process and repeat (interleaved, so they share the machine's load), with
``torch.set_num_threads(2)`` and ``OMP_NUM_THREADS=2`` for BART; times are medians of ``--repeats`` runs; BART is
timed as the whole command, including reading and writing its ``.cfl`` files (written to a temporary folder).
Agreement with sigpy: the largest absolute difference of the maps over all pixels and coils (both sides put
coil 0 real positive), and the number of pixels cropped by one side only.
Writes ``benchmarks/results/espirit.json`` and ``.md``.

    python benchmarks/bench_espirit.py [--repeats 3] [--volume-slices 35] [--volume-repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from semrecon_core.data.simulate import simulate_kspace
from semrecon_core.physics.coils import espirit_maps

if TYPE_CHECKING:
    from semrecon_core.data.kspace import KSpace

ROOT = Path(__file__).resolve().parents[1]
KNEE = ROOT.parent / "shared" / "data" / "knee_fastmri_rss"
RESULTS = ROOT / "benchmarks" / "results"
COILS, ACCELERATION, ACS, THREADS = 15, 4.0, 24, 2


def knee_scan(slices: int) -> KSpace:
    """The simulated 15-coil knee: pd_00 alone, or the PD slices cycled to ``slices``."""
    files = sorted(KNEE.glob("pd_[0-9][0-9].npy"))
    if not files:
        raise SystemExit(f"{KNEE}: the shared knee data are absent; this benchmark needs them")
    images = np.stack([np.load(files[index % len(files)]) for index in range(slices)])
    return simulate_kspace(images, coils=COILS, acceleration=ACCELERATION, acs_width=ACS, seed=0)


def write_cfl(base: Path, array: np.ndarray) -> None:
    """A BART ``.hdr``/``.cfl`` pair (column-major complex64)."""
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(d) for d in array.shape) + "\n")
    np.asarray(array, np.complex64).ravel(order="F").tofile(base.with_suffix(".cfl"))


def bart_inputs(kspace: KSpace, workdir: Path) -> list[Path]:
    """One BART k-space file ``(ky, kx, 1, coils)`` per slice."""
    paths = []
    for index in range(kspace.shape[0]):
        path = workdir / f"ksp{index}"
        write_cfl(path, kspace.data[index].numpy().transpose(1, 2, 0)[:, :, None, :])
        paths.append(path)
    return paths


def bart_ecalib(inputs: list[Path]) -> None:
    """``bart ecalib -m1 -r 24`` on every slice file (maps written beside them)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    for path in inputs:
        done = subprocess.run(
            ["bart", "ecalib", "-m1", "-r", str(ACS), str(path), str(path.with_name(path.name + "_maps"))],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bart ecalib failed ({done.returncode}): {done.stderr.strip()}")


def timed(function: Callable[[], object]) -> tuple[float, object]:
    """Wall time of one call and its result."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def agreement(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Largest absolute map difference and pixels cropped by one side only."""
    cropped = (ours.abs().sum(1) > 0) != (reference.abs().sum(1) > 0)
    return {"max_abs_diff": float((ours - reference).abs().max()), "crop_mismatch_pixels": int(cropped.sum())}


def run_case(kspace: KSpace, repeats: int, *, with_sigpy: bool) -> dict[str, object]:
    """Interleaved timings of BART, sigpy (optional) and torch on ``kspace``; agreement with sigpy."""
    times: dict[str, list[float]] = {"bart": [], "torch": [], "sigpy": []}
    maps: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="bench_espirit_") as folder:
        inputs = bart_inputs(kspace, Path(folder))
        for _ in range(repeats):
            times["bart"].append(timed(lambda: bart_ecalib(inputs))[0])
            if with_sigpy:
                seconds, result = timed(lambda: espirit_maps(kspace, calib_width=ACS, method="sigpy"))
                times["sigpy"].append(seconds)
                maps["sigpy"] = result  # type: ignore[assignment]
            seconds, result = timed(lambda: espirit_maps(kspace, calib_width=ACS, method="torch"))
            times["torch"].append(seconds)
            maps["torch"] = result  # type: ignore[assignment]
    median = {name: statistics.median(values) for name, values in times.items() if values}
    row: dict[str, object] = {
        "slices": kspace.shape[0],
        "seconds": median,
        "runs": {name: values for name, values in times.items() if values},
        "torch_over_bart": median["torch"] / median["bart"],
    }
    if with_sigpy:
        row["sigpy_over_bart"] = median["sigpy"] / median["bart"]
        row["torch_vs_sigpy"] = agreement(maps["torch"], maps["sigpy"])
    return row


def markdown(report: dict[str, object]) -> str:
    """The results as a Markdown table."""
    lines = [
        "# ESPIRiT coil maps: batched torch vs `bart ecalib -m1` vs sigpy `EspiritCalib`",
        "",
        (
            f"Written by `benchmarks/bench_espirit.py` on {report['machine']} ({report['threads']} threads; other jobs"
            " may share the machine, so times are medians of interleaved runs)."
        ),
        (
            "Case: fastMRI knee PD `pd_00` (320 × 320) simulated with 15 birdcage coils, R = 4, 24 ACS lines; maps from"
            " the 24 × 24 centre, sigpy's defaults (kernel 6, thresholds 0.02 / 0.95, 100 power iterations)."
        ),
        "",
        (
            "| case | slices | runs | bart ecalib (s) | sigpy (s) | torch (s) | torch / bart | sigpy / bart |"
            " max \\|torch − sigpy\\| | crop mismatch (px) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["cases"].items():  # type: ignore[attr-defined]
        seconds = row["seconds"]
        sigpy = f"{seconds['sigpy']:.2f}" if "sigpy" in seconds else "—"
        ratio = f"{row['sigpy_over_bart']:.2f}" if "sigpy_over_bart" in row else "—"
        diff = row.get("torch_vs_sigpy")
        diff_text = f"{diff['max_abs_diff']:.1e}" if diff else "—"
        crop_text = str(diff["crop_mismatch_pixels"]) if diff else "—"
        lines.append(
            f"| {name} | {row['slices']} | {len(row['runs']['torch'])} | {seconds['bart']:.2f} | {sigpy} |"
            f" {seconds['torch']:.2f} | **{row['torch_over_bart']:.2f}** | {ratio} | {diff_text} | {crop_text} |"
        )
    lines += [
        "",
        (
            "BART is timed per command including its `.cfl` input/output (once per slice for a volume); torch and sigpy"
            " through `semrecon_core.physics.coils.espirit_maps` (method `torch`, the pipeline's, or `sigpy`), maps"
            " returned on the CPU. Issue 11 asks torch ≤ 1.0 × BART on the single 320² slice and maps equal to sigpy's"
            " to 1e-4."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the cases and write the JSON and Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--volume-slices", type=int, default=35, help="0 skips the volume")
    parser.add_argument("--volume-repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    cases = {"knee 320² single slice": run_case(knee_scan(1), args.repeats, with_sigpy=True)}
    print(json.dumps(cases, indent=1))
    if args.volume_slices > 0:
        volume = knee_scan(args.volume_slices)
        cases[f"knee volume {args.volume_slices} slices"] = run_case(volume, args.volume_repeats, with_sigpy=False)
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "threads": THREADS,
        "torch": torch.__version__,
        "cases": cases,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "espirit.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "espirit.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
