"""``semrecon pretrain OUT --images ...``: warm-start a U-Net or unrolled network on auxiliary magnitude images.

Every image becomes a simulated training pair (:mod:`semrecon_core.backbones.pretrain`); the checkpoint and its
JSON metadata (data files with SHA-256, masks, epochs, losses) are what ``--set checkpoint=...`` points the
``unet`` / ``unrolled`` engines at.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".npy",)


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

    from semrecon_core.backbones.pretrain import TrainingPair, load_magnitudes, pretrain_checkpoint, simulate_pair
    from semrecon_core.backbones.unet import UNet, UNetSpec
    from semrecon_core.backbones.unrolled import UnrolledNet
    from semrecon_core.priors.bank import file_sha256

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
        data.append({"path": str(path), "sha256": file_sha256(path), "slices": int(images.shape[0])})
    if args.backbone == "unet":
        network: torch.nn.Module = UNet(UNetSpec(width=args.width, depth=args.depth))
    else:
        network = UnrolledNet(
            UNetSpec(width=args.width, depth=args.depth, residual=True),
            stages=args.stages,
            cg_iterations=args.cg_iterations,
        )
    masks = {
        "kind": args.mask,
        "acceleration": args.acceleration,
        "acs_width": args.acs_width,
        "seeds": [args.seed, args.seed + len(pairs) - 1],
        "coils": args.coils,
    }
    path, history = pretrain_checkpoint(
        args.out, network, args.backbone, pairs, data=data, masks=masks, epochs=args.epochs, lr=args.lr, seed=args.seed
    )
    print(
        f"wrote {path} and {path.with_suffix('.json')} ({len(pairs)} images, {args.epochs} epochs, "
        f"final L1 {history[-1]:.4g})"
    )
    return 0
