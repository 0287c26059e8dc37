"""``semrecon simulate OUT.h5``: write a simulated multicoil ISMRMRD raw file with its ground truth.

The built-in Shepp–Logan anatomy or a magnitude ``.npy`` image becomes a scan as a scanner would write it
(:func:`semrecon_core.data.simulate.write_ismrmrd_raw`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from semrecon_core.data.simulate import FOV_MARGIN, LINE_MASK_KINDS, write_ismrmrd_raw


def _matrix(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or NYxNX, found {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or NYxNX with positive sizes, found {text!r}")
    return values[0], values[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``semrecon simulate``."""
    parser.add_argument("output", type=Path, help="ISMRMRD raw file to write (.h5)")
    parser.add_argument(
        "--matrix",
        type=_matrix,
        help="N or NYxNX (default 128, or the --image size; an --image is resized to it, then --fov-margin is added)",
    )
    parser.add_argument(
        "--fov-margin",
        type=float,
        default=FOV_MARGIN,
        help=f"zeros around an --image on each side, as a fraction of its side, so that the object lies inside the "
        f"field of view as on a real scan (default {FOV_MARGIN:g}; 0 puts a cropped image's anatomy on the edges)",
    )
    parser.add_argument("--coils", type=int, default=8, help="receive coils (default 8)")
    parser.add_argument("--slices", type=int, default=1, help="slices (default 1)")
    parser.add_argument("--acceleration", type=float, default=4.0, help="R (default 4)")
    parser.add_argument("--acs", type=int, default=24, help="fully sampled centre lines (default 24)")
    parser.add_argument("--mask", choices=LINE_MASK_KINDS, default="gaussian", help="line mask (default gaussian)")
    parser.add_argument(
        "--calibration",
        choices=("embedded", "separate"),
        default="embedded",
        help="ACS lines embedded in the imaging data or acquired separately (default embedded)",
    )
    parser.add_argument(
        "--noise-scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write a noise scan for prewhitening (default on)",
    )
    parser.add_argument("--oversampling", type=int, choices=(1, 2), default=2, help="readout oversampling (default 2)")
    parser.add_argument("--noise", type=float, default=0.005, help="k-space noise std relative to image max")
    parser.add_argument(
        "--image", type=Path, help="magnitude image .npy (y, x) or (slices, y, x) instead of the phantom"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    """Write the simulated scan and print a one-line summary."""
    image = None
    if args.image is not None:
        try:
            image = np.load(args.image, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{args.image}: cannot read the image .npy: {exc}") from None
        if image.ndim not in (2, 3):
            raise ValueError(f"{args.image}: expected a magnitude image (y, x) or (slices, y, x), found {image.shape}")
        if args.matrix is not None and tuple(image.shape[-2:]) != args.matrix:
            from skimage.transform import resize

            image = resize(np.abs(image), image.shape[:-2] + tuple(args.matrix), anti_aliasing=True)
    if args.slices < 1:
        raise ValueError(f"--slices: expected at least 1, found {args.slices}")
    path = write_ismrmrd_raw(
        args.output,
        image,
        matrix=args.matrix or (128, 128),
        slices=args.slices,
        coils=args.coils,
        acceleration=args.acceleration,
        acs_width=args.acs,
        mask_kind=args.mask,
        noise_std=args.noise,
        noise_scan=args.noise_scan,
        oversampling=args.oversampling,
        fov_margin=args.fov_margin,
        calibration=args.calibration,
        seed=args.seed,
    )
    print(f"wrote {path}")
    return 0
