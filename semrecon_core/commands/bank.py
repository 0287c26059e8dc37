"""``semrecon bank build OUT ...``, ``bank info BANK``, ``bank probe BANK --images SRC``, ``bank calibrate BANK ...``.

``calibrate`` (:mod:`semrecon_core.priors.calibrate`) chooses λ on a site's held-out images (reconstructed as
``recon`` would, at every λ of a grid holding 0) and writes a new bank that recommends it; λ 0 switches the prior off.

``probe`` (:mod:`semrecon_core.priors.probe`) tells a site whether to trust a bank's prior before using it: on
held-out fully sampled images it compares the prior's loss at the truth with its loss at reconstructions, and the
direction of its gradient with the error, next to TV's.

``build`` reads the sources (:mod:`semrecon_core.priors.bank_sources`: ISMRMRD, fastMRI, ``.cfl``, ``.npy``
k-space, or images: ``.npy``, PNG, TIFF, DICOM, ISMRMRD image files, fastMRI RSS; negatives simulated from the
positives unless given), embeds them with the chosen
encoder and saves the bank (:mod:`semrecon_core.priors.bank`); ``info`` prints a bank's metadata and shapes.
Both report the bank's leave-one-out P/N separability (each embedding, or each image's K perturbed embeddings,
held out and scored with Eq. 3 against the rest; the AUC of held-out positives vs negatives), so a user sees
whether the bank can steer a reconstruction at all.

Similarity: image-only banks take the preset's (``--similarity`` pooled, token-pca or centred); image-language
banks store LLM states compared by plain cosine (``vector``) or centred on the bank (``centred``), the
latter by default wherever the preset's image-only similarity is ``centred``. Precision: the image-only
encoder computes in float32, the image-language encoder in bfloat16 on CUDA (float32 on the CPU) unless
``--dtype`` says otherwise; the bank records it, and loading it into a prior whose encoder computes in
another dtype is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semrecon_core.config import ReconConfig
from semrecon_core.pipeline import resolve_device
from semrecon_core.priors.bank import bank_from_features, embed_images, load_bank
from semrecon_core.priors.bank_sources import SIMULATED_NEGATIVES, expand_sources, gather_images
from semrecon_core.priors.calibrate import DEFAULT_LAMS

if TYPE_CHECKING:
    import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``semrecon bank build`` / ``info`` / ``probe`` / ``calibrate``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="embed positive and negative images into a bank")
    build.add_argument("out", type=Path, help="output bank (.safetensors)")
    build.add_argument(
        "--positives",
        nargs="+",
        required=True,
        metavar="SRC",
        help="fully sampled sources: files or folders of k-space (ISMRMRD, fastMRI, .cfl, .npy) or images (.npy, PNG, "
        "TIFF, DICOM, ISMRMRD image files, fastMRI reconstruction_rss)",
    )
    build.add_argument("--negatives", nargs="+", metavar="SRC", help="low-quality sources (default: simulated)")
    build.add_argument(
        "--simulated-negatives",
        type=int,
        default=SIMULATED_NEGATIVES,
        metavar="N",
        help=f"without --negatives: zero-filled versions per positive slice, each at its own R ~ U[3, 8] (default "
        f"{SIMULATED_NEGATIVES}; one per positive left the DINOv2 knee bank at a leave-one-out AUC of 0.64, four 0.94)",
    )
    build.add_argument("--encoder", default="deepseek-community/Janus-Pro-1B", help="HuggingFace id or directory")
    build.add_argument("--family", choices=("janus", "hf-vision"), default="janus", help="encoder family")
    build.add_argument("--kind", choices=("image", "language"), default="image", help="image-only or image-language")
    build.add_argument(
        "--preset",
        choices=("paper", "public-code"),
        default="paper",
        help="defaults for weights, similarity, sigma and instruction",
    )
    build.add_argument("--layers", default="1,13,24", help="vision hidden-state indices (image-only)")
    build.add_argument("--weights", help="level weights (default: the preset's)")
    build.add_argument(
        "--similarity",
        choices=("pooled", "token-pca", "centred", "vector"),
        help="image-only: pooled, token-pca or centred (default: the preset's); image-language: vector or centred "
        "(default: centred where the preset's image-only similarity is centred, else vector)",
    )
    build.add_argument("--pca-dims", default="64,128,256", help="PCA dims per level (token-pca)")
    build.add_argument("--instruction", help="instruction name (paper, public-code, table-s1-N, ...) or text")
    build.add_argument("--sigma", type=float, help="std of the text-embedding perturbations (default: preset)")
    build.add_argument("--perturbations", type=int, default=100, help="K perturbations per image (language)")
    build.add_argument("--seed", type=int, default=0, help="seed for simulated negatives and perturbations")
    build.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    build.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="precision the encoder computes in (default: float32 image-only, bfloat16 image-language; "
        "bfloat16 takes effect on CUDA only)",
    )
    build.add_argument("--allow-download", action="store_true", help="allow fetching the encoder from the hub")
    info = sub.add_parser("info", help="print a bank's metadata and shapes")
    info.add_argument("bank", type=Path)
    probe = sub.add_parser(
        "probe",
        help="before trusting a bank's prior: does its gradient point toward the truth on held-out images?",
        description="Simulate undersampled scans of held-out fully sampled images (true coil maps) and compare the "
        "prior's loss at the truth and at zero-filled, CG-SENSE and CS-TV images, the cosine of its descent "
        "direction with (truth - image) against TV's, and the PSNR gain of one step along each "
        "(semrecon_core/priors/probe.py).",
    )
    probe.add_argument("bank", type=Path, help="the bank (.safetensors)")
    _add_held_out_arguments(probe)
    probe.add_argument("--encoder", help="encoder path or id (default: the one the bank was built with)")
    probe.add_argument(
        "--step", type=float, default=0.002, help="one-step length as a fraction of the image norm (default 0.002)"
    )
    probe.add_argument("--tv-lam", type=float, help="λ of the CS-TV reconstruction (default: the classical 0.003)")
    probe.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    probe.add_argument(
        "--set",
        dest="properties",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the prior, as recon --set (repeatable), e.g. hinge=bank or views=4 to probe a variant",
    )
    probe.add_argument("--out", type=Path, help="write OUT.md and OUT.json (OUT's suffix is replaced)")
    calibrate = sub.add_parser(
        "calibrate",
        help="choose λ on held-out images of the site; write a new bank that recommends it",
        description="Simulate undersampled scans of held-out fully sampled images (as bank probe), reconstruct each "
        "with the settings recon would use (ESPIRiT maps, --backbone, --checkpoint, --set) at every λ of --lams "
        "(0 always included), score HaarPSI (the criterion), PSNR and VIF, and write a copy of BANK to --out whose "
        "metadata recommend the best λ for this preset/backbone with the calibration record "
        "(semrecon_core/priors/calibrate.py). λ 0 wins unless a λ > 0 beats it: the prior is then off.",
    )
    calibrate.add_argument("bank", type=Path, help="the bank (.safetensors); never modified")
    _add_held_out_arguments(calibrate)
    calibrate.add_argument("--out", type=Path, required=True, help="the calibrated bank to write (.safetensors)")
    calibrate.add_argument("--backbone", choices=("unet", "unrolled", "inr"), default="unet", help="default unet")
    calibrate.add_argument("--checkpoint", help="warm-start checkpoint of the backbone (as recon --checkpoint)")
    calibrate.add_argument(
        "--set",
        dest="properties",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any ReconConfig field but lam, as recon --set (repeatable)",
    )
    calibrate.add_argument(
        "--lams", default=",".join(f"{v:g}" for v in DEFAULT_LAMS), help="λ grid, comma-separated (0 is always in it)"
    )


def _add_held_out_arguments(parser: argparse.ArgumentParser) -> None:
    """The held-out images of ``bank probe`` / ``bank calibrate`` and how their scans are simulated."""
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="SRC",
        help="held-out fully sampled sources, as bank build --positives reads them (never the bank's own)",
    )
    parser.add_argument("--acceleration", type=float, default=4.0, help="R of the Gaussian 1-D mask (default 4)")
    parser.add_argument("--coils", type=int, default=15, help="simulated coils (default 15)")
    parser.add_argument("--acs", type=int, help="fully sampled centre lines (default: the simulator's 24)")
    parser.add_argument("--size", type=int, help="resize every image to SIZE x SIZE first (antialiased)")
    parser.add_argument("--seed", type=int, default=0, help="image i is simulated with seed SEED + i")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, found {text!r}") from None


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated numbers, found {text!r}") from None


def _encoder(args: argparse.Namespace, layers: tuple[int, ...], instruction: str, device: torch.device) -> Any:
    precision = {"precision": args.dtype} if args.dtype else {}
    if args.family == "hf-vision":
        if args.kind == "language":
            raise ValueError("--kind language needs --family janus")
        from semrecon_core.encoders.adapter import load_hf_vision

        return load_hf_vision(
            args.encoder, layers=layers, device=device, allow_download=args.allow_download, **precision
        )
    if args.kind == "language":
        from semrecon_core.encoders.janus import JanusLanguageEncoder

        return JanusLanguageEncoder.from_pretrained(
            args.encoder, instruction=instruction, device=device, allow_download=args.allow_download, **precision
        )
    from semrecon_core.encoders.janus import JanusImageEncoder

    return JanusImageEncoder.from_pretrained(
        args.encoder, layers=layers, device=device, allow_download=args.allow_download, **precision
    )


def _similarity(args: argparse.Namespace, preset_similarity: str) -> str:
    """The bank's similarity: ``--similarity`` checked against the bank kind, or the kind's default."""
    allowed = ("vector", "centred") if args.kind == "language" else ("pooled", "token-pca", "centred")
    if args.similarity is None:
        if args.kind == "language":
            return "centred" if preset_similarity == "centred" else "vector"
        return preset_similarity
    if args.similarity not in allowed:
        raise ValueError(
            f"--similarity: expected one of {', '.join(allowed)} for --kind {args.kind}, found {args.similarity!r}"
        )
    return str(args.similarity)


def build(args: argparse.Namespace) -> Path:
    """Build and save a bank as ``args`` say; returns its path."""
    from tqdm import tqdm

    preset = ReconConfig(backbone="unet", preset=args.preset).resolved()
    layers = _ints(args.layers, "layers")
    weights = _floats(args.weights, "weights") if args.weights else tuple(preset.level_weights or ())
    similarity = _similarity(args, preset.similarity)
    sigma = preset.sigma if args.sigma is None else args.sigma
    instruction = args.instruction or args.preset
    if args.kind == "image" and len(weights) != len(layers):
        raise ValueError(f"--weights: expected {len(layers)} weights (one per layer in --layers), found {len(weights)}")
    if args.simulated_negatives < 1 and not args.negatives:
        raise ValueError(
            f"--simulated-negatives: expected at least 1 per positive slice, found {args.simulated_negatives}"
        )
    if args.perturbations < 0 or sigma < 0:
        raise ValueError(
            f"--perturbations / --sigma: expected non-negative values, found {args.perturbations} / {sigma}"
        )
    device = resolve_device(args.device)
    positive_files = expand_sources(args.positives, "positives")
    negative_files = expand_sources(args.negatives, "negatives") if args.negatives else []
    encoder = _encoder(args, layers, instruction, device)
    images = gather_images(
        positive_files, negative_files, np.random.default_rng(args.seed), simulated=args.simulated_negatives
    )
    count = args.perturbations if args.kind == "language" else 0

    def progress(role: str) -> Callable[[Iterable[Any]], Iterable[Any]]:
        return lambda items: tqdm(items, desc=f"embedding {role}", unit="slice", disable=None)

    positives = embed_images(
        encoder,
        images.positives,
        perturbations=count,
        sigma=sigma,
        seed=args.seed,
        progress=progress("positives"),
    )
    negatives = embed_images(
        encoder,
        images.negatives,
        perturbations=count,
        sigma=sigma,
        seed=args.seed + 1,
        progress=progress("negatives"),
    )
    extra = {
        "sources": images.records,
        "sigma": sigma if args.kind == "language" else None,
        "perturbations": count,
        "negatives": (
            "given"
            if negative_files
            else f"simulated: {args.simulated_negatives} per positive slice, zero-filled RSS, gaussian 1-D mask, "
            "R~U[3,8], 24 ACS lines (lines/8 under 192 lines)"
        ),
        "negative_parents": images.negative_parents,
        "preset": args.preset,
        "seed": args.seed,
    }
    bank = bank_from_features(
        positives,
        negatives,
        identity=encoder.identity,
        similarity=similarity,
        weights=weights if args.kind == "image" else (1.0,),
        pca_dims=_ints(args.pca_dims, "pca-dims"),
        extra=extra,
    )
    return bank.save(args.out)


def probe_command_line(args: argparse.Namespace) -> str:
    """The ``semrecon bank probe`` command ``args`` stand for (recorded in the results)."""
    import shlex

    words = ["semrecon", "bank", "probe", str(args.bank), "--images", *map(str, args.images)]
    for option in ("encoder", "acceleration", "coils", "acs", "size", "step", "tv_lam", "seed", "device", "out"):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    for item in args.properties:
        words += ["--set", item]
    return shlex.join(words)


def probe(args: argparse.Namespace) -> int:
    """Probe a bank's prior on held-out images; print the Markdown report, write ``--out`` .md and .json."""
    import json

    from tqdm import tqdm

    from semrecon_core.commands.recon import parse_sets
    from semrecon_core.data.images import StagedOutputs
    from semrecon_core.priors.probe import ProbeSettings, markdown, run_probe

    settings = ProbeSettings(
        acceleration=args.acceleration,
        coils=args.coils,
        acs_width=args.acs,
        size=args.size,
        step_fraction=args.step,
        tv_lam=args.tv_lam,
        seed=args.seed,
    )
    settings.check()
    if not args.bank.is_file():
        raise FileNotFoundError(f"{args.bank}: embedding bank not found")
    report = run_probe(
        args.bank,
        args.images,
        encoder=args.encoder,
        settings=settings,
        device=resolve_device(args.device),
        progress=lambda items: tqdm(items, desc="probing", unit="image", disable=None),
        properties=parse_sets(args.properties),
    )
    command = probe_command_line(args)
    text = markdown(report, command)
    if args.out is not None:  # both files or neither
        with StagedOutputs() as staged:
            for suffix, content in ((".md", text), (".json", json.dumps({"command": command, **report}, indent=2))):
                staged.path(args.out.with_suffix(suffix), mkdir=True).write_text(content + "\n", encoding="utf-8")
    print(text)
    return 0


def calibrate_command_line(args: argparse.Namespace) -> str:
    """The ``semrecon bank calibrate`` command ``args`` stand for (recorded in the calibrated bank)."""
    import shlex

    words = ["semrecon", "bank", "calibrate", str(args.bank), "--images", *map(str, args.images)]
    words += ["--out", str(args.out), "--backbone", args.backbone]
    words += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    for item in args.properties:
        words += ["--set", item]
    words += ["--lams", args.lams]
    for option in ("acceleration", "coils", "acs", "size", "seed"):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option}", f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def calibrate(args: argparse.Namespace) -> int:
    """Calibrate λ on held-out images; write the calibrated bank, print its Markdown summary."""
    from tqdm import tqdm

    from semrecon_core.commands.recon import config_from_args
    from semrecon_core.priors.calibrate import (
        CalibrationSettings,
        markdown,
        run_calibration,
        write_calibrated_bank,
    )

    settings = CalibrationSettings(
        lams=_floats(args.lams, "lams"),
        acceleration=args.acceleration,
        coils=args.coils,
        acs_width=args.acs,
        size=args.size,
        seed=args.seed,
    )
    settings.check()
    if not args.bank.is_file():
        raise FileNotFoundError(f"{args.bank}: embedding bank not found")
    if args.out.resolve() == args.bank.resolve():
        raise ValueError(f"--out {args.out}: is the input bank; the calibration writes a new bank file")
    options = argparse.Namespace(
        **dict.fromkeys(("prior", "preset", "lam", "iterations", "bank", "encoder", "device", "seed")),
        backbone=args.backbone,
        checkpoint=args.checkpoint,
        properties=args.properties,
    )
    config = config_from_args(options)
    record = run_calibration(
        args.bank,
        args.images,
        config,
        settings,
        progress=lambda items: tqdm(items, desc="calibrating (image, λ)", unit="fit", disable=None),
    )
    record["command"] = calibrate_command_line(args)
    path = write_calibrated_bank(args.bank, args.out, record)
    print(markdown(record))
    print(f"wrote {path}: recommended λ {record['lam']:g} for {record['key']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Build a bank (``build``), read one (``info``) or probe its prior (``probe``); print what was found.

    ``build`` and ``info`` print the description and separability; a bank written before the separability was
    recorded gets it measured now.
    """
    if args.action == "probe":
        return probe(args)
    if args.action == "calibrate":
        return calibrate(args)
    path = build(args) if args.action == "build" else args.bank
    bank = load_bank(path)
    measured: dict[str, Any] | None = None
    if not bank.metadata.get("separability"):
        try:
            measured = bank.separability().as_dict()
        except ValueError as exc:
            measured = {"error": str(exc)}
    print(bank.describe(measured))
    return 0
