r"""``semrecon study``: the paper's Table-1 protocol over a set of cases (:mod:`semrecon_core.study`).

Example (bank from PDFS knee slices, PD slices reconstructed — the paper's cross-contrast experiment — λ
chosen on a separate PD slice, two Ray workers)::

    semrecon study knee/pd_01.npy knee/pd_02.npy knee/pd_03.npy --out study_knee \
        --bank pdfs_bank.safetensors --accelerations 4,6 --backbones sense,unet,unrolled,inr \
        --iterations 300 --width 16 --depth 4 --tune-on knee/pd_00.npy --workers 2

Rerunning the same command reuses every finished (case, setting) in ``--out`` and recomputes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from semrecon_core.config import BACKBONES, PRESETS, PRIORS
from semrecon_core.data.simulate import FOV_MARGIN


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``semrecon study``."""
    parser.add_argument(
        "cases",
        nargs="+",
        metavar="CASE",
        help="case files or folders: .npy magnitude images (simulated coils), fastMRI multicoil .h5, ISMRMRD raw",
    )
    parser.add_argument("--out", type=Path, required=True, help="study folder (created; reruns resume in it)")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--backbones", default="sense,unet,unrolled,inr", help=f"of {', '.join(BACKBONES)}")
    grid.add_argument("--priors", default=None, help=f"of {', '.join(PRIORS)} (default: all with --bank, else none,tv)")
    grid.add_argument("--accelerations", default="4", help="comma-separated R values (default 4)")
    grid.add_argument("--presets", default="paper", help=f"of {', '.join(PRESETS)} (default paper)")
    grid.add_argument(
        "--bank",
        action="append",
        default=[],
        metavar="[PRESET=]PATH",
        help="embedding bank of the semantic prior (any contrast: the cases are given separately); "
        "PRESET=PATH gives a preset its own bank",
    )
    grid.add_argument("--encoder", help="encoder of the bank (HF id or directory; default: the one the bank records)")
    grid.add_argument(
        "--lam",
        action="append",
        default=[],
        metavar="[BACKBONE:]PRIOR=VALUE",
        help="λ of a prior, or of a prior with one backbone (repeatable; default: the preset's)",
    )
    grid.add_argument(
        "--set",
        dest="properties",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other ReconConfig field for every setting, e.g. --set lr=1e-4 (repeatable)",
    )
    grid.add_argument(
        "--iterations",
        metavar="N[,BACKBONE=N]",
        help="iterations of the deep backbones, for all and/or per backbone, e.g. 300,unrolled=60 "
        "(classical solvers keep theirs)",
    )
    grid.add_argument(
        "--width", metavar="N[,BACKBONE=N]", help="deep network width, e.g. 16,inr=128 (default the paper's)"
    )
    grid.add_argument(
        "--depth", metavar="N[,BACKBONE=N]", help="deep network depth, e.g. 4,inr=5 (default the paper's)"
    )
    grid.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    grid.add_argument("--seed", type=int, default=0, help="seeds the scans and every reconstruction (default 0)")
    scans = parser.add_argument_group("scans")
    scans.add_argument("--coils", type=int, default=15, help="simulated coils of magnitude-image cases (default 15)")
    scans.add_argument("--acs", type=int, default=24, help="calibration (ACS) lines of the masks (default 24)")
    scans.add_argument(
        "--mask", default="gaussian", choices=("gaussian", "equispaced", "random", "poisson"), help="mask kind"
    )
    scans.add_argument("--noise", type=float, default=0.005, help="k-space noise of simulated scans (default 0.005)")
    scans.add_argument(
        "--fov-margin",
        type=float,
        default=FOV_MARGIN,
        help=f"zeros around simulated images, a fraction of their side on each side (default {FOV_MARGIN:g})",
    )
    tuning = parser.add_argument_group("λ tuning")
    tuning.add_argument("--tune-on", metavar="CASE", help="choose λ of TV and semantic on this case (not a test case)")
    tuning.add_argument("--tune-grid", default="0.25,0.5,1,2,4", help="factors of the default λ tried (default 0.25–4)")
    tuning.add_argument("--tune-metric", default="psnr", choices=("psnr", "ssim"), help="what λ maximises")
    tuning.add_argument("--tune-priors", default="tv,semantic", help="priors whose λ is tuned (default tv,semantic)")
    tuning.add_argument(
        "--tune-accelerations",
        metavar="R[,R]",
        help="tune at these R only (default every R); other R take the nearest tuned R's λ",
    )
    scoring = parser.add_argument_group("scores and figures")
    scoring.add_argument(
        "--perceptual",
        default="auto",
        metavar="auto|none|MODEL",
        help="network of the embedding distance: auto = the bank's encoder, or an image model (HF id or directory)",
    )
    scoring.add_argument("--lpips-weights", metavar="DIR", help="torch hub directory holding the AlexNet weights")
    scoring.add_argument("--trajectory-case", metavar="NAME", help="case whose optimisation trajectory is drawn")
    scoring.add_argument("--no-figures", action="store_true", help="write tables only")
    run = parser.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=1, help="parallel workers; N > 1 runs on Ray (extra 'study')")
    run.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    run.add_argument("--gpus-per-worker", type=float, help="GPUs each worker asks Ray for (default 1 on CUDA, else 0)")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per reconstruction (default 1); the same seed gives the same numbers at the same count",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated numbers, found {text!r}") from None
    if not values:
        raise ValueError(f"{option}: expected comma-separated numbers, found {text!r}")
    return values


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~semrecon_core.study.runner.StudyOptions` the command line describes (checked)."""
    from semrecon_core.study.cases import ScanOptions
    from semrecon_core.study.grid import (
        parse_accelerations,
        parse_banks,
        parse_lams,
        parse_list,
        parse_per_backbone,
    )
    from semrecon_core.study.runner import StudyOptions

    presets = parse_list(args.presets, PRESETS, "--presets")
    properties: dict[str, str] = {}
    for item in args.properties:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        properties[name.strip()] = value
    common: dict[str, int] = {}
    per_backbone: dict[str, dict[str, int]] = {}
    for name in ("iterations", "width", "depth"):
        text = getattr(args, name)
        if text is None:
            continue
        value, specific = parse_per_backbone(str(text), f"--{name}")
        if value is not None:
            common[name] = value
        for backbone, number in specific.items():
            per_backbone.setdefault(backbone, {})[name] = number
    if args.noise < 0:
        raise ValueError(f"--noise: expected >= 0, found {args.noise}")
    return StudyOptions(
        cases=tuple(args.cases),
        out=args.out,
        backbones=parse_list(args.backbones, BACKBONES, "--backbones"),
        priors=None if args.priors is None else parse_list(args.priors, PRIORS, "--priors"),
        presets=presets,
        accelerations=parse_accelerations(args.accelerations),
        banks=parse_banks(args.bank, presets),
        encoder=args.encoder,
        properties=properties,
        lams=parse_lams(args.lam),
        iterations=common.get("iterations"),
        width=common.get("width"),
        depth=common.get("depth"),
        per_backbone=per_backbone,
        seed=args.seed,
        scan=ScanOptions(
            coils=args.coils,
            acs=args.acs,
            mask=args.mask,
            noise=args.noise,
            fov_margin=args.fov_margin,
            seed=args.seed,
        ),
        tune_on=args.tune_on,
        tune_grid=_numbers(args.tune_grid, "--tune-grid"),
        tune_metric=args.tune_metric,
        tune_priors=parse_list(args.tune_priors, ("tv", "semantic"), "--tune-priors"),
        tune_accelerations=None
        if args.tune_accelerations is None
        else parse_accelerations(args.tune_accelerations, "--tune-accelerations"),
        workers=args.workers,
        address=args.address,
        gpus_per_worker=args.gpus_per_worker,
        threads=args.threads,
        device=args.device,
        perceptual=args.perceptual,
        lpips_weights=args.lpips_weights,
        trajectory_case=args.trajectory_case,
        figures=not args.no_figures,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run or resume the study and say where its tables and figures are."""
    from semrecon_core.study.runner import run_study

    outcome = run_study(options_from_args(args))
    out = outcome.out
    print(
        f"semrecon study: {outcome.computed} item(s) computed, {outcome.reused} reused from {out}/items",
        file=sys.stderr,
    )
    if outcome.tuning is not None:
        print(f"λ chosen on {outcome.tuning['case']}: {out}/tuning.json", file=sys.stderr)
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    figures = f"; figures: {out}/figures/" if not args.no_figures else ""
    print(f"tables: {out}/table.md, {out}/results.csv, {out}/results.json{figures}", file=sys.stderr)
    return 0
