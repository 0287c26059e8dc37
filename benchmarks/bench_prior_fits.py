"""What each variant of the semantic prior does to a fit: the demo's scan, U-Net, bank and iterations.

The case is ``semrecon demo``'s with its defaults (dipy T1 brain at 160², 8 coils, R = 4, 24 ACS lines; the U-Net
warm start pretrained on the bank's b0 slices, LoRA, started at the CS-TV image, 100 iterations; the DINOv2 bank
of seven b0 slices), taken from a demo output folder (``--demo``, made by ``semrecon demo --out DIR``). The semantic
prior runs at the paper preset's λ for U-Net + semantic (1.6e-3), once per variant: the paper's Eq. 3, the hinge
at the bank's positives (``hinge=bank``), four random views (``views=4``) and both; beside them the same fit with
TV, with no prior, and CS-TV. Scores against the simulation's ground truth: PSNR, SSIM, HaarPSI, VIF and the
near-Nyquist energy (log10 of the power above 0.75 × Nyquist, image scaled to max 1), with the Eq. (3) loss of each
semantic fit's image and of the truth (no hinge, one view; images divided by max |zero-filled| as the engines
see them) and the hinge's level.

Writes ``benchmarks/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAM = 1.6e-3
VARIANTS: dict[str, dict[str, Any]] = {
    "semantic, paper (Eq. 3)": {},
    "semantic, hinge=bank": {"hinge": "bank"},
    "semantic, views=4": {"views": 4},
    "semantic, hinge=bank + views=4": {"hinge": "bank", "views": 4},
}


def eq3(prior: Any, image: Any) -> float:
    """Eq. (3) of an image (already at the engines' scale) under ``prior``'s bank, without hinge or views."""
    import torch

    with torch.no_grad():
        features = prior.encoder.encode(torch.as_tensor(image).to(torch.complex64))
        return float(prior.contrastive.per_slice(features).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a `semrecon demo` output folder (bank, checkpoint)")
    parser.add_argument("--name", default="prior_fits", help="results file name (without suffix)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from semrecon_core import metrics
    from semrecon_core.commands.demo import ACCELERATION, COILS, DINOV2_LAYERS, demo_anatomy
    from semrecon_core.config import ReconConfig
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.encoders.install import find_installed
    from semrecon_core.pipeline import Pipeline

    encoder = find_installed()
    bank, checkpoint = args.demo / "bank.safetensors", args.demo / "unet.safetensors"
    if encoder is None or not bank.is_file() or not checkpoint.is_file():
        parser.error("needs the installed DINOv2 and a demo folder made with it (bank.safetensors, unet.safetensors)")
    kspace = simulate_kspace(
        demo_anatomy(160), coils=COILS, acceleration=ACCELERATION, acs_width=24, mask_kind="gaussian", seed=0
    )
    classical = ReconConfig(backbone="sense", calib_width=24, device="cpu")
    maps = Pipeline(classical).estimate_maps(kspace)
    deep = classical.replace(
        backbone="unet", iterations=100, width=16, depth=4, checkpoint=str(checkpoint), start="cs-tv"
    )
    semantic = deep.replace(prior="semantic", encoder=str(encoder), layers=DINOV2_LAYERS, bank=str(bank), lam=LAM)
    runs = {
        "CS-TV": classical.replace(prior="tv"),
        "U-Net, no prior": deep,
        "U-Net + TV": deep.replace(prior="tv"),
        **{f"U-Net + {name}": semantic.replace(**options) for name, options in VARIANTS.items()},
    }
    truth = kspace.ground_truth
    scale = float(Pipeline(classical.replace(backbone="zero-filled")).run(kspace, maps=maps).image.abs().max())
    rows = []
    for name, config in tqdm(runs.items(), desc="fits", unit="fit"):
        started = time.perf_counter()
        pipeline = Pipeline(config)
        done = pipeline.run(kspace, maps=maps)
        row: dict[str, Any] = {
            "method": name,
            "psnr": metrics.psnr(truth, done.image),
            "ssim": metrics.ssim(truth, done.image),
            "haarpsi": metrics.haarpsi(truth, done.image),
            "vif": metrics.vif(truth, done.image),
            "near_nyquist": metrics.near_nyquist_energy(done.image),
            "seconds": time.perf_counter() - started,
            "label": done.label,
        }
        prior = pipeline.prior if config.prior == "semantic" else None
        if prior is not None:
            row["semantic_loss"] = eq3(prior, done.image / scale)
            row["semantic_loss_truth"] = eq3(prior, truth / scale)
            row["margin"] = prior.margin
        rows.append(row)
    script = shlex.join(["python", "benchmarks/bench_prior_fits.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# What each variant of the semantic prior does to a fit (the demo's case, DINOv2, λ 1.6e-3)",
        "",
        f"Made by `{script}` (the demo folder from `semrecon demo --out DIR` with its defaults). One thread.",
        "",
        "| method | PSNR (dB) | SSIM | HaarPSI | VIF | near-Nyquist | semantic loss (truth) | hinge level | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        loss = f"{row['semantic_loss']:.3f} ({row['semantic_loss_truth']:.3f})" if "semantic_loss" in row else ""
        margin = f"{row['margin']:.3f}" if row.get("margin") is not None else ""
        lines.append(
            f"| {row['method']} | {row['psnr']:.2f} | {row['ssim']:.4f} | {row['haarpsi']:.4f} | {row['vif']:.4f} | "
            f"{row['near_nyquist']:+.3f} | {loss} | {margin} | {row['seconds']:.0f} |"
        )
    lines += ["", "Labels:", "", *(f"- {row['method']}: {row['label']}" for row in rows)]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"script": script, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
