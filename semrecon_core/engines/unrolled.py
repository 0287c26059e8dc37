"""The unrolled-network engine: U-Nets alternating with CG data consistency, fitted SSDU-style.

The network sees 60 % of the measured samples and the data term uses the other 40 % (a self-supervised
split of the scan, drawn from ``config.seed``); once trained, it runs on all measured samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from semrecon_core.backbones.unrolled import UnrolledNet, ssdu_split
from semrecon_core.engines.fitting import autocast, finish, fit_network, loss_terms, prepare_network
from semrecon_core.engines.unet import unet_spec
from semrecon_core.physics.sense import SenseOp

if TYPE_CHECKING:
    from collections.abc import Callable

    from semrecon_core.config import ResolvedConfig
    from semrecon_core.engines.base import ReconProblem, ReconResult
    from semrecon_core.priors.base import Prior
    from semrecon_core.solvers.adam import Closure
    from semrecon_core.solvers.status import Callback

SSDU_HOLDOUT = 0.4  # fraction of measured samples held out for the unrolled network's loss


def reconstruct_unrolled(
    problem: ReconProblem,
    config: ResolvedConfig,
    *,
    prior: Prior | None,
    callback: Callback | None,
    network: UnrolledNet | None = None,
) -> ReconResult:
    """Fit the unrolled network SSDU-style; ``network`` replaces the one ``config`` describes."""
    base, label, info = prepare_network(
        network, config, "unrolled", lambda: UnrolledNet(unet_spec(config, residual=True))
    )
    generator = torch.Generator().manual_seed(config.seed)
    learned: list[float] = []

    def batch(net: nn.Module, sub: ReconProblem) -> tuple[Closure, Callable[[], torch.Tensor]]:
        theta, held = ssdu_split(sub.mask, holdout=SSDU_HOLDOUT, generator=generator)
        op_net, op_loss = SenseOp(sub.maps, theta), SenseOp(sub.maps, held)
        seen = sub.kspace * theta.unsqueeze(-3)
        held_out = sub.kspace * held.unsqueeze(-3)
        start = op_net.adjoint(seen)
        op_full = SenseOp(sub.maps, sub.mask)
        measured = sub.kspace * sub.mask.unsqueeze(-3)
        zero_filled = op_full.adjoint(measured)

        def closure() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with autocast(problem.device, config):
                image = net(start, seen, op_net)
            return image, loss_terms(image, op_loss, held_out, config, prior)

        def final() -> torch.Tensor:
            """The trained network on all measured samples; records its learned data-consistency weight."""
            learned.append(float(cast("UnrolledNet", net).lam.detach().abs()))
            return net(zero_filled, measured, op_full)

        return closure, final

    images, trace = fit_network(
        problem, config, base.to(problem.device), prior=prior, callback=callback, name="unrolled", batch=batch
    )
    info["learned_dc_weight"] = learned
    info["ssdu_holdout"] = SSDU_HOLDOUT
    return finish(images, problem, config, label, prior, info, trace)
