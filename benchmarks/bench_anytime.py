"""Anytime fitting of the shipped semantic chain: is every image the fit could send at least as good as the preview?

The chain (``config/semrecon_semantic.xml``) starts the U-Net's fit at the CG-SENSE preview (``start=preview``);
what it sends when the time budget stops it is the iterate at that point. This script fits one **tuning slice**
(``pd_10``, never one of ``bench_online.py``'s test slices, never pretrained on) with the chain's settings for a grid
of semantic weights λ, and scores every iterate the loop hands over, as it is and after a soft data-consistency step
``argmin ‖Ax − y‖² + w‖x − f‖²`` (the chain's ``final_dc``) for each weight ``w``. The chain's bank (DINOv2 layers
1/7/12, centred: ``bench_online.py``'s) gets the full λ grid; the same bank images embedded with single layers or
other similarities get a shorter one, so that a verdict is not an artefact of one layer choice.

Per (bank, λ, w) it reports the worst and the last PSNR of the iterates relative to the preview, and the largest λ
whose iterates all stay at or above it (within ``--tolerance-db``): the λ an online chain could ship with this
encoder. The checkpoint is ``bench_online.py``'s (``semrecon pretrain`` on the PD pretraining slices).

Writes ``benchmarks/results/anytime.json`` and ``anytime.md``. Run:
``python benchmarks/bench_anytime.py --work /tmp/bench_online_work`` (reuses a checkpoint and banks found there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_online import (  # the script's directory is on the path when run as a script
    DATA,
    DINOV2,
    RESULTS,
    TUNING_SLICE,
    _resize,
    chain_settings,
    make_bank,
    make_checkpoint,
)


@dataclass(frozen=True)
class Variant:
    """A bank of the prior: DINOv2 hidden states ``layers`` compared by ``similarity`` (``None``: the preset's)."""

    layers: str
    similarity: str | None = None

    @property
    def label(self) -> str:
        """How the tables name it."""
        similarity = self.similarity or "centred (the preset's)"
        chain = " — the chain's" if self == CHAIN else ""
        return f"layers {self.layers.replace(',', '/')}, {similarity}{chain}"

    def overrides(self) -> dict[str, str]:
        """Gadget properties selecting this bank's layers, similarity and level weights."""
        out = {"layers": self.layers}
        if self.similarity:
            out["similarity"] = self.similarity
        if "," not in self.layers:
            out["level_weights"] = "1"
        return out


CHAIN = Variant("1,7,12")
OTHER_VARIANTS = "1:centred;7:centred;12:centred;1,7,12:pooled;1,7,12:token-pca"


def _bank(work: Path, size: int, variant: Variant) -> Path:
    """The variant's bank in ``work``, built there (as ``bench_online.py`` builds its bank) when absent."""
    weights = "1" if "," not in variant.layers else None
    return make_bank(work, size, layers=variant.layers, similarity=variant.similarity, weights=weights, reuse=True)[0]


def sweep(
    work: Path,
    *,
    size: int,
    plan: list[tuple[Variant, list[float]]],
    weights: list[float],
    iterations: int,
    epochs: int,
) -> dict[str, Any]:
    """Fit the tuning slice once per (bank, λ) of ``plan``; score every iterate, raw and after each DC step."""
    from semrecon_core.config import preview_config
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.engines.fitting import final_data_consistency
    from semrecon_core.metrics import psnr
    from semrecon_core.physics.sense import SenseOp
    from semrecon_core.pipeline import Pipeline, prepare_problem

    checkpoint = work / "unet.safetensors"
    if not checkpoint.is_file():
        checkpoint, _ = make_checkpoint(work, size, 16, 4, epochs)
    paths = {"checkpoint": str(checkpoint), "encoder": str(DINOV2), "device": "cpu"}
    image = _resize(np.load(DATA / "knee_fastmri_rss" / f"{TUNING_SLICE}.npy"), size)[None]
    kspace = simulate_kspace(image, coils=15, acceleration=4, acs_width=24, mask_kind="gaussian", seed=0)
    assert kspace.ground_truth is not None
    truth = kspace.ground_truth.abs().numpy()
    base = chain_settings({**paths, "bank": "", "prior": "none"}).config
    maps = Pipeline(base).estimate_maps(kspace)
    problem = prepare_problem(kspace, maps, torch.device("cpu"))
    op = SenseOp(problem.maps, problem.mask)
    support = maps.abs().square().sum(dim=1) > 0
    preview = psnr(truth, Pipeline(preview_config(base)).run(kspace, maps=maps).cropped().abs().numpy())

    def score(x: torch.Tensor) -> float:
        return psnr(truth, (x * support * problem.scale).abs().numpy())

    runs = []
    for variant, lams in plan:
        settings = chain_settings({**paths, "bank": str(_bank(work, size, variant)), **variant.overrides()})
        for lam in lams:
            curves: dict[str, list[float]] = {"none": [], **{f"{w:g}": [] for w in weights}}
            steps: list[int] = []

            def record(status: Any, curves: dict[str, list[float]] = curves, steps: list[int] = steps) -> None:
                if status.solution is None:
                    return
                steps.append(status.iteration + 1)
                x = status.solution.detach().to(torch.complex64)
                curves["none"].append(score(x))
                for w in weights:
                    curves[f"{w:g}"].append(score(final_data_consistency(x, problem.kspace, op, weight=w)))

            config = settings.config.replace(lam=lam, iterations=iterations, time_budget_s=0.0)
            started = time.perf_counter()
            Pipeline(config).run(kspace, maps=maps, callback=record)
            seconds = time.perf_counter() - started
            last = curves["none"][-1] - preview
            print(f"{variant.label}, λ {lam:g}: {seconds:.0f} s, last iterate {last:+.2f} dB", flush=True)
            runs.append({"bank": variant.label, "lam": lam, "seconds": seconds, "iterations": steps, "curves": curves})
    return {"preview_psnr": preview, "runs": runs, "checkpoint": str(checkpoint)}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per (λ, data-consistency weight): worst and last iterate against the preview; the largest λ that keeps up.

    An iterate is below the preview when it is more than ``result["tolerance_db"]`` dB below it.
    """
    preview = result["preview_psnr"]
    rows = []
    for run in result["runs"]:
        for weight, curve in run["curves"].items():
            gaps = [value - preview for value in curve]
            below = [it for it, gap in zip(run["iterations"], gaps, strict=True) if gap < -result["tolerance_db"]]
            rows.append(
                {
                    "bank": run["bank"],
                    "lam": run["lam"],
                    "final_dc": weight,
                    "worst_db": min(gaps),
                    "last_db": gaps[-1],
                    "iterates": len(gaps),
                    "below": len(below),
                    "first_below": below[0] if below else None,
                }
            )
    keeping = [row for row in rows if row["lam"] > 0 and row["below"] == 0]
    best = max(keeping, key=lambda row: row["lam"]) if keeping else None
    return {"rows": rows, "largest_lam_at_or_above_preview": best}


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown."""
    summary = result["summary"]
    best = summary["largest_lam_at_or_above_preview"]
    verdict = (
        f"Largest λ > 0 whose every iterate stays at or above the preview: **λ {best['lam']:g} with final_dc "
        f"{best['final_dc']}, bank {best['bank']}** (last iterate {best['last_db']:+.2f} dB)."
        if best
        else "**No λ > 0 keeps every iterate at or above the preview** (within the tolerance), with any of these "
        "banks, with or without the data-consistency step: with this encoder the semantic prior moves the image "
        "away from the ground truth from its first steps, and the step on what is sent gives back part of the "
        "loss, not all of it."
    )
    lines = [
        "# Anytime fitting: every iterate of the shipped semantic chain against its preview (tuning slice)",
        "",
        (
            f"Written by `{result['command']}` on {result['machine']} ({result['threads']} thread(s); torch "
            f"{result['torch']}). Other jobs may share the machine."
        ),
        "",
        (
            f"- Slice: fastMRI PD knee `{TUNING_SLICE}` at {result['size']}² (the tuning slice: not among "
            "`bench_online.py`'s test slices, not pretrained on), 15 simulated birdcage coils, R = 4, the paper "
            "code's 1-D Gaussian mask, 24 ACS lines, seed 0."
        ),
        (
            "- Chain: `config/semrecon_semantic.xml` (U-Net warm start + LoRA 4, `start=preview`, preset paper) "
            f"with the checkpoint of `bench_online.py`, {result['iterations']} iterations, no time budget. Banks: the "
            "chain's (`bench_online.py`'s: DINOv2 layers 1/7/12, centred) over the λ grid, and the same images "
            "embedded with other layers (level weight 1) or similarities over a shorter grid."
        ),
        (
            f"- Preview (CG-SENSE, the chain's): **{result['preview_psnr']:.2f} dB**. Every iterate the loop hands "
            "over (every second iteration without a time budget) is scored as it is (final_dc none) and after the "
            "soft data-consistency step with each weight. An iterate counts as below the preview when it is more "
            f"than {result['tolerance_db']:g} dB below (the fit with the data term alone moves by about that much)."
        ),
        "",
        verdict,
        "",
        "| bank | λ | final_dc | worst iterate − preview (dB) | last iterate − preview (dB) | iterates below |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        below = f"{row['below']} of {row['iterates']}"
        if row["first_below"]:
            below += f" (first at {row['first_below']})"
        lines.append(
            f"| {row['bank']} | {row['lam']:g} | {row['final_dc']} | {row['worst_db']:+.2f} | {row['last_db']:+.2f} "
            f"| {below} |"
        )
    lines += [
        "",
        "λ 0 is the fit with the data term alone (the prior's λ set to zero): the reference for how far the "
        "network moves without the prior. Seconds per fit: "
        + ", ".join(f"{run['seconds']:.0f} s" for run in result["runs"])
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    """Run the sweep (see the module docstring) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lams", default="0,3e-5,1e-4,4e-4,1.6e-3", help="semantic weights λ (comma-separated)")
    parser.add_argument(
        "--variants", default=OTHER_VARIANTS, help="other banks, LAYERS:SIMILARITY;... ('' for the chain's only)"
    )
    parser.add_argument("--variant-lams", default="4e-4,1.6e-3", help="λ of the other banks")
    parser.add_argument("--final-dc", default="0.5,2,8", help="data-consistency weights scored on each iterate")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pretrain-epochs", type=int, default=100)
    parser.add_argument("--tolerance-db", type=float, default=0.05, help="how far below the preview still counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, required=True, help="checkpoint and bank (reused when present)")
    args = parser.parse_args()
    if not DATA.is_dir() or not DINOV2.is_dir():
        parser.error(f"needs {DATA} and the DINOv2 encoder at {DINOV2} (semrecon encoder install)")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    plan = [(CHAIN, [float(v) for v in args.lams.split(",")])]
    variant_lams = [float(v) for v in args.variant_lams.split(",")]
    for item in filter(None, args.variants.split(";")):
        layers, _, similarity = item.partition(":")
        plan.append((Variant(layers, similarity or None), variant_lams))
    weights = [float(v) for v in args.final_dc.split(",")]
    result = sweep(
        args.work, size=args.size, plan=plan, weights=weights, iterations=args.iterations, epochs=args.pretrain_epochs
    )
    result |= {
        "command": "python3 benchmarks/bench_anytime.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "threads": args.threads,
        "torch": torch.__version__,
        "size": args.size,
        "iterations": args.iterations,
        "tolerance_db": args.tolerance_db,
    }
    result["summary"] = summarise(result)
    (RESULTS / "anytime.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "anytime.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
