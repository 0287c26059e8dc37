"""What the deep engines share: the scan-specific objective of Eq. (7) and the loop over slice batches.

``min_θ  D(A f_θ(x₀), y) + λ · R(f_θ(x₀))`` where ``A = M F C`` is the SENSE operator of the scan, ``y``
the measured k-space (scaled so that the zero-filled image has max magnitude 1), ``D`` the data term of the
preset (:mod:`semrecon_core.engines.objective`) and ``R`` the prior. Slices are fitted in batches of
``config.slice_batch`` (0 = as many as the device holds: :mod:`semrecon_core.engines.batching`), each batch from
the same initial weights, by
:func:`semrecon_core.solvers.adam.adam_fit` with the Adam of the preset (:func:`adam_schedule`).

Adam's second-moment decay β₂ per preset (``ADAM_BETAS``): ``public-code`` keeps PyTorch's (0.9, 0.999) as the
authors do. Under their L1 data term the gradient norm stays within a few × of its start. Under the ``paper``
preset's quadratic data term it falls with the residual, by about 10³ over the first few hundred iterations of a
randomly initialised network (U-Net, 128² knee: ‖g‖ 3.7 → 0.0006 by iteration 400), so with β₂ = 0.999 the
second moment, an average over ~1000 iterations, still holds the early gradients: the steps shrink to ~1 % of
the learning rate (‖g‖/√v̂ ≈ 0.003–0.01, against 0.2–0.8 under the L1) and the fit stalls short of the
objective's minimum. β₂ = 0.99 (a ~100-iteration memory) lets the step follow the gradient scale
(benchmarks/results/backbones_defaults.md).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from semrecon_core.engines.base import ReconProblem, ReconResult
from semrecon_core.engines.batching import Batch, plan_slice_batch, slice_batches
from semrecon_core.engines.objective import L1Reduction, data_term
from semrecon_core.physics.sense import SenseOp
from semrecon_core.solvers.adam import AdamSchedule, Closure, adam_fit
from semrecon_core.solvers.budget import TimeBudget
from semrecon_core.solvers.cg import conjugate_gradient
from semrecon_core.solvers.status import Callback, SolverStatus, chain

if TYPE_CHECKING:
    from collections.abc import Sequence

    from semrecon_core.config import Preset, ResolvedConfig
    from semrecon_core.priors.base import Prior

ADAM_BETAS: dict[str, tuple[float, float]] = {"paper": (0.9, 0.99), "public-code": (0.9, 0.999)}
"""Adam's (β₁, β₂) per preset (see the module docstring)."""


def adam_schedule(groups: Sequence[tuple[Sequence[nn.Parameter], float]], preset: Preset) -> AdamSchedule:
    """Adam with the preset's betas and the authors' ``StepLR(1000, 0.5)``, one group per ``(parameters, lr)``."""
    return AdamSchedule.create(groups, betas=ADAM_BETAS[preset])


CHECK_EVERY = 1
"""Iterations between two checks of a fit's time budget: every one, so a fit overruns its share by at most one
iteration (one host synchronisation per iteration, small beside an iteration's encoder passes)."""


def loss_terms(
    image: torch.Tensor,
    op: SenseOp,
    measured: torch.Tensor,
    config: ResolvedConfig,
    prior: Prior | None,
    *,
    lam: float | None = None,
    reduction: L1Reduction = "whole",
) -> dict[str, torch.Tensor]:
    """``{"data", "prior", "loss"}`` of an image against the measured samples of ``op``'s mask."""
    image = image.to(torch.complex64)
    data = data_term(op(image), measured, op.mask, preset=config.preset, reduction=reduction)
    if prior is None:
        return {"data": data, "loss": data}
    value = prior.loss(image)
    weight = float(config.lam if lam is None else lam)
    return {"data": data, "prior": value, "loss": data + weight * value}


def final_data_consistency(
    image: torch.Tensor, kspace: torch.Tensor, op: SenseOp, *, weight: float, iterations: int = 20
) -> torch.Tensor:
    """``argmin_x ‖A x − y‖² + weight·‖x − image‖²`` by conjugate gradient from zero (the authors' soft step).

    A small ``weight`` reproduces the measured samples (up to the conditioning of ``A``) and keeps the network's
    image in the unmeasured part; the authors' saved outputs use 0.5 (U-Net) and 0.05 (INR).
    """
    measured = kspace * op.mask.unsqueeze(-3)
    with torch.no_grad():
        return conjugate_gradient(op.normal, op.adjoint(measured) + weight * image, lam=weight, max_iter=iterations)


def autocast(device: torch.device, config: ResolvedConfig) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA when configured (never on CPU, where it is slow and changes results)."""
    if device.type == "cuda" and config.autocast == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class TraceRecorder:
    """A callback that keeps every status as a trace record."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __call__(self, status: SolverStatus) -> None:
        """Keep ``status.record()``."""
        self.records.append(status.record())


def fit_batch(
    closure: Closure,
    parameters: list[nn.Parameter],
    *,
    lr: float,
    config: ResolvedConfig,
    prior: Prior | None,
    callback: Callback | None,
    trace: TraceRecorder,
    description: str,
    extra: dict[str, Any],
    schedule: AdamSchedule | None = None,
    budget: TimeBudget | None = None,
) -> dict[str, Any]:
    """One Adam fit of ``closure`` with the prior's trace extras and the trace recorder chained to ``callback``.

    Without ``schedule``: a new :func:`adam_schedule` of the trainable ``parameters`` at ``lr``. ``budget`` is
    checked every :data:`CHECK_EVERY` iterations. Returns ``extra`` with the iterations run and why the fit
    stopped (``iterations``, ``time budget`` or ``callback``) and the loop's wall time (``seconds``).
    """
    trainable = [p for p in parameters if p.requires_grad]
    if schedule is None and trainable:
        schedule = adam_schedule([(trainable, lr)], config.preset)
    within_budget = None if budget is None else budget.part()
    started = time.perf_counter()
    outcome = adam_fit(
        closure,
        parameters,
        lr=lr,
        iterations=int(config.iterations),
        callback=chain([within_budget, trace, callback]),
        describe=None if prior is None else prior.status,
        extra=extra,
        description=description,
        record_every=None if budget is None else CHECK_EVERY,
        schedule=schedule,
    )
    reason = "iterations"
    if outcome.stopped_early:
        reason = "time budget" if within_budget is not None and within_budget.spent else "callback"
    seconds = time.perf_counter() - started
    return {**extra, "iterations": outcome.iterations, "stopped": reason, "seconds": seconds}


def time_budget(config: ResolvedConfig, fits: int, *, started: float | None = None) -> TimeBudget | None:
    """The wall-clock budget of ``config.time_budget_s`` shared by ``fits`` consecutive fits (``None``: no budget).

    ``started``: when the budget began (``time.monotonic()``; default now), e.g. before planning the batches.
    """
    return TimeBudget(config.time_budget_s, fits, started=started) if config.time_budget_s > 0 else None


def fit_network(
    problem: ReconProblem,
    config: ResolvedConfig,
    base: nn.Module,
    *,
    prior: Prior | None,
    callback: Callback | None,
    name: str,
    batch: Batch,
) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[dict[str, Any]]]:
    """Fit a copy of ``base`` to each slice batch (sized by :func:`~semrecon_core.engines.batching.plan_slice_batch`).

    Returns the batches' images, the joint trace and one record per batch (:func:`fit_batch`'s, with the batch
    size's reason under ``slice_batch``; its ``seconds`` include the batch's setup, ``setup_seconds``, where a
    start image is computed within the time budget).
    """
    images: list[torch.Tensor] = []
    fits: list[dict[str, Any]] = []
    trace = TraceRecorder()
    started = time.monotonic()  # planning the batches counts against the time budget
    plan = plan_slice_batch(problem, config, base, batch)
    parts = slice_batches(problem.kspace.shape[0], plan.size)
    budget = time_budget(config, len(parts), started=started)
    for part in parts:
        net = copy.deepcopy(base).train()
        setup_started = time.perf_counter()
        fit = batch(net, problem.select(part))  # includes a start image (start=preview / cs-tv), inside the budget
        setup_seconds = time.perf_counter() - setup_started
        record = fit_batch(
            fit.closure,
            list(net.parameters()),
            lr=float(config.lr),
            config=config,
            prior=prior,
            callback=callback,
            trace=trace,
            description=f"{name} slices {part.start}-{part.stop - 1}",
            extra={"slices": [part.start, part.stop]},
            budget=budget,
        )
        fits.append(
            {
                **record,
                "seconds": record["seconds"] + setup_seconds,
                "setup_seconds": setup_seconds,
                "slice_batch": plan.reason,
            }
        )
        with torch.no_grad(), autocast(problem.device, config):
            images.append(fit.final().detach())
    return images, trace.records, fits


def prepare_network(
    network: nn.Module | None,
    config: ResolvedConfig,
    backbone: str,
    default: Callable[[], nn.Module],
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The network to fit, its label and info: a given one, a warm start (LoRA) or a fresh random one."""
    from semrecon_core.backbones.checkpoint import load_backbone
    from semrecon_core.backbones.lora import apply_lora, count_parameters
    from semrecon_core.backbones.unrolled import UnrolledNet

    info: dict[str, Any] = {"warm_start": config.checkpoint, "lora_rank": 0}
    name = {"unet": "U-Net", "unrolled": "unrolled network"}[backbone]
    if config.checkpoint:
        if network is not None:
            raise ValueError("pass either a network or config.checkpoint, not both")
        network, meta = load_backbone(config.checkpoint, backbone)
        info["checkpoint_metadata"] = {k: meta[k] for k in ("architecture", "epochs") if k in meta}
        if config.lora_rank > 0:
            apply_lora(network, config.lora_rank)
            if isinstance(network, UnrolledNet):  # the data-consistency weights keep training
                for weight in network.lams:
                    weight.requires_grad_(True)
            info["lora_rank"] = config.lora_rank
            label = f"{name} (warm start, LoRA rank {config.lora_rank})"
        else:
            label = f"{name} (warm start, all weights trained)"
    else:
        torch.manual_seed(config.seed)
        network = network if network is not None else default()
        label = f"{name} (random init, all weights trained)"
    counts = count_parameters(network)
    info["trainable_parameters"] = counts["trainable"]
    info["total_parameters"] = counts["total"]
    return network, label, info


def finish(
    images: list[torch.Tensor],
    problem: ReconProblem,
    config: ResolvedConfig,
    label: str,
    prior: Prior | None,
    info: dict[str, Any],
    trace: list[dict[str, Any]],
    fits: list[dict[str, Any]],
) -> ReconResult:
    """Join the batches, apply the optional final data consistency, zero pixels outside the maps' support.

    ``fits``: one record per fit (:func:`fit_batch`), kept in ``info["fits"]``.
    """
    image = torch.cat(images, dim=0).to(torch.complex64)
    op = SenseOp(problem.maps, problem.mask)
    if config.final_dc > 0:
        image = final_data_consistency(image, problem.kspace, op, weight=config.final_dc)
    # pixels where no coil is sensitive (ESPIRiT crops its maps) are not determined by the data: zero them
    support = problem.maps.abs().square().sum(dim=1) > 0
    image = image * support
    measured = problem.kspace * problem.mask.unsqueeze(-3)
    info = {
        **info,
        "iterations": config.iterations,
        "fits": fits,
        "final_dc": config.final_dc,
        "pixels_outside_maps": int((~support).sum()),
        "data_residual": float((op(image) - measured).norm() / measured.norm().clamp_min(1e-12)),
    }
    prior_label = "no prior" if prior is None else prior.label
    return ReconResult(image=image, label=f"{label} + {prior_label}", info=info, trace=trace)
