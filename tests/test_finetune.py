"""Scan-specific fitting (Eq. 7) of the U-Net, unrolled network and SIREN INR on a small simulated case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from semrecon_core import metrics
from semrecon_core.backbones.checkpoint import save_checkpoint
from semrecon_core.backbones.siren import SirenSpec
from semrecon_core.backbones.unet import UNet, UNetSpec
from semrecon_core.backbones.unrolled import UnrolledNet
from semrecon_core.config import ConfigError, ReconConfig
from semrecon_core.data.simulate import coil_maps, simulate_kspace
from semrecon_core.engines import get_engine
from semrecon_core.engines.base import ReconResult
from semrecon_core.engines.fitting import final_data_consistency
from semrecon_core.physics.sense import SenseOp
from semrecon_core.pipeline import prepare_problem, reconstruct
from semrecon_core.priors.base import Prior
from semrecon_core.priors.factory import build_prior
from semrecon_core.solvers.status import Callback, SolverStatus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 48


def fit(problem, config: ReconConfig, *, prior: Prior | None = None, callback: Callback | None = None, **network):
    """Run the engine of ``config.backbone`` on ``problem`` (TV prior built when ``config.prior`` is tv)."""
    config = config.resolved()
    if prior is None and config.prior == "tv":
        prior = build_prior(config, "cpu")
    engine = get_engine(config.backbone)
    result: ReconResult = engine(problem, config, prior=prior, callback=callback, **network)
    return result


@pytest.fixture(scope="module")
def case():
    """Smooth Shepp–Logan 48², 8 coils, R = 4 paper-code Gaussian 1-D mask with 8 ACS lines; true maps."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    kspace = simulate_kspace(resize(shepp_logan_phantom(), (SIZE, SIZE)), coils=8, acceleration=4, acs_width=8, seed=0)
    maps = torch.from_numpy(coil_maps(8, tuple(kspace.data.shape[-2:])))[None]
    problem = prepare_problem(kspace, maps, torch.device("cpu"))
    zero_filled = reconstruct(kspace, ReconConfig(backbone="zero-filled"), maps=maps).image
    return kspace, maps, problem, metrics.psnr(kspace.ground_truth, zero_filled)


def _psnr(case, result) -> float:
    kspace, _, problem, _ = case
    return metrics.psnr(kspace.ground_truth, result.image * problem.scale)


@pytest.mark.parametrize(
    ("backbone", "iterations", "lr", "network"),
    [
        ("unet", 250, 3e-3, lambda: {"network": UNet(UNetSpec(width=8, depth=3))}),
        (
            "unrolled",
            15,
            3e-3,
            lambda: {"network": UnrolledNet(UNetSpec(width=8, depth=3, residual=True), cg_iterations=10)},
        ),
        ("inr", 150, 1e-3, lambda: {"spec": SirenSpec(features=64, layers=4)}),
    ],
)
def test_backbone_with_tv_beats_zero_filled(case, backbone, iterations, lr, network) -> None:
    # the paper preset's TV λ (no override): CS-TV's, on the per-pixel data term and TV
    config = ReconConfig(backbone=backbone, prior="tv", iterations=iterations, lr=lr)
    result = fit(case[2], config, **network())
    gain = _psnr(case, result) - case[3]
    assert gain >= 3.0, f"{backbone} + TV: {gain:.2f} dB over zero-filled"
    assert "TV" in result.label and result.info["data_residual"] < 0.5
    assert len(result.trace) == iterations and {"data", "prior", "loss"} <= set(result.trace[0])


def test_same_seed_same_output_and_trace(case) -> None:
    def net() -> UNet:
        torch.manual_seed(0)
        return UNet(UNetSpec(width=4, depth=2))

    config = ReconConfig(backbone="unrolled", prior="tv", iterations=4, seed=3)
    unrolled = [fit(case[2], config, network=UnrolledNet(net().spec, stages=2, cg_iterations=3)) for _ in range(2)]
    assert torch.equal(unrolled[0].image, unrolled[1].image)  # same SSDU split, same training
    config = config.replace(backbone="unet", iterations=6)
    first = fit(case[2], config, network=net())
    second = fit(case[2], config, network=net())
    assert torch.equal(first.image, second.image)
    assert [r["loss"] for r in first.trace] == [r["loss"] for r in second.trace]
    # without a given network the engine initialises it from config.seed (sized by config.width/depth)
    small = config.replace(iterations=1, width=4, depth=2)
    default = [fit(case[2], small.replace(seed=seed)) for seed in (3, 3, 4)]
    assert torch.equal(default[0].image, default[1].image)
    assert not torch.equal(default[0].image, default[2].image)


def test_entry_point_dispatches_paper_unet_and_slice_batches(case) -> None:
    kspace, maps, _, _ = case
    two = type(kspace)(
        **{
            **kspace.__dict__,
            "data": kspace.data.repeat(2, 1, 1, 1),
            "mask": kspace.mask.repeat(2, 1, 1),
            "calibration": kspace.calibration.repeat(2, 1, 1, 1),
        }
    )
    config = ReconConfig(backbone="unet", prior="none", iterations=2, slice_batch=1, final_dc=1e-3)
    done = reconstruct(two, config, maps=maps.repeat(2, 1, 1, 1))
    assert done.image.shape == (2, *kspace.data.shape[-2:])
    assert done.label.startswith("U-Net (random init") and done.label.endswith("no prior")
    assert done.result.info["total_parameters"] > 30_000_000  # the paper's 64–1024 U-Net
    assert sorted({tuple(r["slices"]) for r in done.result.trace}) == [(0, 1), (1, 2)]
    # the final data-consistency step moves the image towards the measured samples
    plain = reconstruct(two, config.replace(final_dc=0.0), maps=maps.repeat(2, 1, 1, 1))
    assert done.result.info["data_residual"] < 0.5 * plain.result.info["data_residual"]


def test_a_callback_stops_the_fit_early(case) -> None:
    seen: list[int] = []

    def stop_at_two(status: SolverStatus) -> bool:
        seen.append(status.iteration)
        return status.iteration < 2

    # 60 iterations flush every 2: the stop takes effect at the end of the flush holding iteration 2
    config = ReconConfig(backbone="unet", prior="tv", iterations=60, width=4, depth=2)
    result = fit(case[2], config, callback=stop_at_two)
    assert seen == [0, 1, 2, 3] and len(result.trace) == 4


def test_final_data_consistency_moves_towards_the_samples_by_its_weight(case) -> None:
    _, _, problem, _ = case
    op = SenseOp(problem.maps, problem.mask)
    truth = case[0].ground_truth.to(torch.complex64) / problem.scale
    noiseless = op(truth)
    start = truth.roll(3, dims=-1)
    before = (op(start) - noiseless).norm() / noiseless.norm()
    residuals = []
    for weight in (1e-3, 0.05, 0.5):
        image = final_data_consistency(start, noiseless, op, weight=weight)
        residuals.append(float((op(image) - noiseless).norm() / noiseless.norm()))
    assert residuals[0] < 0.05 * before
    assert residuals[0] < residuals[1] < residuals[2] < before  # a softer step keeps more of the network image


def test_start_at_preview_makes_the_first_iterate_the_cg_sense_image(case) -> None:
    _, _, problem, _ = case
    preview = fit(problem, ReconConfig(backbone="sense")).image

    def first_error(config: ReconConfig) -> tuple[float, ReconResult]:
        firsts: list[torch.Tensor] = []

        def keep(status: SolverStatus) -> None:
            if status.solution is not None and not firsts:
                firsts.append(status.solution.detach().clone())

        result = fit(problem, config, callback=keep)
        return float((firsts[0] - preview).norm() / preview.norm()), result

    config = ReconConfig(backbone="unet", prior="tv", iterations=10, lr=3e-3, width=8, depth=3, start="preview")
    anchored_error, anchored = first_error(config)
    plain_error, _ = first_error(config.replace(start="network"))
    assert "started at the preview" in anchored.label
    # the first iterate is the preview (anchored) or the untrained network's output (plain)
    assert anchored_error < 0.02 < 0.5 < plain_error, (anchored_error, plain_error)
    assert not torch.allclose(anchored.image, preview, atol=1e-3)  # the network trains: the fit moves the image
    with pytest.raises(ConfigError, match="'start': 'preview' needs backbone unet, found backbone 'inr'"):
        ReconConfig(backbone="inr", start="preview")


def test_warm_start_lora_trains_adapters_only(case, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UNet(UNetSpec(width=8, depth=3))
    path = save_checkpoint(tmp_path / "unet.safetensors", net, "unet", {"epochs": 0})
    config = ReconConfig(backbone="unet", prior="tv", iterations=4, checkpoint=str(path), lora_rank=2)
    result = fit(case[2], config)
    assert "LoRA rank 2" in result.label
    assert 0 < result.info["trainable_parameters"] < result.info["total_parameters"] // 3
    full = fit(case[2], config.replace(lora_rank=0))
    assert "all weights" in full.label and full.info["trainable_parameters"] == sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match="trained for backbone 'unet', not 'unrolled'"):
        fit(case[2], config.replace(backbone="unrolled"))


def test_inr_public_code_two_phase(case) -> None:
    config = ReconConfig(backbone="inr", prior="tv", preset="public-code", iterations=5)
    result = fit(case[2], config, spec=SirenSpec(features=16, layers=2))
    phases = [r["phase"] for r in result.trace]
    assert phases == [1] * 5 + [2] * 5
    assert "two-phase" in result.label and result.info["phase1_label"] == "TV (weight 3, authors)"
    assert result.info["final_dc"] == 0.05  # the authors' soft data-consistency step


@pytest.fixture(scope="module")
def tiny_semantic_prior(tiny_janus: Path, case):
    from semrecon_core.encoders.janus import JanusImageEncoder
    from semrecon_core.priors.bank import bank_from_features, embed_images
    from semrecon_core.priors.semantic import SemanticPrior

    encoder = JanusImageEncoder.from_pretrained(str(tiny_janus), device="cpu")
    kspace, _, problem, _ = case
    truth = kspace.ground_truth.to(torch.complex64)
    zero_filled = SenseOp(problem.maps, problem.mask).adjoint(problem.kspace)
    rng = np.random.default_rng(0)
    noisy = [truth + 0.2 * torch.from_numpy(rng.standard_normal(truth.shape).astype(np.float32)) for _ in range(2)]
    bank = bank_from_features(
        embed_images(encoder, [truth, truth.flip(-1)]),
        embed_images(encoder, [zero_filled, *noisy]),
        identity=encoder.identity,
        similarity="pooled",
        weights=(0.005, 0.5, 1.0),
    )
    return SemanticPrior(encoder, bank)


def test_semantic_loss_decreases_and_residual_bounded(case, tiny_semantic_prior) -> None:
    prior = tiny_semantic_prior
    encoder_weights = [p.detach().clone() for p in prior.encoder.vision.parameters()]
    seen: list[dict] = []
    config = ReconConfig(backbone="unet", prior="semantic", iterations=30, lam=0.02, lr=3e-3, width=8, depth=3)
    result = fit(case[2], config, prior=prior, callback=lambda status: seen.append(status.record()))
    assert "RANDOM WEIGHTS" in result.label
    losses = [r["prior"] for r in seen]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    data = [r["data"] for r in seen]
    # the data term keeps falling while the prior acts (the random U-Net starts far from the data)
    assert data[-1] < 0.2 * data[0] and np.isfinite(result.info["data_residual"])
    embedded = [r for r in seen if "embedding" in r]
    assert embedded and len(embedded[0]["embedding"]) == 1  # one slice
    # the encoder is frozen: no gradient reached it and its weights are unchanged
    for before, after in zip(encoder_weights, prior.encoder.vision.parameters(), strict=True):
        assert after.grad is None and torch.equal(before, after.detach())


def test_pretrain_cli_writes_checkpoint_the_engine_loads(case, tmp_path: Path) -> None:
    import hashlib
    import json

    from semrecon_core.commands.main import main

    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "a.npy", case[0].ground_truth[0].numpy())
    np.save(images / "b.npy", case[0].ground_truth[0].numpy()[::-1].copy())
    out = tmp_path / "warm.safetensors"
    argv = ["pretrain", str(out), "--images", str(images), "--width", "4", "--depth", "2", "--epochs", "2"]
    assert main([*argv, "--acs-width", "12"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["backbone"] == "unet" and meta["epochs"] == 2 and len(meta["loss_per_epoch"]) == 2
    assert meta["data"][0]["sha256"] == hashlib.sha256((images / "a.npy").read_bytes()).hexdigest()
    assert meta["masks"]["kind"] == "gaussian" and meta["masks"]["acceleration"] == 4.0
    config = ReconConfig(backbone="unet", prior="tv", iterations=3, checkpoint=str(out), lora_rank=2)
    result = fit(case[2], config)
    assert "warm start, LoRA rank 2" in result.label
    assert result.info["checkpoint_metadata"]["architecture"]["width"] == 4
    assert main(["pretrain", str(tmp_path / "x.pt"), "--images", str(images)]) == 2
    assert main(["pretrain", str(tmp_path / "y.safetensors"), "--images", str(tmp_path / "missing")]) == 2


@pytest.fixture(scope="module")
def chain_case():
    """Smooth Shepp–Logan 48² inside its field of view, 8 coils, R = 4 Gaussian 1-D mask, 8 ACS lines; true maps."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    kspace = simulate_kspace(resize(shepp_logan_phantom(), (SIZE, SIZE)), coils=8, acceleration=4, acs_width=8, seed=0)
    maps = torch.from_numpy(coil_maps(8, tuple(kspace.data.shape[-2:])))[None]
    return kspace, prepare_problem(kspace, maps, torch.device("cpu"))


@pytest.mark.parametrize("prior", ["tv", "none"])
def test_chain_recipe_leaves_the_preview_and_improves(chain_case, tmp_path: Path, prior: str) -> None:
    """The shipped chain's recipe (warm start, LoRA 4, ``start=cs-tv``) with TV or no prior beats the preview.

    With ``start=preview`` the same fit stayed within 0.1 dB of the CG-SENSE preview: the network moves the image
    only in smooth directions, which the data pin (``semrecon_core/engines/unet.py``).
    """
    kspace, problem = chain_case

    def psnr(result: ReconResult) -> float:
        return metrics.psnr(kspace.ground_truth, result.image * problem.scale)

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "unet.safetensors", UNet(UNetSpec(width=8, depth=3)), "unet", {"epochs": 0})
    preview = fit(problem, ReconConfig(backbone="sense"))
    cs_tv = fit(problem, ReconConfig(backbone="sense", prior="tv"))
    config = ReconConfig(
        backbone="unet", prior=prior, checkpoint=str(path), lora_rank=4, start="cs-tv", iterations=20, time_budget_s=30
    )
    result = fit(problem, config)
    assert "started at the CS-TV image" in result.label
    moved = float((result.image - preview.image).norm() / preview.image.norm())
    assert moved > 0.02, moved
    assert psnr(result) > psnr(preview) + 1.0, (psnr(result), psnr(preview))
    assert psnr(result) > psnr(cs_tv) - 0.5, (psnr(result), psnr(cs_tv))
