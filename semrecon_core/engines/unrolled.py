"""The unrolled-network engine: U-Nets alternating with CG data consistency, fitted SSDU-style.

The network sees 60 % of the training samples for its data consistency and the data term uses the other 40 %
(a self-supervised split of the scan, drawn from ``config.seed``). ``config.stages`` stages with
data-consistency weights initialised at ``config.dc_init``. The image is the trained network's output on the
samples it was trained with, as the authors save it, followed by the soft data-consistency step with every
measured sample (``config.final_dc``, default 0.5). Running the trained network on all measured samples instead
is a change of input it never saw: on the 128² knee it gave 35.4 dB against 36.4 dB for its own output and
36.6 dB with the soft step (``paper``, 200 iterations; ``public-code``: 35.2, 35.0 and 36.1 dB).

- ``paper``: the first stage starts from the zero-filled image of the network's samples; the data term and the
  prior act on the final output.
- ``public-code``, as the authors' ``Unrolled_demo.py`` / ``image_language_demo.py``: the first stage starts
  from the zero-filled image of all samples; the hold-out is drawn Gaussian-weighted toward the k-space centre
  (σ = 0.5); the L1 data term is summed over every stage output (the input, each U-Net output and each
  data-consistency output); the image-only prior's query is the last U-Net output, the image-language prior's
  queries are every U-Net output, their losses summed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from semrecon_core.backbones.unrolled import UnrolledNet, ssdu_split
from semrecon_core.engines.batching import BatchFit
from semrecon_core.engines.fitting import (
    autocast,
    finish,
    fit_network,
    loss_terms,
    prepare_network,
)
from semrecon_core.engines.objective import data_term
from semrecon_core.engines.unet import unet_spec
from semrecon_core.physics.sense import SenseOp

if TYPE_CHECKING:
    from semrecon_core.config import Preset, ResolvedConfig
    from semrecon_core.engines.base import ReconProblem, ReconResult
    from semrecon_core.priors.base import Prior
    from semrecon_core.solvers.status import Callback

SSDU_HOLDOUT = 0.4  # fraction of measured samples held out for the unrolled network's loss
AUTHORS_HOLDOUT_SIGMA = 0.5  # Gaussian weighting of the authors' hold-out draw (k-space normalised to [-1, 1])


def stage_data_term(images: list[torch.Tensor], op: SenseOp, measured: torch.Tensor, preset: Preset) -> torch.Tensor:
    """The authors' unrolled data term: the L1 of every stage output (and the input) against ``measured``, summed."""
    terms = [data_term(op(x.to(torch.complex64)), measured, op.mask, preset=preset) for x in images]
    return torch.stack(terms).sum()


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
        network,
        config,
        "unrolled",
        lambda: UnrolledNet(unet_spec(config, residual=True), stages=config.stages, lam_init=config.dc_init),
    )
    authors = config.preset == "public-code"
    learned: list[list[float]] = []

    def batch(net: nn.Module, sub: ReconProblem) -> BatchFit:
        unrolled = cast("UnrolledNet", net)
        sigma = AUTHORS_HOLDOUT_SIGMA if authors else None
        generator = torch.Generator().manual_seed(config.seed + sub.first_slice)  # the batch's split, whoever asks
        theta, held = ssdu_split(sub.mask, holdout=SSDU_HOLDOUT, generator=generator, gaussian_sigma=sigma)
        op_net, op_loss = SenseOp(sub.maps, theta), SenseOp(sub.maps, held)
        seen = sub.kspace * theta.unsqueeze(-3)
        held_out = sub.kspace * held.unsqueeze(-3)
        if authors:
            start = SenseOp(sub.maps, sub.mask).adjoint(sub.kspace * sub.mask.unsqueeze(-3))
        else:
            start = op_net.adjoint(seen)

        def closure() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with autocast(problem.device, config):
                outputs = unrolled.run(start, seen, op_net)
            final = outputs.consistent[-1]
            if not authors:
                return final, loss_terms(final, op_loss, held_out, config, prior)
            data = stage_data_term([start, *outputs.denoised, *outputs.consistent], op_loss, held_out, config.preset)
            if prior is None:
                return final, {"data": data, "loss": data}
            queries = outputs.denoised if config.bank_kind == "language" else outputs.denoised[-1:]
            value = sum(
                (prior.loss(q.to(torch.complex64)) for q in queries), start=torch.zeros((), device=problem.device)
            )
            return final, {"data": data, "prior": value, "loss": data + config.lam * value}

        def final() -> torch.Tensor:
            """The trained network on the samples it was trained with; records its data-consistency weights."""
            learned.append([float(w.detach().abs()) for w in unrolled.lams])
            return unrolled(start, seen, op_net)

        return BatchFit(closure, final)

    images, trace, fits = fit_network(
        problem, config, base.to(problem.device), prior=prior, callback=callback, name="unrolled", batch=batch
    )
    info["learned_dc_weights"] = learned
    info["ssdu_holdout"] = SSDU_HOLDOUT
    return finish(images, problem, config, label, prior, info, trace, fits)
