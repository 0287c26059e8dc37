"""``semrecon pretrain``: warm-start a U-Net or unrolled network on auxiliary magnitude images.

Each image becomes a simulated multicoil scan (``semrecon_core.data.simulate.simulate_kspace``: birdcage
coils, smooth phase, noise, a 1-D undersampling mask) and its fully sampled counterpart from the same seed;
coil maps come from ESPIRiT on the calibration region. The network learns to map the zero-filled image
(scaled to max 1) to the fully sampled coil-combined image (L1 on real and imaginary parts). The
checkpoint (safetensors + JSON metadata: architecture, data files with SHA-256, masks, epochs, losses) is
what ``config.checkpoint`` points the ``unet`` / ``unrolled`` engines at for LoRA fine-tuning.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".npy",)


@dataclass
class TrainingPair:
    """One simulated training example (tensors are complex64 ``(1, ...)``, scaled so max |zero-filled| = 1)."""

    zero_filled: Any
    target: Any
    kspace: Any
    mask: Any
    maps: Any
    source: str


def find_images(paths: list[str]) -> list[Path]:
    """Expand directories into their ``.npy`` files (sorted); check every file exists."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"--images {path}: directory holds no .npy images")
            found.extend(files)
        elif path.is_file():
            if path.suffix not in IMAGE_SUFFIXES:
                raise ValueError(f"--images {path}: expected a .npy magnitude image, found suffix {path.suffix!r}")
            found.append(path)
        else:
            raise FileNotFoundError(f"--images {path}: no such file or directory")
    return found


def load_magnitudes(path: Path) -> np.ndarray:
    """A ``.npy`` magnitude image as float32 ``(slices, y, x)``; errors name the file and shape."""
    array = np.load(path, allow_pickle=False)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a (y, x) or (slices, y, x) image, found shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: contains NaN or Inf values")
    return np.abs(array).astype(np.float32)


def simulate_pair(
    image: np.ndarray,
    *,
    coils: int,
    acceleration: float,
    acs_width: int,
    mask_kind: str,
    seed: int,
    source: str,
) -> TrainingPair:
    """Simulate the undersampled scan of a ``(y, x)`` magnitude image and its fully sampled target."""
    import torch

    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.physics.coils import espirit_maps
    from semrecon_core.physics.sense import SenseOp

    options = {"coils": coils, "acs_width": acs_width, "mask_kind": mask_kind, "seed": seed}
    scan = simulate_kspace(image, acceleration=acceleration, **options)
    full = simulate_kspace(image, acceleration=1, **options)
    maps = espirit_maps(scan, calib_width=acs_width)
    zero_filled = SenseOp(maps, scan.mask).adjoint(scan.data)
    target = SenseOp(maps, full.mask).adjoint(full.data)
    scale = float(zero_filled.abs().max())
    if not scale > 0:
        raise ValueError(
            f"{source}: ESPIRiT found no coil sensitivity (all-zero maps) with {acs_width} calibration lines "
            f"on a {image.shape[-2]}×{image.shape[-1]} image; use a larger image or --acs-width"
        )
    return TrainingPair(
        zero_filled=(zero_filled / scale).to(torch.complex64),
        target=(target / scale).to(torch.complex64),
        kspace=(scan.data / scale).to(torch.complex64),
        mask=scan.mask,
        maps=maps.to(torch.complex64),
        source=source,
    )


def _forward(network: Any, pair: TrainingPair) -> Any:
    from semrecon_core.backbones.unrolled import UnrolledNet
    from semrecon_core.physics.sense import SenseOp

    if isinstance(network, UnrolledNet):
        return network(pair.zero_filled, pair.kspace, SenseOp(pair.maps, pair.mask))
    return network(pair.zero_filled)


def pretrain(
    network: Any,
    pairs: list[TrainingPair],
    *,
    epochs: int,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Supervised training of ``network`` on ``pairs`` (one example per step, shuffled per epoch).

    Returns the mean L1 loss per epoch.
    """
    import torch
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("pretraining: no training images")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=lr)
    network.train()
    history: list[float] = []
    with tqdm(total=epochs * len(pairs), desc="pretraining", unit="step", disable=None) as bar:
        for epoch in range(epochs):
            total = torch.zeros(())
            for index in torch.randperm(len(pairs), generator=generator).tolist():
                pair = pairs[index]
                optimizer.zero_grad(set_to_none=True)
                output = _forward(network, pair)
                loss = torch.view_as_real(output - pair.target).abs().mean()
                loss.backward()
                optimizer.step()
                total += loss.detach()
                bar.update(1)
            history.append(float(total) / len(pairs))
            bar.set_postfix(epoch=epoch + 1, l1=f"{history[-1]:.4g}")
            log.info("pretraining epoch %d/%d: L1 %.4g", epoch + 1, epochs, history[-1])
    return history


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``semrecon pretrain``."""
    parser.add_argument("out", help="checkpoint to write (.safetensors; metadata goes to the .json beside it)")
    parser.add_argument("--backbone", choices=("unet", "unrolled"), default="unet")
    parser.add_argument("--images", nargs="+", required=True, help=".npy magnitude images or directories of them")
    parser.add_argument("--width", type=int, default=64, help="U-Net channels at the first level (paper: 64)")
    parser.add_argument("--depth", type=int, default=5, help="U-Net levels (paper: 5)")
    parser.add_argument("--stages", type=int, default=4, help="unrolled stages")
    parser.add_argument("--cg-iterations", type=int, default=20, help="CG iterations per unrolled stage")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--coils", type=int, default=8, help="simulated coils")
    parser.add_argument("--acceleration", type=float, default=4.0)
    parser.add_argument("--acs-width", type=int, default=24)
    parser.add_argument("--mask", default="gaussian", help="mask kind (equispaced, random, gaussian, poisson)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Simulate the training scans, train, write the checkpoint."""
    import torch

    from semrecon_core.backbones.checkpoint import save_checkpoint
    from semrecon_core.backbones.unet import UNet, UNetSpec
    from semrecon_core.backbones.unrolled import UnrolledNet

    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"OUT {args.out}: expected a file name ending in .safetensors")
    if args.epochs < 1:
        raise ValueError(f"--epochs: expected at least 1, found {args.epochs}")
    files = find_images(args.images)
    torch.manual_seed(args.seed)
    pairs: list[TrainingPair] = []
    data: list[dict[str, Any]] = []
    for path in files:
        images = load_magnitudes(path)
        for index, image in enumerate(images):
            seed = args.seed + len(pairs)
            pairs.append(
                simulate_pair(
                    image,
                    coils=args.coils,
                    acceleration=args.acceleration,
                    acs_width=args.acs_width,
                    mask_kind=args.mask,
                    seed=seed,
                    source=f"{path}[{index}]",
                )
            )
        data.append({"path": str(path), "sha256": _sha256(path), "slices": int(images.shape[0])})
    if args.backbone == "unet":
        network: torch.nn.Module = UNet(UNetSpec(width=args.width, depth=args.depth))
    else:
        network = UnrolledNet(
            UNetSpec(width=args.width, depth=args.depth, residual=True),
            stages=args.stages,
            cg_iterations=args.cg_iterations,
        )
    history = pretrain(network, pairs, epochs=args.epochs, lr=args.lr, seed=args.seed)
    metadata = {
        "data": data,
        "masks": {
            "kind": args.mask,
            "acceleration": args.acceleration,
            "acs_width": args.acs_width,
            "seeds": [args.seed, args.seed + len(pairs) - 1],
            "coils": args.coils,
            "simulation": "semrecon_core.data.simulate.simulate_kspace; ESPIRiT maps",
        },
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "loss": "L1 of real/imag vs fully sampled coil-combined image",
        "loss_per_epoch": history,
    }
    path = save_checkpoint(args.out, network, args.backbone, metadata)
    print(
        f"wrote {path} and {path.with_suffix('.json')} ({len(pairs)} images, {args.epochs} epochs, "
        f"final L1 {history[-1]:.4g})"
    )
    return 0
