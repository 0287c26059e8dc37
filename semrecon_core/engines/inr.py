"""The SIREN INR engine: a sinusoidal network represents the image and is fitted to the scan.

``paper`` preset: Eq. (7) directly on the SIREN's image. ``public-code`` preset: two phases, as in the
authors' code: phase 1 fits the SIREN with data + 3·TV, phase 2 freezes it and trains a 3-layer CNN
adaptor on its image with data + λ·prior at learning rate 1e-3. The SIREN is ``config.width`` features ×
``config.depth`` layers (default 256 × 8, ω0 = 15).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from semrecon_core.backbones.lora import count_parameters
from semrecon_core.backbones.siren import Adaptor, InrImage, SirenSpec
from semrecon_core.engines.fitting import TraceRecorder, autocast, finish, fit_batch, loss_terms, slice_batches
from semrecon_core.physics.sense import SenseOp
from semrecon_core.priors.tv import TVPrior

if TYPE_CHECKING:
    from semrecon_core.config import ResolvedConfig
    from semrecon_core.engines.base import ReconProblem, ReconResult
    from semrecon_core.priors.base import Prior
    from semrecon_core.solvers.status import Callback

INR_TV_WEIGHT = 3.0  # phase 1 of the public code's INR: L1 + 3·TV
ADAPTOR_LR = 1e-3  # public code's generic Adam step, used for the INR adaptor


def siren_spec(config: ResolvedConfig) -> SirenSpec:
    """The SIREN ``config`` asks for (``width`` features, ``depth`` layers; default the paper's)."""
    default = SirenSpec()
    return SirenSpec(features=config.width or default.features, layers=config.depth or default.layers)


def reconstruct_inr(
    problem: ReconProblem,
    config: ResolvedConfig,
    *,
    prior: Prior | None,
    callback: Callback | None,
    spec: SirenSpec | None = None,
) -> ReconResult:
    """Fit a SIREN to the scan: Eq. (7) directly (``paper``) or the public code's two phases."""
    spec = spec or siren_spec(config)
    two_phase = config.preset == "public-code"
    images: list[torch.Tensor] = []
    trace = TraceRecorder()
    info: dict[str, Any] = {"siren": spec.to_dict(), "form": "two-phase" if two_phase else "eq7"}
    phase1_tv = TVPrior(INR_TV_WEIGHT)
    first_prior: Prior | None = phase1_tv if two_phase else prior
    first_lam = 1.0 if two_phase else float(config.lam)
    for part in slice_batches(problem.kspace.shape[0], config.slice_batch):
        sub = problem.select(part)
        torch.manual_seed(config.seed)
        inr = InrImage((sub.kspace.shape[0], *sub.kspace.shape[-2:]), spec).to(problem.device)
        op = SenseOp(sub.maps, sub.mask)
        measured = sub.kspace * sub.mask.unsqueeze(-3)
        extra = {"slices": [part.start, part.stop]}

        def phase1(
            inr: InrImage = inr, op: SenseOp = op, measured: torch.Tensor = measured
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            image = inr()
            return image, loss_terms(image, op, measured, config, first_prior, lam=first_lam)

        fit_batch(
            phase1,
            list(inr.parameters()),
            lr=float(config.lr),
            config=config,
            prior=first_prior,
            callback=callback,
            trace=trace,
            description=f"INR slices {part.start}-{part.stop - 1}",
            extra={**extra, "phase": 1},
        )
        with torch.no_grad():
            image = inr().detach()
        if two_phase:
            info.setdefault("phase1_label", phase1_tv.label)
            torch.manual_seed(config.seed)
            adaptor = Adaptor().to(problem.device)

            def phase2(
                adaptor: Adaptor = adaptor,
                op: SenseOp = op,
                measured: torch.Tensor = measured,
                base: torch.Tensor = image,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                with autocast(problem.device, config):
                    refined = adaptor(base)
                return refined, loss_terms(refined, op, measured, config, prior)

            fit_batch(
                phase2,
                list(adaptor.parameters()),
                lr=ADAPTOR_LR,
                config=config,
                prior=prior,
                callback=callback,
                trace=trace,
                description=f"INR adaptor slices {part.start}-{part.stop - 1}",
                extra={**extra, "phase": 2},
            )
            with torch.no_grad(), autocast(problem.device, config):
                image = adaptor(image).detach().to(torch.complex64)
        images.append(image)
    info["trainable_parameters"] = count_parameters(InrImage((1, 2, 2), spec))["trainable"]
    name = "SIREN INR (two-phase, adaptor)" if two_phase else "SIREN INR"
    return finish(images, problem, config, name, prior, info, trace.records)
