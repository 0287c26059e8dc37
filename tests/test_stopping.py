"""Early stopping on a validation loss: the callback's contract and the unrolled engine's validation split."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from semrecon_core.backbones.unet import UNetSpec
from semrecon_core.backbones.unrolled import UnrolledNet, ssdu_split
from semrecon_core.config import ReconConfig
from semrecon_core.engines import get_engine
from semrecon_core.engines.base import ReconProblem, ReconResult
from semrecon_core.pipeline import prepare_problem, reconstruct
from semrecon_core.priors.factory import build_prior
from semrecon_core.solvers.adam import adam_fit
from semrecon_core.solvers.stopping import EarlyStopping
from tests.helpers import phantom_scan


def test_stops_after_patience_and_restores_the_best_weights() -> None:
    """The fit drives p toward 2 while the validation loss is lowest at p = 1: the kept weights are those at p ≈ 1."""
    module = nn.Module()
    module.p = nn.Parameter(torch.zeros(()))

    def closure() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = (module.p - 2.0) ** 2
        return module.p, {"loss": loss}

    stopping = EarlyStopping(module, lambda: float((module.p.detach() - 1.0) ** 2), patience=3)
    outcome = adam_fit(closure, [module.p], lr=0.05, iterations=500, callback=stopping, record_every=5)
    assert outcome.stopped_early
    assert outcome.iterations == stopping.best_iteration + 1 + 3 * 5  # three checks without improvement
    assert float(module.p.detach()) > 1.2  # the loop went on past the validation minimum ...
    stopping.restore()
    assert abs(float(module.p.detach()) - 1.0) < 0.1  # ... and the best check's weights come back
    assert stopping.summary()["checks"] == outcome.iterations // 5


def test_patience_must_be_positive() -> None:
    with pytest.raises(ValueError, match="patience of at least one check, found 0"):
        EarlyStopping(nn.Linear(1, 1), lambda: 0.0, patience=0)


@pytest.mark.parametrize("preset", ["paper", "public-code"])
def test_unrolled_never_trains_on_its_validation_samples(preset: str) -> None:
    """Changing the validation samples changes the validation loss but not one value of the training loss."""
    torch.set_num_threads(1)
    scan, maps = phantom_scan(32, coils=4, acceleration=3, acs=8)
    problem = prepare_problem(scan, maps, torch.device("cpu"))
    config = ReconConfig(backbone="unrolled", prior="tv", preset=preset, iterations=30, validation=0.3).resolved()
    sigma = 0.5 if preset == "public-code" else None  # the hold-out draw of the preset; the validation split is first
    _, validation = ssdu_split(
        problem.mask, holdout=0.3, generator=torch.Generator().manual_seed(config.seed), gaussian_sigma=sigma
    )
    assert 0 < int(validation.sum()) < int(problem.mask.sum())
    perturbed = replace(problem, kspace=problem.kspace + 0.5 * validation.unsqueeze(-3) * problem.kspace.abs().max())

    def run(case: ReconProblem) -> ReconResult:
        torch.manual_seed(0)
        network = UnrolledNet(UNetSpec(width=4, depth=2, residual=True), stages=2, cg_iterations=3)
        return get_engine("unrolled")(case, config, prior=build_prior(config, "cpu"), callback=None, network=network)

    results = [run(problem), run(perturbed)]
    traces = [[r for r in result.trace if "validation" in r] for result in results]
    assert [r["iteration"] for r in traces[0]] == [9, 19, 29]  # a check every 10 iterations
    for first, second in zip(results[0].trace, results[1].trace, strict=True):
        assert (first["data"], first["prior"], first["loss"]) == (second["data"], second["prior"], second["loss"])
    assert all(a["validation"] != b["validation"] for a, b in zip(*traces, strict=True))
    fit = results[0].info["fits"][0]
    best = min(traces[0], key=lambda r: r["validation"])
    assert (fit["best_iteration"], fit["best_validation"]) == (best["iteration"], best["validation"])
    assert (fit["iterations"], fit["stopped"]) == (30, "iterations")


@pytest.mark.parametrize("backbone", ["unet", "inr"])
def test_time_budget_bounds_the_fit_and_shares_it_between_slice_batches(backbone: str) -> None:
    """Far more iterations than 2 s allow: the fit of two slice batches stops at ~1 s each, and says so."""
    torch.set_num_threads(1)
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
