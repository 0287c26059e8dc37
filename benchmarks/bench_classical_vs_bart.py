"""semrecon's classical reconstructions against BART on the real 8-coil brain scan, both in one run.

Case: ``../shared/data/brain_t1_8coil/kspace.npy`` (8 coils, 230 × 180, fully sampled), retrospectively
undersampled along the 180 phase-encoding lines with the public code's 1-D Gaussian-density mask
(R = 4, 24 ACS lines). Reference: root-sum-of-squares of the fully sampled coil images. PSNR/SSIM are
on magnitudes normalised to the reference's maximum, whole image, the same for both sides.

- coil maps: the pipeline's ESPIRiT (sigpy EspiritCalib, 24×24 calibration) vs ``bart ecalib -m1``;
- CG-SENSE (30 iterations) vs ``bart pics -l2 -r λ -i 30``;
- TV (100 iterations, primal-dual) vs ``bart pics -R T:3:0:λ -i 100``;

ours run through the pipeline with these maps; each λ chosen by a small grid on this case: with ``--tune``
each side runs at its best λ of the grid measured in the same run; without, at the constants below (the grid's
choice when last tuned).
Times are the best of ``--repeats`` runs, BART timed as the whole command (including its file I/O).
Writes ``benchmarks/results/classical_vs_bart.json`` and ``.md``.

    python benchmarks/bench_classical_vs_bart.py [--tune] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semrecon_core import metrics
from semrecon_core.config import ReconConfig
from semrecon_core.data.kspace import Geometry, KSpace
from semrecon_core.data.readers import from_arrays, read_cfl
from semrecon_core.physics.coils import espirit_maps, rss
from semrecon_core.physics.fft import ifft2c
from semrecon_core.physics.masks import sampling_mask
from semrecon_core.pipeline import Pipeline, reconstruct

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "brain_t1_8coil" / "kspace.npy"
RESULTS = ROOT / "benchmarks" / "results"

ACCELERATION, ACS, MASK_KIND, MASK_SEED = 4.0, 24, "gaussian", 0
CG_ITERATIONS, TV_ITERATIONS = 30, 100
# λ tuned on this case by the grids below (ours: relative to max |zero-filled| = 1; BART: its own scaling).
LAM_CG, LAM_TV = 0.01, 0.002
BART_LAM_CG, BART_LAM_TV = 0.01, 0.005
GRID_CG = (0.001, 0.003, 0.01, 0.03)
GRID_TV = (0.001, 0.002, 0.003, 0.005)
BART_GRID_CG = (0.001, 0.003, 0.01, 0.03, 0.1)
BART_GRID_TV = (0.002, 0.005, 0.01, 0.02)


def estimate_maps(kspace: KSpace) -> torch.Tensor:
    """The pipeline's ESPIRiT maps over the ACS × ACS calibration region (shared by every method of ours)."""
    return Pipeline(ReconConfig(calib_width=ACS)).estimate_maps(kspace)


def espirit_crop_08(kspace: KSpace, config: ReconConfig) -> torch.Tensor:
    """The pipeline's ESPIRiT with BART's eigenvalue threshold 0.8 (sigpy's default is 0.95)."""
    return espirit_maps(kspace, calib_width=config.calib_width, crop=0.8)


@dataclass
class Case:
    """The undersampled scan, our ESPIRiT maps and the fully sampled RSS reference ``(1, y, x)``."""

    kspace: KSpace
    maps: torch.Tensor
    reference: torch.Tensor


def load_case(path: Path) -> Case:
    """Undersample the brain scan (coil, x, y) → KSpace ``(1, 8, 180, 230)`` and estimate ESPIRiT maps."""
    full = np.load(path).transpose(0, 2, 1)[None]  # (1, coils, ky=180, kx=230)
    ny, nx = full.shape[-2:]
    mask = sampling_mask(MASK_KIND, (ny, nx), ACCELERATION, acs_width=ACS, seed=MASK_SEED).numpy()
    geometry = Geometry((nx, ny, 1), (nx, ny, 1), (float(nx), float(ny), 5.0), (float(nx), float(ny), 5.0))
    kspace = from_arrays(full, mask[None], geometry, source=str(path))
    maps = estimate_maps(kspace)
    reference = rss(ifft2c(torch.from_numpy(np.ascontiguousarray(full, np.complex64))))
    return Case(kspace=kspace, maps=maps, reference=reference)


def write_cfl(base: Path, array: np.ndarray) -> None:
    """Write a BART ``.hdr``/``.cfl`` pair (column-major complex64)."""
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(d) for d in array.shape) + "\n")
    np.asarray(array, np.complex64).ravel(order="F").tofile(base.with_suffix(".cfl"))


def _to_bart(volume: torch.Tensor) -> np.ndarray:
    """``(coils, ky, kx)`` → BART ``(ky, kx, 1, coils)``."""
    return volume.numpy().transpose(1, 2, 0)[:, :, None, :]


def _from_bart(array: np.ndarray) -> torch.Tensor:
    """BART ``(ky, kx, 1, coils[, ...])`` → ``(1, coils, ky, kx)`` complex64."""
    array = array.reshape(array.shape[:4], order="F") if array.ndim > 4 else array
    if array.ndim < 4:
        array = array.reshape(array.shape + (1,) * (4 - array.ndim))
    return torch.from_numpy(np.ascontiguousarray(array[:, :, 0, :].transpose(2, 0, 1)))[None]


def _bart(*args: str) -> None:
    done = subprocess.run(["bart", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bart {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def bart_ecalib(kspace: KSpace, workdir: Path) -> torch.Tensor:
    """``bart ecalib -m1`` maps ``(1, coils, ky, kx)`` of the first slice."""
    write_cfl(workdir / "ksp", _to_bart(kspace.data[0]))
    _bart("ecalib", "-m1", str(workdir / "ksp"), str(workdir / "sens"))
    return _from_bart(read_cfl(workdir / "sens"))


def bart_pics(kspace: KSpace, maps: torch.Tensor, options: list[str], workdir: Path) -> torch.Tensor:
    """``bart pics -S <options>`` image ``(1, y, x)`` in the units of the k-space (unitary FFT)."""
    write_cfl(workdir / "ksp", _to_bart(kspace.data[0]))
    write_cfl(workdir / "sens", _to_bart(maps[0]))
    _bart("pics", "-S", *options, str(workdir / "ksp"), str(workdir / "sens"), str(workdir / "out"))
    return _from_bart(read_cfl(workdir / "out"))[:, 0]


def _best_time(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def _quality(case: Case, image: torch.Tensor) -> dict[str, float]:
    return {
        "psnr_db": round(metrics.psnr(case.reference, image), 3),
        "ssim": round(metrics.ssim(case.reference, image), 4),
        "haarpsi": round(metrics.haarpsi(case.reference, image), 4),
        "vif": round(metrics.vif(case.reference, image), 4),
    }


def tune(case: Case, bart_maps: torch.Tensor, workdir: Path) -> dict[str, dict[str, float]]:
    """PSNR of every λ of the grids, both sides."""

    def ours(prior: str, lam: float, iterations: int) -> float:
        config = ReconConfig(backbone="sense", prior=prior, lam=lam, iterations=iterations)
        return metrics.psnr(case.reference, reconstruct(case.kspace, config, maps=case.maps).image)

    def bart(options: list[str]) -> float:
        return metrics.psnr(case.reference, bart_pics(case.kspace, bart_maps, options, workdir))

    return {
        "ours_cg": {str(lam): round(ours("none", lam, CG_ITERATIONS), 3) for lam in GRID_CG},
        "ours_tv": {str(lam): round(ours("tv", lam, TV_ITERATIONS), 3) for lam in GRID_TV},
        "bart_cg": {
            str(lam): round(bart(["-l2", "-r", str(lam), "-i", str(CG_ITERATIONS)]), 3) for lam in BART_GRID_CG
        },
        "bart_tv": {str(lam): round(bart(["-R", f"T:3:0:{lam}", "-i", str(TV_ITERATIONS)]), 3) for lam in BART_GRID_TV},
    }


def run(data: Path, repeats: int, do_tune: bool) -> dict:
    """Measure both sides; returns the JSON record."""
    case = load_case(data)
    with tempfile.TemporaryDirectory(prefix="semrecon-bart-") as tmp:
        workdir = Path(tmp)
        espirit_s, _ = _best_time(lambda: estimate_maps(case.kspace), repeats)
        ecalib_s, bart_maps = _best_time(lambda: bart_ecalib(case.kspace, workdir), repeats)
        grid = tune(case, bart_maps, workdir) if do_tune else None
        lam = {"ours_cg": LAM_CG, "ours_tv": LAM_TV, "bart_cg": BART_LAM_CG, "bart_tv": BART_LAM_TV}
        if grid is not None:  # each side at its best λ of the grid
            lam = {side: float(max(values, key=values.get)) for side, values in grid.items()}
        methods = {
            "zero-filled": (ReconConfig(backbone="zero-filled"), None),
            "cg-sense": (
                ReconConfig(backbone="sense", lam=lam["ours_cg"], iterations=CG_ITERATIONS),
                ["-l2", "-r", str(lam["bart_cg"]), "-i", str(CG_ITERATIONS)],
            ),
            "tv": (
                ReconConfig(backbone="sense", prior="tv", lam=lam["ours_tv"], iterations=TV_ITERATIONS),
                ["-R", f"T:3:0:{lam['bart_tv']}", "-i", str(TV_ITERATIONS)],
            ),
        }
        rows = {}
        for name, (config, options) in methods.items():
            ours_s, ours = _best_time(lambda c=config: reconstruct(case.kspace, c, maps=case.maps), repeats)
            row = {"ours": {"seconds": round(ours_s, 3), "lam": config.lam, **_quality(case, ours.image)}}
            if options is not None:
                bart_s, image = _best_time(lambda o=options: bart_pics(case.kspace, bart_maps, o, workdir), repeats)
                row["bart"] = {"seconds": round(bart_s, 3), "options": " ".join(options), **_quality(case, image)}
                row["psnr_gap_db"] = round(row["ours"]["psnr_db"] - row["bart"]["psnr_db"], 3)
                row["time_ratio_ours_over_bart"] = round(ours_s / bart_s, 3)
            rows[name] = row
        # Our solvers with BART's maps separate coil-map from solver differences; maps cropped at
        # BART's default eigenvalue threshold 0.8 (sigpy's is 0.95) show how much SSIM depends on
        # the zeroed background.
        for name in ("cg-sense", "tv"):
            config = methods[name][0].replace(calib_width=ACS)
            image = reconstruct(case.kspace, config, maps=bart_maps).image
            rows[name]["ours_with_bart_maps"] = _quality(case, image)
            image = Pipeline(config, coil_maps=espirit_crop_08).run(case.kspace).image
            rows[name]["ours_with_crop_0.8"] = _quality(case, image)
    return {
        "case": {
            "data": "brain_t1_8coil/kspace.npy (real 8-coil T1 brain, 230 x 180)",
            "mask": f"{MASK_KIND} 1-D, R={ACCELERATION:g}, {ACS} ACS lines, seed {MASK_SEED}",
            "achieved_acceleration": round(case.kspace.acceleration, 3),
            "reference": "RSS of the fully sampled coil images; magnitudes normalised to its max; whole image",
        },
        "coil_maps": {
            "espirit_sigpy_seconds": round(espirit_s, 3),
            "bart_ecalib_seconds": round(ecalib_s, 3),
            "time_ratio_ours_over_bart": round(espirit_s / ecalib_s, 3),
        },
        "methods": rows,
        "lam_source": "best of the grids in this run" if grid is not None else "constants tuned earlier",
        "tuning_psnr_db": grid,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "repeats": repeats,
        },
    }


def markdown(record: dict) -> str:
    """The Markdown table of a record."""
    lines = [
        "# Classical reconstructions: semrecon vs BART",
        "",
        (
            f"Case: {record['case']['data']}; mask {record['case']['mask']} "
            f"(achieved R = {record['case']['achieved_acceleration']}); "
            f"reference: {record['case']['reference']}."
        ),
        "",
        (
            "| method | ours PSNR (dB) | BART PSNR (dB) | gap (dB) | ours SSIM | BART SSIM | ours HaarPSI | "
            "BART HaarPSI | ours VIF | BART VIF | ours (s) | BART (s) | time ratio ours/BART |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in record["methods"].items():
        ours, bart = row["ours"], row.get("bart")
        if bart is None:
            lines.append(
                f"| {name} | {ours['psnr_db']:.2f} | – | – | {ours['ssim']:.4f} | – | {_score(ours, 'haarpsi')} | – | "
                f"{_score(ours, 'vif')} | – | {ours['seconds']:.3f} | – | – |"
            )
            continue
        lines.append(
            f"| {name} (ours λ={ours['lam']:g}; BART `{bart['options']}`) | {ours['psnr_db']:.2f} | "
            f"{bart['psnr_db']:.2f} | {row['psnr_gap_db']:+.2f} | {ours['ssim']:.4f} | {bart['ssim']:.4f} | "
            f"{_score(ours, 'haarpsi')} | {_score(bart, 'haarpsi')} | {_score(ours, 'vif')} | {_score(bart, 'vif')} | "
            f"{ours['seconds']:.3f} | {bart['seconds']:.3f} | {row['time_ratio_ours_over_bart']:.2f} |"
        )
    maps = record["coil_maps"]
    lines += [
        (
            f"| ESPIRiT maps (sigpy vs `bart ecalib -m1`) | | | | | | | | | | {maps['espirit_sigpy_seconds']:.3f} | "
            f"{maps['bart_ecalib_seconds']:.3f} | {maps['time_ratio_ours_over_bart']:.2f} |"
        ),
        "",
        "Our solvers with BART's maps: "
        + ", ".join(
            _psnr_ssim(name, row["ours_with_bart_maps"])
            for name, row in record["methods"].items()
            if "ours_with_bart_maps" in row
        )
        + (
            ". With our maps cropped at BART's eigenvalue threshold 0.8 instead of sigpy's 0.95 (less "
            "background zeroed; SSIM is sensitive to it): "
        )
        + ", ".join(
            _psnr_ssim(name, row["ours_with_crop_0.8"])
            for name, row in record["methods"].items()
            if "ours_with_crop_0.8" in row
        )
        + ".",
    ]
    if record["tuning_psnr_db"]:
        lines += ["", f"λ grids (PSNR dB; the table uses the {record['lam_source']}):", ""]
        for side, values in record["tuning_psnr_db"].items():
            lines.append(f"- {side}: " + ", ".join(f"λ={lam}: {psnr:.2f}" for lam, psnr in values.items()))
    machine = record["machine"]
    lines += [
        "",
        (
            f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
            f"({machine['torch_threads']} threads; BART OMP_NUM_THREADS={machine['omp_threads']}), "
            f"1-min load average {machine['load_average_1min']} at the end; "
            f"times are the best of {machine['repeats']} runs (BART includes its .cfl I/O)."
        ),
    ]
    return "\n".join(lines) + "\n"


def _psnr_ssim(name: str, quality: dict[str, float]) -> str:
    text = f"{name} {quality['psnr_db']:.2f} dB / SSIM {quality['ssim']:.4f}"
    if "haarpsi" in quality and "vif" in quality:
        text += f" / HaarPSI {quality['haarpsi']:.4f} / VIF {quality['vif']:.4f}"
    return text


def _score(quality: dict[str, float], name: str) -> str:
    """A HaarPSI or VIF cell; '–' for results measured before these metrics were reported."""
    return "–" if quality.get(name) is None else f"{quality[name]:.4f}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    Path(handle.name).replace(path)


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="brain_t1_8coil/kspace.npy")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    parser.add_argument("--tune", action="store_true", help="also report the PSNR of every λ of the grids")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--threads", type=int, default=None, help="threads for both sides (torch and BART's OpenMP)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if shutil.which("bart") is None:
        parser.error("'bart' is not on PATH (apt-get install bart)")
    if not args.data.is_file():
        parser.error(f"{args.data}: no such file (the shared data folder is not part of the repository)")
    record = run(args.data, max(args.repeats, 1), args.tune)
    _write_atomic(args.out / "classical_vs_bart.json", json.dumps(record, indent=2) + "\n")
    _write_atomic(args.out / "classical_vs_bart.md", markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
