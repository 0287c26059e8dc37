"""Slice batches of a deep fit: how many slices are optimised together.

``config.slice_batch`` > 0 fixes the batch. 0 means as many as the device holds: every slice on the CPU; on CUDA
the batch is sized from measured memory. After one discarded warm-up step (one-time allocations such as library
workspaces), one fit step on one slice and one on two slices (each from a fresh copy of the network) give the
footprint per slice and the fixed part (network copy, gradients, workspace), to which Adam's two moment buffers
are added; the batch is the largest that keeps the projected peak under :data:`HEADROOM` of the memory free.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from semrecon_core.config import ResolvedConfig
    from semrecon_core.engines.base import ReconProblem
    from semrecon_core.solvers.adam import Closure

HEADROOM = 0.85
"""Fraction of the free device memory a slice batch may take (the rest absorbs fragmentation and the images)."""
GIB = 2**30


@dataclass
class BatchFit:
    """How to fit one slice batch: the training closure and the final image."""

    closure: Closure
    final: Callable[[], torch.Tensor]


Batch = Callable[["nn.Module", "ReconProblem"], BatchFit]
"""``batch(network, sub_problem) -> BatchFit`` of one slice batch."""


@dataclass(frozen=True)
class BatchPlan:
    """The slice batch of a fit and why: ``size`` slices per batch, ``reason`` in words (for the fit's record)."""

    size: int
    reason: str


def slice_batches(slices: int, batch: int) -> list[slice]:
    """Consecutive slice ranges of at most ``batch`` slices (0: one range of all)."""
    step = slices if batch <= 0 else batch
    return [slice(start, min(start + step, slices)) for start in range(0, slices, step)]


def batch_for_memory(
    slices: int, *, free_bytes: int, one_slice_bytes: int, two_slice_bytes: int, state_bytes: int = 0
) -> BatchPlan:
    """The largest batch whose projected peak, ``fixed + n · per_slice``, stays within ``HEADROOM · free_bytes``.

    ``one_slice_bytes`` / ``two_slice_bytes``: measured peaks of one fit step on one and on two slices;
    ``state_bytes``: what the fit holds beyond a step (the optimiser's state), added to the fixed part. At least one
    slice (a batch of one that does not fit fails as it would have), at most ``slices``.
    """
    per_slice = max(two_slice_bytes - one_slice_bytes, 1)
    fixed = max(one_slice_bytes - per_slice, 0) + state_bytes
    size = int((HEADROOM * free_bytes - fixed) // per_slice)
    size = min(max(size, 1), slices)
    reason = (
        f"memory: {free_bytes / GIB:.1f} GiB free, {per_slice / GIB:.2f} GiB per slice + {fixed / GIB:.2f} GiB "
        f"fixed (measured) → {size} of {slices} slices per batch"
    )
    return BatchPlan(size, reason)


def step_peak_bytes(batch: Batch, base: nn.Module, sub: ReconProblem) -> int:
    """Peak CUDA memory (bytes above what was allocated before) of one fit step on ``sub`` from a copy of ``base``."""
    device = sub.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    net = copy.deepcopy(base).train()
    _, terms = batch(net, sub).closure()
    terms["loss"].backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del net, terms
    torch.cuda.empty_cache()
    return int(peak)


def plan_slice_batch(
    problem: ReconProblem,
    config: ResolvedConfig,
    base: nn.Module,
    batch: Batch,
) -> BatchPlan:
    """The slice batch of a fit of ``problem`` (see the module docstring)."""
    slices = int(problem.kspace.shape[0])
    if config.slice_batch > 0:
        return BatchPlan(min(config.slice_batch, slices), f"slice_batch {config.slice_batch} (set)")
    if problem.device.type != "cuda" or slices == 1:
        return BatchPlan(slices, "all slices (slice_batch 0)")
    step_peak_bytes(batch, base, problem.select(slice(0, 1)))  # warm-up: one-time allocations stay out of the rest
    one = step_peak_bytes(batch, base, problem.select(slice(0, 1)))
    try:
        two = step_peak_bytes(batch, base, problem.select(slice(0, 2)))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return BatchPlan(1, f"memory: a step on two slices ran out of memory → 1 of {slices} slices per batch")
    free, _ = torch.cuda.mem_get_info(problem.device)
    adam = 2 * sum(p.numel() * p.element_size() for p in base.parameters() if p.requires_grad)  # exp_avg, exp_avg_sq
    return batch_for_memory(slices, free_bytes=int(free), one_slice_bytes=one, two_slice_bytes=two, state_bytes=adam)
