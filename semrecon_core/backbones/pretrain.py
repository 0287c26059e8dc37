"""Warm-start pretraining of a U-Net or unrolled network on auxiliary magnitude images (``semrecon pretrain``).

Each image becomes a simulated multicoil scan (``semrecon_core.data.simulate.simulate_kspace``: birdcage
coils, smooth phase, noise, a 1-D undersampling mask) and its fully sampled counterpart from the same seed;
coil maps come from the reconstruction pipeline's estimator (ESPIRiT on the calibration region), as they do
when the network reconstructs. The network learns to map the zero-filled image (scaled to max 1) to the fully
sampled coil-combined image (L1 on real and imaginary parts). The checkpoint (safetensors + JSON metadata:
architecture, data files with SHA-256, masks, epochs, losses) is what ``config.checkpoint`` points the
``unet`` / ``unrolled`` engines at for LoRA fine-tuning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class TrainingPair:
    """One simulated training example (tensors are complex64 ``(1, ...)``, scaled so max |zero-filled| = 1)."""

    zero_filled: Any
    target: Any
    kspace: Any
    mask: Any
    maps: Any
    source: str


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

    from semrecon_core.config import ReconConfig
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.physics.sense import SenseOp
    from semrecon_core.pipeline import Pipeline

    simulate = functools.partial(
        simulate_kspace, image, coils=coils, acs_width=acs_width, mask_kind=mask_kind, seed=seed
    )
    scan = dataclasses.replace(simulate(acceleration=acceleration), source=source)
    full = simulate(acceleration=1)
    maps = Pipeline(ReconConfig(calib_width=acs_width)).estimate_maps(scan)
    zero_filled = SenseOp(maps, scan.mask).adjoint(scan.data)
    target = SenseOp(maps, full.mask).adjoint(full.data)
    scale = float(zero_filled.abs().max())
    return TrainingPair(
        zero_filled=(zero_filled / scale).to(torch.complex64),
        target=(target / scale).to(torch.complex64),
        kspace=(scan.data / scale).to(torch.complex64),
        mask=scan.mask,
        maps=maps,
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
    device: Any = "cpu",
) -> list[float]:
    """Supervised training of ``network`` on ``pairs`` (one example per step, shuffled per epoch) on ``device``.

    The network is moved to ``device`` (and stays there). Returns the mean L1 loss per epoch.
    """
    import torch
    from tqdm.auto import tqdm

    from semrecon_core.solvers.adam import adam_optimizer

    if not pairs:
        raise ValueError("pretraining: no training images")
    generator = torch.Generator().manual_seed(seed)
    network.to(device)
    pairs = [
        dataclasses.replace(
            pair,
            **{name: getattr(pair, name).to(device) for name in ("zero_filled", "target", "kspace", "mask", "maps")},
        )
        for pair in pairs
    ]
    optimizer = adam_optimizer([([p for p in network.parameters() if p.requires_grad], lr)])
    network.train()
    history: list[float] = []
    with tqdm(total=epochs * len(pairs), desc="pretraining", unit="step", disable=None) as bar:
        for epoch in range(epochs):
            total = torch.zeros((), device=device)
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


def pretrain_checkpoint(
    path: str | Path,
    network: Any,
    backbone: str,
    pairs: list[TrainingPair],
    *,
    data: list[dict[str, Any]],
    masks: dict[str, Any],
    epochs: int,
    lr: float = 1e-3,
    seed: int = 0,
    device: Any = "cpu",
) -> tuple[Path, list[float]]:
    """:func:`pretrain`, then write the network (on the CPU) as a ``semrecon pretrain`` checkpoint with provenance.

    ``data``: the training files (or their description); ``masks``: how the scans were simulated (kind,
    acceleration, ACS width, coils, seeds). Returns the checkpoint path and the loss per epoch.
    """
    from semrecon_core.backbones.checkpoint import save_checkpoint

    history = pretrain(network, pairs, epochs=epochs, lr=lr, seed=seed, device=device)
    network.cpu()
    metadata = {
        "data": data,
        "masks": {**masks, "simulation": "semrecon_core.data.simulate.simulate_kspace; ESPIRiT maps"},
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "loss": "L1 of real/imag vs fully sampled coil-combined image",
        "loss_per_epoch": history,
    }
    return save_checkpoint(path, network, backbone, metadata), history
