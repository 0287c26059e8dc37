"""Calibration of the presets' λ: data-term gradients of ``paper`` and ``public-code`` on real knee anatomy.

The authors tuned λ against their own data terms (unnormalised-FFT L1; REFERENCE.md §7). The ``paper`` preset
uses the per-pixel mean of 0.5·‖A x − y‖² instead, so their λ cannot be copied. This script measures, with
respect to the image, the gradient norm of every data term at initialisation on fastMRI knee PD slices
(``../shared/data/knee_fastmri_rss``), simulated with 15 birdcage coils and undersampled at R = 4 with 24 ACS
lines (the paper's setting), coil maps by the pipeline's ESPIRiT. Initialisation: the network output before
training, taken as the zero image (an untrained U-Net / SIREN outputs a small image; the residual is then the
measured data) and, for comparison, the zero-filled image.

From the ratios it derives:
- the ``paper`` semantic λ: ``λ_public-code · g_paper / g_public-code(backbone)``, so the prior's gradient relative
  to the data term's at initialisation equals the authors' runs' (the contrastive loss is the same function in
  both presets);
- the ``public-code`` TV λ per backbone: the authors use TV only in the INR's first phase (weight 3 on a
  sampled-entries L1); every backbone gets the λ that keeps that TV/data gradient ratio:
  ``3 · g_public-code(backbone) / g_public-code(INR)``.
The unrolled network sums the L1 over its 9 stage outputs (input, 4 U-Net, 4 data-consistency outputs; the
image-language setting: 8 stages, 17 outputs): its data gradient is taken as that many times one output's.

Writes ``benchmarks/results/calibration.json`` and ``.md``. Run: ``python benchmarks/bench_calibration.py``.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "knee_fastmri_rss"
RESULTS = ROOT / "benchmarks" / "results"
SLICES = ("pd_00.npy", "pd_03.npy", "pd_06.npy")
LAMBDA_PUBLIC_CODE = {"unet": 0.1, "unrolled": 1.0, "inr": 5.0, "language": 500.0}
STAGE_OUTPUTS = {"unrolled": 9, "language": 17}


def _gradient_norm(term: Any, image: torch.Tensor) -> float:
    x = image.clone().requires_grad_(True)
    term(x).backward()
    assert x.grad is not None
    return float(x.grad.norm())


def _term(x: torch.Tensor, *, op: Any, measured: torch.Tensor, mask: torch.Tensor, **options: Any) -> torch.Tensor:
    from semrecon_core.engines.objective import data_term

    return data_term(op(x), measured, mask, **options)


def measure(size: int) -> dict[str, Any]:
    """Gradient norms of every data term at initialisation, per slice, at ``size``² pixels."""
    from skimage.transform import resize

    from semrecon_core.config import ReconConfig
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.physics.sense import SenseOp
    from semrecon_core.pipeline import Pipeline, prepare_problem

    rows = []
    for name in SLICES:
        image = np.load(DATA / name)
        if size != image.shape[0]:
            image = resize(image, (size, size), anti_aliasing=True)
        kspace = simulate_kspace(image.astype(np.float32), coils=15, acceleration=4, acs_width=24, seed=0)
        maps = Pipeline(ReconConfig(device="cpu")).estimate_maps(kspace)
        problem = prepare_problem(kspace, maps, torch.device("cpu"))
        op = SenseOp(problem.maps, problem.mask)
        measured = problem.kspace * problem.mask.unsqueeze(-3)
        mask = problem.mask
        terms = {
            "paper": functools.partial(_term, op=op, measured=measured, mask=mask, preset="paper"),
            "public-code whole": functools.partial(_term, op=op, measured=measured, mask=mask, preset="public-code"),
            "public-code sampled": functools.partial(
                _term, op=op, measured=measured, mask=mask, preset="public-code", reduction="sampled"
            ),
        }
        starts = {"zero": torch.zeros_like(op.adjoint(measured)), "zero-filled": op.adjoint(measured)}
        row: dict[str, Any] = {"slice": name}
        for start, x in starts.items():
            for term, function in terms.items():
                row[f"{term} @ {start}"] = _gradient_norm(function, x)
        rows.append(row)
    return {"size": size, "rows": rows}


def derive(rows: list[dict[str, Any]], start: str) -> dict[str, float]:
    """λ values from the median gradient ratios at ``start``."""
    paper = [r[f"paper @ {start}"] for r in rows]
    whole = [r[f"public-code whole @ {start}"] for r in rows]
    sampled = [r[f"public-code sampled @ {start}"] for r in rows]
    public = {
        "unet": statistics.median(whole),
        "unrolled": STAGE_OUTPUTS["unrolled"] * statistics.median(whole),
        "inr": statistics.median(sampled),
        "language": STAGE_OUTPUTS["language"] * statistics.median(whole),
    }
    g_paper = statistics.median(paper)
    out = {f"paper semantic λ {b}": LAMBDA_PUBLIC_CODE[b] * g_paper / g for b, g in public.items()}
    out.update({f"public-code TV λ {b}": 3.0 * public[b] / public["inr"] for b in ("unet", "unrolled", "inr")})
    return out


def main() -> None:
    """Measure at 320² (the paper's matrix) and 128² (the CPU benchmarks'); write JSON and Markdown."""
    started = time.time()
    runs = [measure(320), measure(128)]
    derived = {
        f"{run['size']} @ {start}": derive(run["rows"], start) for run in runs for start in ("zero", "zero-filled")
    }
    payload = {
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "seconds": round(time.time() - started, 1),
        "runs": runs,
        "derived": derived,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration.json").write_text(json.dumps(payload, indent=1))
    lines = [
        "# λ calibration: data-term gradients at initialisation (knee PD, 15 coils, R = 4, 24 ACS)",
        "",
        (
            "Command: `python benchmarks/bench_calibration.py`. Gradient norms with respect to the image, median of "
            f"{len(SLICES)} slices; λ derived as described in the script's docstring."
        ),
        "",
        "| size @ start | " + " | ".join(next(iter(derived.values()))) + " |",
        "|---|" + "---:|" * len(next(iter(derived.values()))),
    ]
    lines += [f"| {key} | " + " | ".join(f"{v:.3g}" for v in values.values()) + " |" for key, values in derived.items()]
    lines += ["", "Per slice:", ""]
    for run in runs:
        keys = [k for k in run["rows"][0] if k != "slice"]
        lines += [f"{run['size']}²: | slice | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        lines += ["| " + r["slice"] + " | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |" for r in run["rows"]]
        lines.append("")
    (RESULTS / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
