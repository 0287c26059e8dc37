"""The U-Net engine: a U-Net maps the zero-filled image to the reconstruction, fitted to the scan (Eq. 7).

With ``config.checkpoint`` the U-Net starts from a warm-start checkpoint and only LoRA adapters (rank
``config.lora_rank``; 0 = all weights) train; without one, every weight of a randomly initialised U-Net
(``config.width``/``config.depth``, default the paper's 64 / 5) trains.

``config.start == "preview"`` adds a fixed offset to the network's output, chosen so that the first iterate is the
CG-SENSE image the gadget sends as its preview: the fit then moves away from the preview only as far as its
objective leads it, and a fit stopped early by the time budget is near the preview rather than at the network's
untrained output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from semrecon_core.backbones.unet import UNet, UNetSpec
from semrecon_core.config import preview_config
from semrecon_core.engines.batching import BatchFit
from semrecon_core.engines.classical import sense
from semrecon_core.engines.fitting import autocast, finish, fit_network, loss_terms, prepare_network
from semrecon_core.physics.sense import SenseOp

if TYPE_CHECKING:
    from torch import nn

    from semrecon_core.config import ResolvedConfig
    from semrecon_core.engines.base import ReconProblem, ReconResult
    from semrecon_core.priors.base import Prior
    from semrecon_core.solvers.status import Callback


def unet_spec(config: ResolvedConfig, *, residual: bool = False) -> UNetSpec:
    """The U-Net architecture ``config`` asks for (``width``/``depth``, default the paper's)."""
    default = UNetSpec()
    return UNetSpec(width=config.width or default.width, depth=config.depth or default.depth, residual=residual)


def reconstruct_unet(
    problem: ReconProblem,
    config: ResolvedConfig,
    *,
    prior: Prior | None,
    callback: Callback | None,
    network: UNet | None = None,
) -> ReconResult:
    """Fit a U-Net to the scan with Eq. (7); ``network`` replaces the one ``config`` describes."""
    base, label, info = prepare_network(network, config, "unet", lambda: UNet(unet_spec(config)))

    def batch(net: nn.Module, sub: ReconProblem) -> BatchFit:
        op = SenseOp(sub.maps, sub.mask)
        measured = sub.kspace * sub.mask.unsqueeze(-3)
        zero_filled = op.adjoint(measured)
        offset = preview_offset(net, zero_filled, sub, config) if config.start == "preview" else None

        def output() -> torch.Tensor:
            image = net(zero_filled)
            return image if offset is None else image + offset

        def closure() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with autocast(problem.device, config):
                image = output()
            return image, loss_terms(image, op, measured, config, prior)

        return BatchFit(closure, output)

    if config.start == "preview":
        label += ", started at the preview"
    images, trace, fits = fit_network(
        problem, config, base.to(problem.device), prior=prior, callback=callback, name="U-Net", batch=batch
    )
    return finish(images, problem, config, label, prior, info, trace, fits)


def preview_offset(
    net: nn.Module, zero_filled: torch.Tensor, problem: ReconProblem, config: ResolvedConfig
) -> torch.Tensor:
    """``preview − net(zero_filled)`` for the slices of ``problem``, the network run as the fit runs it.

    The preview is the gadget's (:func:`~semrecon_core.config.preview_config`), here on the scaled data.
    """
    with torch.no_grad():
        preview = sense(problem, preview_config(config).resolved(), prior=None, callback=None).image
        with autocast(problem.device, config):
            return preview - net(zero_filled)
