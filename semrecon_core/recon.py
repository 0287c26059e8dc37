"""The reconstruction: one entry point for every backbone and prior.

``reconstruct(kspace, maps, config)`` is what the CLI, the gadget and the tests call. It resolves the
config's preset, picks the device, scales the data, dispatches to the engine registered for the
backbone and returns a :class:`ReconResult`. Engines are imported lazily so that classical
reconstructions never import the deep-learning stack.

An engine is a callable ``engine(problem: ReconProblem, config: ReconConfig, callback) -> ReconResult``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from semrecon_core.config import ReconConfig
from semrecon_core.data.kspace import KSpace

log = logging.getLogger(__name__)

# backbone -> "module:function" of its engine
ENGINES: dict[str, str] = {
    "zero-filled": "semrecon_core.classical:zero_filled",
    "sense": "semrecon_core.classical:sense",
    "unet": "semrecon_core.backbones.finetune:reconstruct_unet",
    "unrolled": "semrecon_core.backbones.finetune:reconstruct_unrolled",
    "inr": "semrecon_core.backbones.finetune:reconstruct_inr",
}


@dataclass
class ReconProblem:
    """What an engine receives: scaled data on the target device.

    Attributes:
        kspace: complex64 ``(slices, coils, ky, kx)`` measured k-space divided by ``scale``.
        mask: bool ``(slices, ky, kx)``.
        maps: complex64 coil maps ``(slices, coils, y, x)``.
        scale: the factor the data were divided by (max of the zero-filled image magnitude).
        device: where the tensors live.
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    scale: float
    device: torch.device


@dataclass
class ReconResult:
    """A reconstruction: the complex image ``(slices, y, x)`` in the units of the input k-space.

    ``label`` names what produced it (backbone, prior, encoder; random-weight encoders say so),
    ``info`` holds per-engine extras (e.g. the model's quality answer), ``trace`` per-iteration records.
    """

    image: torch.Tensor
    label: str
    info: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)


Callback = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; other names are checked for availability."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def prepare_problem(kspace: KSpace, maps: torch.Tensor, device: torch.device) -> ReconProblem:
    """Move data to ``device`` and scale k-space so that the zero-filled image has max magnitude 1."""
    from semrecon_core.physics.sense import SenseOp

    data = kspace.data.to(device, torch.complex64)
    mask = kspace.mask.to(device)
    maps = maps.to(device, torch.complex64)
    if maps.shape != data.shape:
        raise ValueError(f"coil maps: expected shape {tuple(data.shape)} like the k-space, found {tuple(maps.shape)}")
    if not torch.isfinite(torch.view_as_real(data)).all():
        raise ValueError(f"{kspace.source or 'k-space'}: contains NaN or Inf samples")
    zero_filled = SenseOp(maps, mask).adjoint(data)
    scale = float(zero_filled.abs().max())
    if scale == 0.0:
        raise ValueError(f"{kspace.source or 'k-space'}: all sampled values are zero")
    return ReconProblem(kspace=data / scale, mask=mask, maps=maps, scale=scale, device=device)


def reconstruct(
    kspace: KSpace,
    maps: torch.Tensor,
    config: ReconConfig,
    *,
    callback: Callback | None = None,
    prior: Any = None,
) -> ReconResult:
    """Reconstruct ``kspace`` with coil ``maps`` ``(slices, coils, y, x)`` as ``config`` says.

    Args:
        kspace: the scan.
        maps: coil sensitivities, e.g. from :func:`semrecon_core.physics.coils.espirit_maps`.
        config: the validated configuration; its preset fills unset fields.
        callback: receives one status dict per iteration (loss terms, embeddings, answers).
        prior: an already built prior (e.g. kept loaded by ``semrecon serve``); built from
            ``config`` when ``None``.

    Returns:
        The complex image ``(slices, y, x)`` (on the CPU) with its label and extras.
    """
    config = config.resolved()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    problem = prepare_problem(kspace, maps, device)
    module_name, func_name = ENGINES[config.backbone].split(":")
    engine = getattr(importlib.import_module(module_name), func_name)
    log.info("reconstructing %s with backbone=%s prior=%s on %s", kspace.source, config.backbone, config.prior, device)
    result: ReconResult = engine(problem, config, callback=callback, prior=prior)
    result.image = (result.image * problem.scale).detach().to("cpu", torch.complex64)
    return result
