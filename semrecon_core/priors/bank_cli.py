"""``semrecon bank build OUT ...`` and ``semrecon bank info BANK``.

Sources are files or directories of them: ISMRMRD raw (``.h5``/``.mrd``), fastMRI ``.h5``, BART
``.cfl``, ``.npy`` k-space (complex, ``(coils, ky, kx)`` / ``(slices, coils, ky, kx)``) or ``.npy``
magnitude images (real, ``(y, x)`` / ``(slices, y, x)``). Positives from k-space are the RSS of the
fully sampled data. Without ``--negatives``, negatives are made from each positive slice as in the
public code: zero-filled RSS after a 1-D Gaussian-density mask with R drawn uniformly from [3, 8] and
24 ACS lines (magnitude images are treated as single-coil k-space for this).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE_SUFFIXES = (".h5", ".mrd", ".npy", ".cfl")


@dataclass
class Source:
    """Images read from one file: ``images`` ``(slices, y, x)`` complex64; ``kspace`` when known."""

    path: Path
    images: torch.Tensor
    kspace: torch.Tensor | None
    sha256: str


def expand_sources(paths: Sequence[str | Path], role: str) -> list[Path]:
    """Files named by ``paths``; directories contribute their source files (recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES)
            if not found:
                raise ValueError(f"--{role}: directory {path} holds no {', '.join(SOURCE_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--{role}: {path}: no such file or directory")
    return files


def read_source(path: Path, role: str) -> Source:
    """Read one source; positives from k-space must be fully sampled."""
    from semrecon_core.physics.coils import rss
    from semrecon_core.physics.fft import ifft2c
    from semrecon_core.priors.bank import file_sha256

    if path.suffix.lower() == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if not np.iscomplexobj(array):
            if array.ndim not in (2, 3):
                raise ValueError(
                    f"{path}: expected a magnitude image (y, x) or (slices, y, x), found shape {array.shape}"
                )
            images = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(-1, *array.shape[-2:])
            if not torch.isfinite(images).all():
                raise ValueError(f"{path}: image contains NaN or Inf")
            return Source(path, images.to(torch.complex64), None, file_sha256(path))
    from semrecon_core.data.readers import load_kspace

    kspace = load_kspace(path)
    if role == "positives" and not bool(kspace.mask.all()):
        raise ValueError(
            f"--positives: {path}: k-space is undersampled (R = {kspace.acceleration:.2f}); "
            f"positives must be fully sampled (pass undersampled data as --negatives)"
        )
    images = rss(ifft2c(kspace.data)).to(torch.complex64)
    return Source(path, images, kspace.data, file_sha256(path))


def undersampled_versions(
    source: Source, rng: np.random.Generator, acs_width: int = 24
) -> Iterator[tuple[torch.Tensor, float]]:
    """Zero-filled RSS ``(1, y, x)`` of each slice with a Gaussian 1-D mask at R ~ U[3, 8], and R."""
    from semrecon_core.physics.coils import rss
    from semrecon_core.physics.fft import fft2c, ifft2c
    from semrecon_core.physics.masks import sampling_mask

    kspace = source.kspace if source.kspace is not None else fft2c(source.images).unsqueeze(1)
    for slice_kspace in kspace:
        acceleration = float(rng.uniform(3.0, 8.0))
        mask = sampling_mask(
            "gaussian",
            tuple(slice_kspace.shape[-2:]),
            acceleration,
            acs_width=acs_width,
            seed=int(rng.integers(2**31)),
        )
        yield rss(ifft2c(slice_kspace * mask)).unsqueeze(0).to(torch.complex64), acceleration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``semrecon bank build`` / ``semrecon bank info``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="embed positive and negative images into a bank")
    build.add_argument("out", type=Path, help="output bank (.safetensors)")
    build.add_argument("--positives", nargs="+", required=True, metavar="SRC", help="fully sampled sources")
    build.add_argument("--negatives", nargs="+", metavar="SRC", help="low-quality sources (default: simulated)")
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
    build.add_argument("--similarity", choices=("pooled", "token-pca"), help="image-only similarity (default: preset)")
    build.add_argument("--pca-dims", default="64,128,256", help="PCA dims per level (token-pca)")
    build.add_argument("--instruction", help="instruction name (paper, public-code, table-s1-N, ...) or text")
    build.add_argument("--sigma", type=float, help="std of the text-embedding perturbations (default: preset)")
    build.add_argument("--perturbations", type=int, default=100, help="K perturbations per image (language)")
    build.add_argument("--seed", type=int, default=0, help="seed for simulated negatives and perturbations")
    build.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    build.add_argument("--allow-download", action="store_true", help="allow fetching the encoder from the hub")
    info = sub.add_parser("info", help="print a bank's metadata and shapes")
    info.add_argument("bank", type=Path)


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
    if args.family == "hf-vision":
        if args.kind == "language":
            raise ValueError("--kind language needs --family janus")
        from semrecon_core.encoders.hf_vision import HFVisionEncoder

        return HFVisionEncoder.from_pretrained(
            args.encoder, layers=layers, device=device, allow_download=args.allow_download
        )
    if args.kind == "language":
        from semrecon_core.encoders.janus import JanusLanguageEncoder

        return JanusLanguageEncoder.from_pretrained(
            args.encoder, instruction=instruction, device=device, allow_download=args.allow_download
        )
    from semrecon_core.encoders.janus import JanusImageEncoder

    return JanusImageEncoder.from_pretrained(
        args.encoder, layers=layers, device=device, allow_download=args.allow_download
    )


def build(args: argparse.Namespace) -> Path:
    """Build and save a bank as ``args`` say; returns its path."""
    from tqdm import tqdm

    from semrecon_core.config import ReconConfig
    from semrecon_core.priors.bank import bank_from_features, embed_images
    from semrecon_core.recon import resolve_device

    preset = ReconConfig(backbone="unet", preset=args.preset).resolved()
    layers = _ints(args.layers, "layers")
    weights = _floats(args.weights, "weights") if args.weights else tuple(preset.level_weights or ())
    similarity = args.similarity or preset.similarity
    sigma = preset.sigma if args.sigma is None else args.sigma
    instruction = args.instruction or args.preset
    if args.kind == "image" and len(weights) != len(layers):
        raise ValueError(f"--weights: expected {len(layers)} weights (one per layer in --layers), found {len(weights)}")
    if args.perturbations < 0 or sigma < 0:
        raise ValueError(
            f"--perturbations / --sigma: expected non-negative values, found {args.perturbations} / {sigma}"
        )
    device = resolve_device(args.device)
    positive_files = expand_sources(args.positives, "positives")
    negative_files = expand_sources(args.negatives, "negatives") if args.negatives else []
    encoder = _encoder(args, layers, instruction, device)
    rng = np.random.default_rng(args.seed)
    records: list[dict[str, Any]] = []
    positive_images: list[torch.Tensor] = []
    negative_images: list[torch.Tensor] = []
    for path in tqdm(positive_files, desc="reading positives", unit="file", disable=None):
        source = read_source(path, "positives")
        positive_images.extend(source.images.split(1))
        record = {
            "role": "positive",
            "path": str(path),
            "sha256": source.sha256,
            "slices": len(source.images),
        }
        if not negative_files:
            accelerations = []
            for image, acceleration in undersampled_versions(source, rng):
                negative_images.append(image)
                accelerations.append(round(acceleration, 3))
            record["simulated_negatives_R"] = accelerations
        records.append(record)
    for path in tqdm(negative_files, desc="reading negatives", unit="file", disable=None):
        source = read_source(path, "negatives")
        negative_images.extend(source.images.split(1))
        records.append({"role": "negative", "path": str(path), "sha256": source.sha256, "slices": len(source.images)})
    count = args.perturbations if args.kind == "language" else 0

    def progress(role: str):  # noqa: ANN202 - small local adapter
        return lambda items: tqdm(items, desc=f"embedding {role}", unit="slice", disable=None)

    positives = embed_images(
        encoder,
        positive_images,
        perturbations=count,
        sigma=sigma,
        seed=args.seed,
        progress=progress("positives"),
    )
    negatives = embed_images(
        encoder,
        negative_images,
        perturbations=count,
        sigma=sigma,
        seed=args.seed + 1,
        progress=progress("negatives"),
    )
    extra = {
        "sources": records,
        "sigma": sigma if args.kind == "language" else None,
        "perturbations": count,
        "negatives": "given" if negative_files else "simulated: zero-filled RSS, gaussian 1-D mask, R~U[3,8], 24 ACS",
        "preset": args.preset,
        "seed": args.seed,
    }
    bank = bank_from_features(
        positives,
        negatives,
        identity=encoder.identity,
        similarity="vector" if args.kind == "language" else similarity,
        weights=weights if args.kind == "image" else (1.0,),
        pca_dims=_ints(args.pca_dims, "pca-dims"),
        extra=extra,
    )
    return bank.save(args.out)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``build`` / ``info``."""
    from semrecon_core.priors.bank import load_bank

    if args.action == "build":
        path = build(args)
        print(load_bank(path).describe())
        return 0
    print(load_bank(args.bank).describe())
    return 0
