"""``semrecon encoder tiny OUT``: write a tiny random Janus checkpoint for tests and smoke runs.

The checkpoint (:func:`semrecon_core.encoders.tiny.build_tiny_janus`) has Janus's architecture at toy widths
and RANDOM WEIGHTS; encoders built from it say so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semrecon_core.encoders.tiny import build_tiny_janus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``semrecon encoder tiny OUT``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    tiny = sub.add_parser("tiny", help="write a tiny random Janus checkpoint (for tests and smoke runs)")
    tiny.add_argument("out", type=Path, help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing directory")


def run(args: argparse.Namespace) -> int:
    """Build the tiny checkpoint and say where it is."""
    path = build_tiny_janus(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny random Janus checkpoint (RANDOM WEIGHTS) to {path}")
    print(f"use it with: --set encoder={path}")
    return 0
