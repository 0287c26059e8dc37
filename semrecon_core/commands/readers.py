r"""``semrecon readers``: a blinded reader study in the browser (:mod:`semrecon_core.readers`).

Example: export the U-Net's TV and semantic reconstructions of a study, serve them to two readers, analyse::

    semrecon readers export study_knee --out kit --backbones unet --priors tv,semantic
    semrecon readers export --method unet/tv=a_tv.h5,b_tv.h5 --method unet/semantic=a_sem.h5,b_sem.h5 --out kit
    semrecon readers serve kit --readers alice,bob          # prints one secret URL per reader
    semrecon readers analyze kit                            # kit/analysis: readers.md, CSV, figure4.png
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``semrecon readers`` and its actions."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    export = actions.add_parser("export", help="write a blinded kit from a study folder or --method groups")
    export.add_argument("study", type=Path, nargs="?", help="a 'semrecon study' output folder")
    export.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME=FILE[,FILE...]",
        help="a method's images, paired by position with the other methods' (ISMRMRD image files, DICOM files or "
        "series folders, .npy); NAME may be GROUP/NAME, e.g. unet/semantic (repeatable)",
    )
    export.add_argument("--out", type=Path, required=True, help="the kit folder to create (must not exist)")
    export.add_argument(
        "--layout",
        default="single",
        choices=("single", "side-by-side"),
        help="one image per screen (default) or every method of a case side by side",
    )
    export.add_argument("--seed", type=int, help="seed of the presentation orders (default random; recorded)")
    export.add_argument(
        "--dicom",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write DICOM (default: when an input was DICOM)",
    )
    study = export.add_argument_group("study selection")
    study.add_argument("--backbones", help="comma-separated backbones to include (default all of the study)")
    study.add_argument("--priors", help="comma-separated priors to include (default all of the study)")
    study.add_argument("--presets", help="comma-separated presets to include (default all)")
    study.add_argument("--accelerations", help="comma-separated R to include (default all)")

    serve = actions.add_parser("serve", help="serve the scoring page; one secret URL per reader")
    serve.add_argument("kit", type=Path, help="a kit written by 'semrecon readers export'")
    serve.add_argument("--readers", required=True, metavar="NAME[,NAME...]", help="the readers' names")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8750, help="port (default 8750; 0: any free port)")

    analyze = actions.add_parser("analyze", help="mean ± sd, Wilcoxon, weighted κ and the Figure-4 plot")
    analyze.add_argument("kit", type=Path, help="a kit with scores")
    analyze.add_argument("--out", type=Path, help="output folder (default KIT/analysis)")
    analyze.add_argument("--no-figure", action="store_true", help="tables only")


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    """Run ``semrecon readers ACTION``."""
    if args.action == "export":
        return _export(args)
    if args.action == "serve":
        from semrecon_core.readers.app import parse_readers, serve

        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port}: expected 0–65535")
        serve(
            args.kit,
            parse_readers(args.readers),
            host=args.host,
            port=args.port,
            announce=lambda line: print(line, flush=True),
        )
        return 0
    from semrecon_core.readers.analysis import analyse, write_analysis

    analysis = analyse(args.kit)
    written = write_analysis(analysis, args.out or args.kit / "analysis", plot=not args.no_figure)
    print(f"{'finished' if analysis.finished else 'UNFINISHED'} reading: {analysis.progress_line()}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from semrecon_core.readers.kit import parse_method, pictures_from_methods, pictures_from_study, write_kit

    if (args.study is None) == (not args.method):
        raise ValueError("export: give a study folder or --method groups (one of the two)")
    if args.study is not None:
        if not args.study.is_dir():
            raise ValueError(f"{args.study}: no such study folder")
        try:
            accelerations = [float(r) for r in _list(args.accelerations) or []] or None
        except ValueError:
            raise ValueError(f"--accelerations {args.accelerations!r}: expected comma-separated numbers") from None
        pictures = pictures_from_study(
            args.study,
            backbones=_list(args.backbones),
            priors=_list(args.priors),
            presets=_list(args.presets),
            accelerations=accelerations,
        )
        source = f"study {args.study}"
    else:
        if any(v is not None for v in (args.backbones, args.priors, args.presets, args.accelerations)):
            raise ValueError("--backbones/--priors/--presets/--accelerations select from a study folder, not --method")
        methods = [parse_method(text) for text in args.method]
        pictures = pictures_from_methods(methods)
        source = "; ".join(f"{name}={','.join(map(str, files))}" for name, files in methods)
    summary = write_kit(pictures, args.out, layout=args.layout, seed=args.seed, dicom=args.dicom, source=source)
    print(
        f"wrote {summary.folder}: {summary.images} images ({len(summary.methods)} methods × {summary.cases} cases), "
        f"{summary.screens} screens, seed {summary.seed}{', DICOM' if summary.dicom else ''}; "
        f"the key is {summary.folder / 'key.json'} (keep it from the readers)"
    )
    for note in summary.notes:
        print(f"note: {note}")
    return 0
