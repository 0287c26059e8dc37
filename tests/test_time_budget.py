"""The time budget of a fit: a bound on the wall time, shared by the fits of one reconstruction."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from semrecon_core.config import ReconConfig
from semrecon_core.pipeline import reconstruct
from tests.helpers import phantom_scan


@pytest.mark.parametrize("backbone", ["unet", "inr"])
def test_time_budget_bounds_the_fit_and_shares_it_between_slice_batches(backbone: str) -> None:
    """Far more iterations than 2 s allow: the fit of two slice batches stops at ~1 s each, and says so."""
    scan, maps = phantom_scan(32, coils=4, acceleration=3, acs=8)
    two_slices = replace(
        scan,
        data=scan.data.repeat(2, 1, 1, 1),
        mask=scan.mask.repeat(2, 1, 1),
        calibration=scan.calibration.repeat(2, 1, 1, 1),
        ground_truth=scan.ground_truth.repeat(2, 1, 1),
    )
    config = ReconConfig(
        backbone=backbone,
        prior="tv",
        iterations=100_000,
        time_budget_s=2.0,
        slice_batch=1,
        width=8,
        depth=2,
        device="cpu",
    )
    started = time.perf_counter()
    result = reconstruct(two_slices, config, maps=maps.repeat(2, 1, 1, 1)).result
    seconds = time.perf_counter() - started
    assert seconds < 2.0 + 1.5, f"{backbone}: a 2 s budget took {seconds:.1f} s"
    fits = result.info["fits"]
    assert [f["slices"] for f in fits] == [[0, 1], [1, 2]]
    assert all(f["stopped"] == "time budget" and 0 < f["iterations"] < 100_000 for f in fits)
    assert 0.5 < fits[0]["iterations"] / fits[1]["iterations"] < 2.0  # an even share, not all on the first batch
