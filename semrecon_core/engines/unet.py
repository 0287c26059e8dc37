"""The U-Net engine: a U-Net maps the zero-filled image to the reconstruction, fitted to the scan (Eq. 7).

With ``config.checkpoint`` the U-Net starts from a warm-start checkpoint and only LoRA adapters (rank
``config.lora_rank``; 0 = all weights) train; without one, every weight of a randomly initialised U-Net
(``config.width``/``config.depth``, default the paper's 64 / 5) trains.

``config.start == "preview"`` adds a fixed offset to the network's output, chosen so that the first iterate is the
CG-SENSE image the gadget sends as its preview: the fit then moves away from the preview only as far as its
objective leads it, and a fit stopped early by the time budget is near the preview rather than at the network's
untrained output. ``config.start == "cs-tv"`` does the same with the CS-TV image (the shipped semantic chain).

Why the start matters: the fit moves the image only where the network's parameters can move it, and a step of
the warm-started U-Net (LoRA or every weight) changes mostly the image's smooth part, which the fully sampled
k-space centre already pins. At the preview of the bench_online knee case (3 × 128², R = 4), the image-space
descent direction of data + λ·TV has 87 % of its energy outside the central half of k-space and points towards
the CS-TV image (cosine 0.67), while the image change of one parameter step has 17 % (LoRA 4) / 2 % (every weight)
there and a cosine of 0.08 / 0.11 with it. After 300 iterations (LoRA 4 at lr 1e-3 or 1e-2, Adam ε 1e-8 or 1e-16;
every weight at lr 1e-3) TV fell by about 1 % and PSNR rose by ≤ 0.05 dB, while CS-TV's objective is 28 % lower
and its image 4.3 dB better (measured once with these pieces; the chain's result from each start is in
``benchmarks/results/online_chain_tv.md``). Starting where a classical solver already got is what gets the fit
there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from semrecon_core.backbones.unet import UNet, UNetSpec
from semrecon_core.config import cs_tv_config, preview_config
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
        offset = None if config.start == "network" else start_offset(net, zero_filled, sub, config)

        def output() -> torch.Tensor:
            image = net(zero_filled)
            return image if offset is None else image + offset

        def closure() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with autocast(problem.device, config):
                image = output()
            return image, loss_terms(image, op, measured, config, prior)

        return BatchFit(closure, output)

    if config.start != "network":
        label += ", started at the preview" if config.start == "preview" else ", started at the CS-TV image"
    images, trace, fits = fit_network(
        problem, config, base.to(problem.device), prior=prior, callback=callback, name="U-Net", batch=batch
    )
    return finish(images, problem, config, label, prior, info, trace, fits)


def start_offset(
    net: nn.Module, zero_filled: torch.Tensor, problem: ReconProblem, config: ResolvedConfig
) -> torch.Tensor:
    """``start − net(zero_filled)`` for the slices of ``problem``, the network run as the fit runs it.

    ``start``: the gadget's preview (:func:`~semrecon_core.config.preview_config`, ``start=preview``) or the CS-TV
    image (:func:`~semrecon_core.config.cs_tv_config`, ``start=cs-tv``), here on the scaled data. It is computed
    inside the fit's time budget, unless the preview the pipeline has just sent comes with the problem
    (``problem.start``, :meth:`~semrecon_core.pipeline.Pipeline.stream`): then that image is the start.
    """
    with torch.no_grad():
        if config.start == "preview" and problem.start is not None:
            image = problem.start.to(problem.device, torch.complex64)
        else:
            classical = preview_config(config) if config.start == "preview" else cs_tv_config(config)
            image = sense(problem, classical.resolved(), prior=None, callback=None).image
        with autocast(problem.device, config):
            return image - net(zero_filled)
