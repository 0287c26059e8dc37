"""``semrecon recon IN OUT``: reconstruct a raw file and write ISMRMRD images.

IN is any supported k-space file (ISMRMRD raw ``.h5``, fastMRI ``.h5``, ``.npy``, BART ``.cfl``). Coil maps
come from ESPIRiT on the calibration region; the method is chosen by ``--backbone``/``--prior`` and
any :class:`~semrecon_core.config.ReconConfig` field through ``--set name=value``. OUT receives float32
magnitude images (``dataset/images``) with headers copied from the acquisitions; ``--npy``, ``--png``
and ``--trace`` write extra outputs. All outputs are written atomically; the input is only read.
When the input carries a ground truth, PSNR and SSIM are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from semrecon_core.config import BACKBONES, PRESETS, PRIORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``semrecon recon``."""
    parser.add_argument("input", type=Path, help="raw k-space: ISMRMRD/fastMRI .h5, .npy or BART .cfl")
    parser.add_argument("output", type=Path, help="ISMRMRD file to write the images to (.h5)")
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
    for item in args.properties:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        properties[name.strip()] = value
    return ReconConfig.from_properties(properties)


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


def _check_coverage(kspace: Any, maps: Any) -> None:
    """Refuse coil maps that vanish over most of the object (ESPIRiT failed): never a silent wrong image."""
    from semrecon_core.physics.fft import ifft2c

    signal = ifft2c(kspace.data).abs().pow(2).sum(dim=1).sqrt()
    covered = maps.abs().pow(2).sum(dim=1).sqrt() > 0.5
    for index in range(signal.shape[0]):
        plane = signal[index]
        inside = plane > 0.2 * plane.max()
        fraction = float(covered[index][inside].float().mean()) if inside.any() else 1.0
        if fraction < 0.3:
            region = tuple(kspace.calibration.shape[-2:])
            raise ValueError(
                f"{kspace.source}: ESPIRiT coil maps cover only {fraction:.0%} of the object in slice "
                f"{index} (calibration region {region}); more calibration lines are needed"
            )


def _scaled_to(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``image`` magnitude scaled per slice by the least-squares factor onto ``reference``."""
    magnitude = np.abs(image)
    numerator = (magnitude * reference).sum(axis=(-2, -1), keepdims=True)
    denominator = np.maximum((magnitude**2).sum(axis=(-2, -1), keepdims=True), 1e-30)
    return magnitude * numerator / denominator


def _save_png(path: Path, magnitude: np.ndarray) -> None:
    from PIL import Image

    from semrecon_core.data.images import atomic_path

    tiles = [plane / max(float(plane.max()), 1e-30) for plane in magnitude]
    montage = np.concatenate(tiles, axis=1)
    with atomic_path(path) as temp:
        Image.fromarray((np.clip(montage, 0, 1) * 255).round().astype(np.uint8)).save(temp, format="PNG")


class _Progress:
    """A terminal line on stderr: iteration, ETA and the status' loss terms (at most 4 updates a second)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.monotonic()
        self.shown = 0.0

    def update(self, status: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.shown < 0.25:
            return
        self.shown = now
        iteration = int(status.get("iteration", 0)) + 1
        eta = (now - self.start) / iteration * max(self.total - iteration, 0)
        terms = "  ".join(f"{k} {v:.4g}" for k, v in status.items() if k != "iteration" and isinstance(v, (int, float)))
        sys.stderr.write(f"\r  iteration {iteration}/{self.total}  ETA {eta:5.1f} s  {terms}"[:160].ljust(80))
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    """Read, estimate coil maps, reconstruct, write the images; print metrics when there is ground truth."""
    import torch

    from semrecon_core.data.images import atomic_path, crop_to_recon, to_ismrmrd_images, write_images
    from semrecon_core.data.readers import load_kspace
    from semrecon_core.physics.coils import espirit_maps
    from semrecon_core.recon import reconstruct, resolve_device

    config = config_from_args(args)
    _check_outputs(args)
    options = {"mask": args.mask} if args.mask is not None else {}
    kspace = load_kspace(args.input, **options)
    device = resolve_device(config.device)
    width = min(config.calib_width, *kspace.calibration.shape[-2:])
    maps = espirit_maps(kspace, calib_width=width, device=device)
    _check_coverage(kspace, maps)

    records: list[dict[str, Any]] = []
    progress = _Progress(config.resolved().iterations or 0) if sys.stderr.isatty() else None

    def callback(status: dict[str, Any]) -> None:
        if args.trace is not None:
            records.append(status)
        if progress is not None:
            progress.update(status)

    result = reconstruct(kspace, maps, config, callback=callback if args.trace or progress else None)
    if progress is not None:
        progress.close()
    image = crop_to_recon(result.image, kspace)
    meta = {
        "GADGETRON_ImageComment": result.label,
        "GADGETRON_SeqDescription": f"semrecon_{config.backbone}_{config.prior}",
        "GADGETRON_ImageProcessingHistory": "semrecon",
    }
    write_images(
        args.output,
        to_ismrmrd_images(result.image, kspace, series_index=args.series_index, meta=meta),
        xml_header=kspace.xml_header,
    )
    print(f"{args.output}: {image.shape[0]} image(s) {image.shape[-2]}×{image.shape[-1]} — {result.label}")
    if args.npy is not None:
        with atomic_path(args.npy) as temp, open(temp, "wb") as handle:
            np.save(handle, image.numpy().astype(np.complex64))
    if args.png is not None:
        _save_png(args.png, image.abs().numpy())
    if args.trace is not None:
        payload = {"label": result.label, "config": config.to_properties(), "iterations": records}
        with atomic_path(args.trace) as temp:
            temp.write_text(json.dumps(json_safe(payload), indent=1))
    if kspace.ground_truth is not None:
        from semrecon_core.metrics import psnr, ssim

        truth = kspace.ground_truth.numpy()
        scaled = _scaled_to(truth, image.numpy() if isinstance(image, torch.Tensor) else image)
        print(
            f"vs ground truth (least-squares intensity scaling): PSNR {psnr(truth, scaled):.2f} dB, "
            f"SSIM {ssim(truth, scaled):.4f}"
        )
    return 0
