"""``semrecon recon IN OUT``: reconstruct a raw file and write ISMRMRD images.

IN is any supported k-space file (ISMRMRD raw ``.h5``, fastMRI ``.h5``, ``.npy``, BART ``.cfl``). The scan
goes through :class:`~semrecon_core.pipeline.Pipeline` (ESPIRiT coil maps, engine, images) like every other
path; the method is chosen by ``--backbone``/``--prior`` and any :class:`~semrecon_core.config.ReconConfig`
field through ``--set name=value``. OUT receives float32 magnitude images (``dataset/images``) with headers
copied from the acquisitions; ``--npy``, ``--png``, ``--trace`` and ``--dicom`` (one DICOM MR series,
:func:`semrecon_core.data.dicom.write_dicom_series`) write extra outputs. All outputs are
staged and committed together (all of them or none, mode 0644 less the umask); the input is only read. A
``calib_width`` set on the command line that is wider than the data's calibration region is refused. When the
input carries a ground truth, PSNR and SSIM are printed. ``--explain`` prints every resolved setting with its
source (:func:`semrecon_core.settings.explain`) and then reconstructs when OUT is given, else stops there
without reading IN.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semrecon_core.config import BACKBONES, PRESETS, PRIORS

if TYPE_CHECKING:
    from semrecon_core.solvers.status import SolverStatus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``semrecon recon``."""
    parser.add_argument(
        "input",
        type=Path,
        nargs="?",
        help="raw k-space: ISMRMRD/fastMRI .h5, .npy or BART .cfl (--explain alone: unread)",
    )
    parser.add_argument(
        "output", type=Path, nargs="?", help="ISMRMRD file to write the images to (.h5); --explain alone: none"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print every resolved setting and where it came from (option, bank, preset table, default); "
        "with OUT, then reconstruct, else exit",
    )
    parser.add_argument("--mask", type=Path, help="sampling mask .npy/.cfl for .npy or .cfl k-space")
    parser.add_argument("--backbone", choices=BACKBONES, help="reconstruction backbone (default sense)")
    parser.add_argument("--prior", choices=PRIORS, help="regulariser (default none)")
    parser.add_argument("--preset", choices=PRESETS, help="paper (default) or public-code settings")
    parser.add_argument("--lam", type=float, help="regularisation weight λ")
    parser.add_argument("--iterations", type=int, help="iterations of the solver / optimiser")
    parser.add_argument("--bank", help="embedding bank (.safetensors) for the semantic prior")
    parser.add_argument("--encoder", help="Janus checkpoint: HuggingFace id or local directory")
    parser.add_argument("--checkpoint", help="warm-start checkpoint of the backbone")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument(
        "--set",
        dest="properties",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any ReconConfig field, e.g. --set lr=1e-4 (repeatable)",
    )
    parser.add_argument("--series-index", type=int, default=1, help="image_series_index of the images (default 1)")
    parser.add_argument("--npy", type=Path, metavar="OUT.npy", help="also save the complex image (slices, y, x)")
    parser.add_argument("--png", type=Path, metavar="OUT.png", help="also save the magnitude images side by side")
    parser.add_argument("--trace", type=Path, metavar="TRACE.json", help="save the per-iteration records")
    parser.add_argument(
        "--dicom",
        type=Path,
        metavar="DIR",
        help="also write the images as a DICOM MR series into DIR (new or replaced)",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    """The ``ReconConfig`` the options describe (``--set`` applied last)."""
    from semrecon_core.config import ReconConfig

    properties: dict[str, str] = {}
    for name in (
        "backbone",
        "prior",
        "preset",
        "lam",
        "iterations",
        "bank",
        "encoder",
        "checkpoint",
        "device",
        "seed",
    ):
        value = getattr(args, name)
        if value is not None:
            properties[name] = str(value)
    properties.update(parse_sets(args.properties))
    return ReconConfig.from_properties(properties)


def parse_sets(items: list[str]) -> dict[str, str]:
    """``--set NAME=VALUE`` items as a mapping, later items winning (checked by the configuration they go into)."""
    properties = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        properties[name.strip()] = value
    return properties


def json_safe(value: Any) -> Any:
    """Convert tensors, arrays and NumPy scalars in ``value`` to JSON types (NaN/Inf become ``None``)."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.abs() if value.is_complex() else value
        return json_safe(value.numpy())
    if isinstance(value, np.ndarray):
        return json_safe((np.abs(value) if np.iscomplexobj(value) else value).tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _check_outputs(args: argparse.Namespace) -> None:
    source = args.input.resolve()
    for option, path in (
        ("OUT", args.output),
        ("--npy", args.npy),
        ("--png", args.png),
        ("--trace", args.trace),
    ):
        if path is None:
            continue
        if path.resolve() == source:
            raise ValueError(f"{option} {path}: would overwrite the input file")
        if not path.parent.resolve().is_dir():
            raise FileNotFoundError(f"{option} {path}: directory {path.parent} does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"{option} {path}: is a directory, expected a file to write")
    if args.dicom is not None:
        from semrecon_core.data.dicom import check_dicom_directory

        if args.dicom.resolve() == source:
            raise ValueError(f"--dicom {args.dicom}: would overwrite the input file")
        check_dicom_directory(
            args.dicom, others={"OUT": args.output, "--npy": args.npy, "--png": args.png, "--trace": args.trace}
        )


def _scaled_to(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``image`` magnitude scaled per slice by the least-squares factor onto ``reference``."""
    magnitude = np.abs(image)
    numerator = (magnitude * reference).sum(axis=(-2, -1), keepdims=True)
    denominator = np.maximum((magnitude**2).sum(axis=(-2, -1), keepdims=True), 1e-30)
    return magnitude * numerator / denominator


def _save_png(path: Path, magnitude: np.ndarray) -> None:
    from PIL import Image

    tiles = [plane / max(float(plane.max()), 1e-30) for plane in magnitude]
    montage = np.concatenate(tiles, axis=1)
    Image.fromarray((np.clip(montage, 0, 1) * 255).round().astype(np.uint8)).save(path, format="PNG")


class _Progress:
    """A terminal line on stderr: iteration, ETA and the status' loss terms (at most 4 updates a second)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.monotonic()
        self.shown = 0.0

    def update(self, status: SolverStatus) -> None:
        """Show ``status`` unless the line was updated less than 0.25 s ago."""
        now = time.monotonic()
        if now - self.shown < 0.25:
            return
        self.shown = now
        iteration = status.iteration + 1
        eta = (now - self.start) / iteration * max(self.total - iteration, 0)
        terms = "  ".join(f"{k} {v:.4g}" for k, v in status.values.items())
        sys.stderr.write(f"\r  iteration {iteration}/{self.total}  ETA {eta:5.1f} s  {terms}"[:160].ljust(80))
        sys.stderr.flush()

    def close(self) -> None:
        """End the progress line."""
        sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    """Read, reconstruct through the pipeline, write the images; print metrics when there is ground truth."""
    from semrecon_core.data.images import StagedOutputs, write_images
    from semrecon_core.data.readers import load_kspace
    from semrecon_core.pipeline import Pipeline

    config = config_from_args(args)
    if args.explain:
        from semrecon_core.settings import explain

        print(explain(config), flush=True)
        if args.output is None:
            return 0
    if args.input is None or args.output is None:
        raise ValueError("IN and OUT are required (only --explain runs without them)")
    _check_outputs(args)
    options = {"mask": args.mask} if args.mask is not None else {}
    pipeline = Pipeline(config)  # settings this machine cannot satisfy: MachineError (exit 2) before IN is read
    kspace = load_kspace(args.input, **options)
    if any(item.partition("=")[0].strip().replace("-", "_") == "calib_width" for item in args.properties):
        kspace.check_calib_width(config.calib_width)

    records: list[dict[str, Any]] = []
    progress = _Progress(pipeline.config.iterations or 0) if sys.stderr.isatty() else None

    def callback(status: SolverStatus) -> None:
        if args.trace is not None:
            records.append(status.record())
        if progress is not None:
            progress.update(status)

    done = pipeline.run(kspace, callback=callback if args.trace or progress else None)
    if progress is not None:
        progress.close()
    image = done.cropped()
    # every output is staged first and committed together: a failure leaves none of them behind
    with StagedOutputs() as staged:
        images = done.images(series_index=args.series_index)
        write_images(staged.path(args.output), images, xml_header=kspace.xml_header)
        if args.npy is not None:
            with staged.path(args.npy).open("wb") as handle:
                np.save(handle, image.numpy().astype(np.complex64))
        if args.png is not None:
            _save_png(staged.path(args.png), image.abs().numpy())
        if args.trace is not None:
            payload = {"label": done.label, "config": config.to_properties(), "iterations": records}
            staged.path(args.trace).write_text(json.dumps(json_safe(payload), indent=1))
        if args.dicom is not None:
            from semrecon_core.data.dicom import write_dicom_series

            identity = [] if kspace.xml_header else [str(args.input.resolve())]
            write_dicom_series(args.dicom, images, xml_header=kspace.xml_header, identity=identity, staged=staged)
    print(f"{args.output}: {image.shape[0]} image(s) {image.shape[-2]}×{image.shape[-1]} — {done.label}")
    if kspace.ground_truth is not None:
        from semrecon_core.metrics import psnr, ssim

        truth = kspace.ground_truth.numpy()
        scaled = _scaled_to(truth, image.numpy())
        print(
            f"vs ground truth (least-squares intensity scaling): PSNR {psnr(truth, scaled):.2f} dB, "
            f"SSIM {ssim(truth, scaled):.4f}"
        )
    return 0
