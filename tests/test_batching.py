"""Slice batches: a fixed ``slice_batch``, every slice on the CPU, and the batch sized from measured CUDA memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semrecon_core.config import ReconConfig
from semrecon_core.data.simulate import simulate_kspace
from semrecon_core.engines.batching import GIB, HEADROOM, batch_for_memory, plan_slice_batch, slice_batches
from semrecon_core.pipeline import Pipeline


def test_slice_batches_cover_every_slice_once() -> None:
    assert slice_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert slice_batches(5, 0) == [slice(0, 5)]


def test_batch_for_memory_keeps_the_projected_peak_within_the_headroom() -> None:
    # 1 GiB per slice (2.5 − 1.5) and 0.5 GiB fixed: (0.85 · 10 − 0.5) / 1 = 8 slices
    plan = batch_for_memory(35, free_bytes=10 * GIB, one_slice_bytes=int(1.5 * GIB), two_slice_bytes=int(2.5 * GIB))
    assert plan.size == 8
    assert 0.5 * GIB + 8 * GIB <= HEADROOM * 10 * GIB < 0.5 * GIB + 9 * GIB
    assert "8 of 35 slices" in plan.reason and "1.00 GiB per slice" in plan.reason
    # never more than the volume, never fewer than one
    assert batch_for_memory(3, free_bytes=100 * GIB, one_slice_bytes=GIB, two_slice_bytes=2 * GIB).size == 3
    assert batch_for_memory(3, free_bytes=GIB, one_slice_bytes=4 * GIB, two_slice_bytes=8 * GIB).size == 1


def _volume(slices: int, n: int) -> np.ndarray:
    """``slices`` Shepp-Logan slices of ``n``², each shifted by a pixel more (distinct slices)."""
    import sigpy

    base = np.abs(sigpy.shepp_logan((n, n))).astype(np.float32)
    return np.stack([np.roll(base, k, axis=1) for k in range(slices)])


def _problem_fit(config: ReconConfig) -> dict:
    image = _volume(3, 64)
    kspace = simulate_kspace(image, coils=4, acceleration=2, acs_width=16, mask_kind="gaussian", seed=0)
    recon = Pipeline(config).run(kspace)
    return recon.result.info


@pytest.mark.parametrize(("slice_batch", "batches", "reason"), [(0, 1, "all slices"), (2, 2, "slice_batch 2 (set)")])
def test_the_fit_records_its_batch_and_why(slice_batch: int, batches: int, reason: str) -> None:
    config = ReconConfig(
        backbone="unet",
        prior="tv",
        iterations=2,
        width=8,
        depth=2,
        calib_width=16,
        slice_batch=slice_batch,
        device="cpu",
    )
    fits = _problem_fit(config)["fits"]
    assert len(fits) == batches
    assert all(fit["slice_batch"].startswith(reason) for fit in fits)


@pytest.mark.cuda
def test_on_cuda_the_batch_is_sized_from_measured_memory() -> None:
    config = ReconConfig(
        backbone="unet", prior="tv", iterations=2, width=8, depth=2, calib_width=16, slice_batch=0, device="cuda"
    )
    fits = _problem_fit(config)["fits"]
    assert fits[0]["slice_batch"].startswith("memory:") and "3 of 3 slices" in fits[0]["slice_batch"], fits[0]


def _fake_cuda_problem(slices: int):
    """A stand-in for a problem on a CUDA device: only what the planner reads (no CUDA needed)."""
    from types import SimpleNamespace

    problem = SimpleNamespace(kspace=torch.zeros(slices, 1, 4, 4), device=torch.device("cuda"))
    problem.select = lambda part: SimpleNamespace(n=len(range(*part.indices(slices))))
    return problem


def test_the_planner_sizes_from_its_measurements_and_falls_back_to_one_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    from semrecon_core.engines import batching

    calls: list[int] = []

    def measured(batch, base, sub) -> int:  # 1 GiB per slice on top of 0.5 GiB; the first call (warm-up) costs more
        calls.append(sub.n)
        return int((3.0 if len(calls) == 1 else 0.5 + sub.n) * GIB)

    network = torch.nn.Linear(1024, 1024)  # 4 MiB of trainable weights: 8 MiB of Adam moments
    config = ReconConfig(backbone="unet", slice_batch=0).resolved()
    monkeypatch.setattr(batching, "step_peak_bytes", measured)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GIB, 80 * GIB))
    plan = plan_slice_batch(_fake_cuda_problem(35), config, network, batch=None)
    assert calls == [1, 1, 2]  # warm-up, one slice, two slices
    assert plan.size == 7 and "7 of 35 slices" in plan.reason  # (0.85 · 10 − 0.5 − 0.008) / 1 = 7.99

    def out_of_memory(batch, base, sub) -> int:
        if sub.n == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return GIB

    monkeypatch.setattr(batching, "step_peak_bytes", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    plan = plan_slice_batch(_fake_cuda_problem(35), config, network, batch=None)
    assert plan.size == 1 and "ran out of memory" in plan.reason
