"""The Adam fitting loop: minimise a closure's loss over parameters, reporting one status per iteration.

The loop knows nothing of MRI. ``closure()`` returns ``(output, terms)`` with ``terms["loss"]`` the scalar to
minimise and any other named terms to report. Terms stay on the device and are flushed to the callback, the
progress bar and the log every ``record_every`` iterations, so the loop does not synchronise with the host at
every step. At a flush, ``describe(output)`` (e.g. a prior's embedding) is added to the last status's ``extra``.
A callback that returns ``False`` stops the loop at the end of that flush.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from semrecon_core.solvers.status import Callback, SolverStatus, notify

log = logging.getLogger(__name__)

Closure = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]

STEP_SIZE = 1000  # StepLR period (the authors' code)
STEP_GAMMA = 0.5


def record_interval(iterations: int) -> int:
    """How often terms are flushed: about 30 flushes a run, at least every 50 iterations."""
    return max(1, min(50, math.ceil(iterations / 30)))


def adam_optimizer(
    groups: Sequence[tuple[Sequence[nn.Parameter], float]], *, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Adam:
    """Adam with one parameter group per ``(parameters, learning rate)``, in PyTorch's fused kernel where it applies.

    Fused: real floating-point parameters on one CPU or CUDA device. It computes the per-parameter loop's update (to
    ~3e-8) in 4 aten ops instead of 344 for the U-Net 64/5 with LoRA, 3.8× faster on the CPU
    (``benchmarks/results/optimizer.md``); on a GPU each op saved is a kernel launch saved.
    """
    tensors = [p for params, _ in groups for p in params]
    param_groups = [{"params": list(params), "lr": lr} for params, lr in groups]
    fused = (
        bool(tensors)
        and len({p.device for p in tensors}) == 1
        and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    )
    return torch.optim.Adam(param_groups, betas=betas, fused=fused)


@dataclass
class AdamSchedule:
    """An Adam optimiser with its ``StepLR(1000, 0.5)``; several fits may share one (the INR's two phases)."""

    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.StepLR

    @classmethod
    def create(
        cls, groups: Sequence[tuple[Sequence[nn.Parameter], float]], *, betas: tuple[float, float] = (0.9, 0.999)
    ) -> AdamSchedule:
        """One parameter group per ``(parameters, learning rate)`` (:func:`adam_optimizer`)."""
        optimizer = adam_optimizer(groups, betas=betas)
        return cls(optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=STEP_GAMMA))


@dataclass
class FitOutcome:
    """The detached output of the last iteration and how many iterations ran."""

    output: torch.Tensor
    iterations: int
    stopped_early: bool


def adam_fit(
    closure: Closure,
    parameters: Sequence[nn.Parameter],
    *,
    lr: float,
    iterations: int,
    callback: Callback | None = None,
    describe: Callable[[torch.Tensor], dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    description: str = "fit",
    record_every: int | None = None,
    schedule: AdamSchedule | None = None,
) -> FitOutcome:
    """Adam with ``StepLR(1000, 0.5)`` for at most ``iterations`` steps.

    Args:
        closure: ``() -> (output, terms)``; ``terms["loss"]`` is minimised.
        parameters: the parameters to train (those without ``requires_grad`` are left out).
        lr: learning rate.
        iterations: maximum number of iterations (at least 1).
        callback: receives one :class:`SolverStatus` per iteration (``values``: the terms as floats and, on
            the last status of a flush, ``lr``); ``False`` stops the loop.
        describe: ``output -> dict`` added to the ``extra`` of each flush's last status.
        extra: constant entries of every status's ``extra`` (e.g. the slice range).
        description: names the loop in the progress bar, the log and errors.
        record_every: flush interval (default :func:`record_interval`).
        schedule: an optimiser and scheduler to continue (``parameters`` and ``lr`` are then ignored; parameters
            without ``requires_grad`` get no gradient and stay as they are).
    """
    from tqdm.auto import tqdm

    if schedule is None:
        trainable = [p for p in parameters if p.requires_grad]
        if not trainable:
            raise ValueError(f"{description}: no trainable parameters")
        schedule = AdamSchedule.create([(trainable, lr)])
    if iterations < 1:
        raise ValueError(f"{description}: expected at least one iteration, found {iterations}")
    optimizer, scheduler = schedule.optimizer, schedule.scheduler
    every = record_every or record_interval(iterations)
    pending: list[dict[str, torch.Tensor]] = []
    started = time.perf_counter()
    output = torch.empty(0)
    done = 0
    stop = False
    with tqdm(total=iterations, desc=description, unit="it", disable=None, leave=False) as bar:
        for iteration in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            output, terms = closure()
            terms["loss"].backward()
            optimizer.step()
            scheduler.step()
            pending.append({name: value.detach() for name, value in terms.items()})
            done = iteration + 1
            if len(pending) == every or done == iterations:
                names = list(pending[0])
                rows = torch.stack([torch.stack([r[n].float() for n in names]) for r in pending]).tolist()
                first = done - len(pending)
                for k, row in enumerate(rows):
                    last = k == len(rows) - 1
                    values = dict(zip(names, row, strict=True))
                    status_extra = dict(extra or {})
                    if last:
                        values["lr"] = scheduler.get_last_lr()[0]
                        if describe is not None:
                            with torch.no_grad():
                                status_extra.update(describe(output.detach()))
                    status = SolverStatus(first + k, output.detach() if last else None, values, status_extra)
                    stop = notify(callback, status) or stop
                bar.update(len(pending))
                bar.set_postfix({n: f"{v:.4g}" for n, v in zip(names, rows[-1], strict=True)}, refresh=False)
                eta = (time.perf_counter() - started) / done * (iterations - done)
                log.info(
                    "%s: iteration %d/%d %s (eta %.0f s)",
                    description,
                    done,
                    iterations,
                    " ".join(f"{n}={v:.4g}" for n, v in zip(names, rows[-1], strict=True)),
                    eta,
                )
                pending = []
                if stop:
                    break
    return FitOutcome(output=output.detach(), iterations=done, stopped_early=stop and done < iterations)
