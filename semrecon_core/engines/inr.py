"""The SIREN INR engine: one 2-D sinusoidal network per slice represents the image and is fitted to the scan.

``paper`` preset: Eq. (7) directly on the SIREN's image. ``public-code`` preset, as the authors' ``INR_demo.py``:
the SIREN (learning rate ``config.lr``) and the CNN adaptor on its output (learning rate 1e-3) share one Adam and
one ``StepLR(1000, 0.5)``; phase 1 (``iterations`` steps) fits both with L1(SIREN) + L1(adaptor) + 3·TV(SIREN)
+ 3·TV(adaptor), the L1 a mean over the sampled entries; phase 2 (``iterations`` steps) freezes the SIREN and
fits the adaptor with L1 + λ·prior. The SIREN is ``config.width`` features × ``config.depth`` linear layers
(default 256 × 8, ω0 = 15).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from semrecon_core.backbones.lora import count_parameters
from semrecon_core.backbones.siren import Adaptor, InrImage, SirenSpec
from semrecon_core.engines.batching import slice_batches
from semrecon_core.engines.fitting import (
    TraceRecorder,
    adam_schedule,
    autocast,
    finish,
    fit_batch,
    loss_terms,
    time_budget,
)
from semrecon_core.physics.sense import SenseOp
from semrecon_core.priors.tv import TVPrior

if TYPE_CHECKING:
    from semrecon_core.config import ResolvedConfig
    from semrecon_core.engines.base import ReconProblem, ReconResult
    from semrecon_core.priors.base import Prior
    from semrecon_core.solvers.status import Callback

INR_TV_WEIGHT = 3.0  # phase 1 of the public code's INR: L1 + 3·TV on the SIREN and on the adaptor output
ADAPTOR_LR = 1e-3  # the authors' learning rate of the adaptor


def siren_spec(config: ResolvedConfig) -> SirenSpec:
    """The SIREN ``config`` asks for (``width`` features, ``depth`` linear layers; default the paper's)."""
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
    """Fit one SIREN per slice: Eq. (7) directly (``paper``) or the authors' two phases (``public-code``)."""
    spec = spec or siren_spec(config)
    two_phase = config.preset == "public-code"
    images: list[torch.Tensor] = []
    fits: list[dict[str, Any]] = []
    trace = TraceRecorder()
    info: dict[str, Any] = {"siren": spec.to_dict(), "form": "two-phase" if two_phase else "eq7"}
    phase1_tv = TVPrior(INR_TV_WEIGHT, scaling="authors")
    parts = slice_batches(problem.kspace.shape[0], config.slice_batch)
    budget = time_budget(config, len(parts) * (2 if two_phase else 1))
    for part in parts:
        sub = problem.select(part)
        torch.manual_seed(config.seed)
        inr = InrImage((sub.kspace.shape[0], *sub.kspace.shape[-2:]), spec).to(problem.device)
        op = SenseOp(sub.maps, sub.mask)
        measured = sub.kspace * sub.mask.unsqueeze(-3)
        extra = {"slices": [part.start, part.stop]}
        description = f"INR slices {part.start}-{part.stop - 1}"
        if not two_phase:

            def eq7(
                inr: InrImage = inr, op: SenseOp = op, measured: torch.Tensor = measured
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                image = inr()
                return image, loss_terms(image, op, measured, config, prior)

            record = fit_batch(
                eq7,
                list(inr.parameters()),
                lr=config.lr,
                config=config,
                prior=prior,
                callback=callback,
                trace=trace,
                description=description,
                extra=extra,
                budget=budget,
            )
            fits.append(record)
            with torch.no_grad():
                images.append(inr().detach())
            continue
        info.setdefault("phase1_label", phase1_tv.label)
        adaptor = Adaptor().to(problem.device)
        schedule = adam_schedule(
            [(list(inr.parameters()), config.lr), (list(adaptor.parameters()), ADAPTOR_LR)], config.preset
        )
        common: dict[str, Any] = {
            "lr": config.lr,
            "config": config,
            "callback": callback,
            "trace": trace,
            "schedule": schedule,
            "budget": budget,
        }

        def phase1(
            inr: InrImage = inr, adaptor: Adaptor = adaptor, op: SenseOp = op, measured: torch.Tensor = measured
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            base = inr()
            with autocast(problem.device, config):
                refined = adaptor(base).to(torch.complex64)
            first = loss_terms(base, op, measured, config, phase1_tv, lam=1.0, reduction="sampled")
            second = loss_terms(refined, op, measured, config, phase1_tv, lam=1.0, reduction="sampled")
            terms = {name: first[name] + second[name] for name in first}
            return refined, terms

        fits.append(
            fit_batch(
                phase1, [], prior=phase1_tv, description=f"{description} phase 1", extra={**extra, "phase": 1}, **common
            )
        )
        # phase 2 freezes the SIREN: its image is computed once
        inr.requires_grad_(False)
        with torch.no_grad():
            frozen = inr()

        def phase2(
            adaptor: Adaptor = adaptor, op: SenseOp = op, measured: torch.Tensor = measured, base: torch.Tensor = frozen
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with autocast(problem.device, config):
                refined = adaptor(base).to(torch.complex64)
            return refined, loss_terms(refined, op, measured, config, prior, reduction="sampled")

        fits.append(
            fit_batch(
                phase2, [], prior=prior, description=f"{description} phase 2", extra={**extra, "phase": 2}, **common
            )
        )
        with torch.no_grad(), autocast(problem.device, config):
            images.append(adaptor(frozen).detach().to(torch.complex64))
    info["trainable_parameters"] = count_parameters(InrImage((1, 2, 2), spec))["trainable"]
    name = "SIREN INR (two-phase, adaptor)" if two_phase else "SIREN INR"
    return finish(images, problem, config, name, prior, info, trace.records, fits)
