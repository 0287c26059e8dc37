"""``semrecon demo``: CG-SENSE, compressed-sensing TV and a deep backbone with the semantic prior, side by side.

The scan is simulated from the built-in anatomy (``semrecon_core.data.simulate``: 8 birdcage coils, smooth
phase, noise, the paper's 1-D Gaussian mask at R = 4). Every method runs through the one
:class:`~semrecon_core.pipeline.Pipeline`: coil maps are estimated once (ESPIRiT) and shared, so the methods
differ only in their configuration; on CPU the deep network is smaller (``config.width`` / ``depth``,
:data:`CPU_NETWORK`). The semantic prior uses Janus-Pro-1B when its weights are available locally (or downloads
them with ``--allow-download``); otherwise the demo says so loudly and runs with a tiny RANDOM-WEIGHT Janus
built offline, labelled as such in the figure, the table and the image comments. Its embedding bank is built
from the simulated scan: the fully sampled image as positive, zero-filled reconstructions at R ∈ [3, 8] as
negatives.

Outputs in ``--out``: ``comparison.png``, ``metrics.md``, ``metrics.json``, ``images.h5`` (ISMRMRD images, one
series per method) and the bank (``bank.safetensors``) — all written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from semrecon_core.config import ReconConfig, ResolvedConfig
    from semrecon_core.data.kspace import KSpace

DEMO_BACKBONES = ("unet", "unrolled", "inr")
# (config.width, config.depth) of the deep network on CPU, small enough for minutes: U-Net / unrolled denoiser
# channels and levels, SIREN features and layers. On CUDA the paper's sizes.
CPU_NETWORK: dict[str, tuple[int, int]] = {"unet": (16, 4), "unrolled": (16, 4), "inr": (128, 5)}
REAL_WEIGHTS_HINT = (
    "To use the real model: put a converted Janus-Pro-1B checkpoint (safetensors) in the HuggingFace cache, or "
    "pass --encoder /path/to/Janus-Pro-1B, or allow the download once with --allow-download "
    "(deepseek-community/Janus-Pro-1B)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``semrecon demo``."""
    parser.add_argument("--out", default="semrecon-demo", help="output directory (created; default semrecon-demo)")
    parser.add_argument("--fast", action="store_true", help="small scan and few iterations (smoke run, ~1 min)")
    parser.add_argument(
        "--backbone",
        choices=DEMO_BACKBONES,
        default="inr",
        help="deep backbone (default inr: a scan-specific SIREN needs no warm start; unet/unrolled trained "
        "from scratch fit noise without a pretrained checkpoint)",
    )
    parser.add_argument("--iterations", type=int, default=None, help="iterations of the deep backbone")
    parser.add_argument("--size", type=int, default=None, help="image size (default 128, --fast 64)")
    parser.add_argument("--encoder", default=None, help="Janus checkpoint (HF id or directory); default Janus-Pro-1B")
    parser.add_argument("--allow-download", action="store_true", help="allow fetching the encoder from the hub")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _loud(text: str) -> None:
    bar = "!" * 100
    _say(f"\n{bar}\n{text}\n{bar}\n")


def choose_encoder(name: str, allow_download: bool, out: Path) -> tuple[str, bool]:
    """``(checkpoint, is_random)``: the real encoder when available, else a tiny random Janus in ``out``."""
    from semrecon_core.encoders.loading import EncoderUnavailable, resolve_checkpoint

    try:
        return str(resolve_checkpoint(name, allow_download=allow_download)), False
    except EncoderUnavailable as exc:
        from semrecon_core.encoders.tiny import build_tiny_janus

        _loud(
            f"The semantic encoder '{name}' is not available here ({exc}).\n"
            "The demo continues with a TINY JANUS WITH RANDOM WEIGHTS: its 'semantic' result shows that the\n"
            "pipeline runs, NOT what the paper's prior does. Every output is labelled RANDOM WEIGHTS.\n"
            + REAL_WEIGHTS_HINT
        )
        directory = out / "tiny-janus-random"
        if not (directory / "config.json").is_file():
            build_tiny_janus(directory, overwrite=True)
        return str(directory), True


def build_demo_bank(kspace: KSpace, out: Path, config: ResolvedConfig) -> Path:
    """Embedding bank from the simulated scan: fully sampled positive, zero-filled negatives at R ∈ [3, 8].

    Encoder, layers, similarity, level weights, device and seed come from the resolved semantic ``config``.
    """
    import numpy as np
    import torch

    from semrecon_core.encoders.janus import JanusImageEncoder
    from semrecon_core.physics.fft import fft2c
    from semrecon_core.pipeline import resolve_device
    from semrecon_core.priors.bank import bank_from_features, embed_images
    from semrecon_core.priors.bank_sources import Source, undersampled_versions

    encoder = JanusImageEncoder.from_pretrained(
        config.encoder,
        layers=config.layers,
        device=resolve_device(config.device),
        autocast=config.autocast == "bfloat16",
    )
    if kspace.ground_truth is None:
        raise ValueError(f"{kspace.source}: the demo bank needs the simulation's ground truth")
    truth = kspace.ground_truth.to(torch.complex64)
    source = Source(images=truth, kspace=fft2c(truth).unsqueeze(1), sha256="", path=Path("simulated"))
    rng = np.random.default_rng(config.seed)
    negatives = [image for repeat in range(3) for image, _ in undersampled_versions(source, rng, acs_width=8)]
    positives = list(truth.split(1))
    bank = bank_from_features(
        embed_images(encoder, positives),
        embed_images(encoder, negatives),
        identity=encoder.identity,
        similarity=config.similarity,
        weights=config.level_weights,
        extra={
            "sources": [{"role": "positive", "path": "simulated demo scan (fully sampled)"}],
            "negatives": "simulated: zero-filled, gaussian 1-D mask, R~U[3,8]",
            "seed": config.seed,
        },
    )
    return bank.save(out / "bank.safetensors")


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
    return f"U-Net width {config.width}, depth {config.depth} (CPU demo size; the paper's on CUDA)"


def run(args: argparse.Namespace) -> int:
    """Simulate, reconstruct three ways, write figure, table and images."""
    from semrecon_core.config import ReconConfig
    from semrecon_core.data.simulate import builtin_anatomy, simulate_kspace
    from semrecon_core.pipeline import Pipeline, resolve_device

    size = args.size or (64 if args.fast else 128)
    iterations = args.iterations if args.iterations is not None else (8 if args.fast else 300)
    if size < 32:
        raise ValueError(f"--size: expected at least 32 pixels, found {size}")
    if iterations < 1:
        raise ValueError(f"--iterations: expected at least 1, found {iterations}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    acs = 24 if size >= 128 else 12
    kspace = simulate_kspace(
        builtin_anatomy((size, size)),
        coils=8,
        acceleration=4,
        acs_width=acs,
        mask_kind="gaussian",
        seed=args.seed,
    )
    _say(f"scan: {kspace.source}, {acs} ACS lines; coil maps by ESPIRiT")
    classical = ReconConfig(backbone="sense", calib_width=acs, device=args.device, seed=args.seed)
    maps = Pipeline(classical).estimate_maps(kspace)

    encoder_name = args.encoder or ReconConfig().encoder
    encoder_dir, random_weights = choose_encoder(encoder_name, args.allow_download, out)
    semantic = classical.replace(
        backbone=args.backbone,
        prior="semantic",
        encoder=encoder_dir,
        iterations=iterations,
        **_network_size(args.backbone, device),
    ).resolved()
    _say("building the embedding bank from the simulated scan ...")
    bank = build_demo_bank(kspace, out, semantic)
    semantic = semantic.replace(bank=str(bank))

    results: list[dict[str, Any]] = [
        {"method": name, "recon": Pipeline(config).run(kspace, maps=maps)}
        for name, config in (
            ("zero-filled", classical.replace(backbone="zero-filled")),
            ("CG-SENSE", classical),
            ("CS-TV", classical.replace(prior="tv")),
        )
    ]

    deep = Pipeline(semantic)
    probe = Pipeline(semantic.replace(iterations=1), prior=deep.prior).run(kspace, maps=maps)
    _say(
        f"deep backbone: {probe.label}; network: {_describe_network(semantic)}; "
        f"{iterations} iterations on {device}: expect about {probe.seconds * iterations:.0f} s "
        f"({probe.seconds:.2f} s per iteration measured)"
    )
    recon = deep.run(kspace, maps=maps)
    if random_weights and "RANDOM" not in recon.label:
        recon.result.label += " RANDOM WEIGHTS"
    results.append(
        {
            "method": f"{args.backbone} + semantic" + (" (RANDOM WEIGHTS)" if random_weights else ""),
            "recon": recon,
            "iterations": iterations,
            "network": _describe_network(semantic),
        }
    )

    rows = _metrics(kspace.ground_truth, results)
    summary = {
        "scan": kspace.source,
        "encoder": encoder_name if not random_weights else f"tiny Janus, RANDOM WEIGHTS ({encoder_dir})",
        "random_weights": random_weights,
        "device": str(device),
        "bank": str(bank),
        "methods": rows,
    }
    if random_weights:
        summary["note"] = "semantic result uses a RANDOM-WEIGHT encoder: pipeline check only. " + REAL_WEIGHTS_HINT
    _write_outputs(out, kspace, results, rows, summary)
    _say(_table(rows, summary))
    if random_weights:
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
            "tenengrad": round(metrics.tenengrad(recon.image), 5),
            "seconds": round(recon.seconds, 2),
        }
        row.update({k: item[k] for k in ("iterations", "network") if k in item})
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        f"Scan: {summary['scan']}; encoder: {summary['encoder']}; device: {summary['device']}",
        "",
        "| method | PSNR (dB) | SSIM | Tenengrad | time (s) | label |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['method']} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | {row['tenengrad']:.5f} | "
        f"{row['seconds']:.1f} | {row['label']} |"
        for row in rows
    ]
    if "note" in summary:
        lines += ["", f"**{summary['note']}**"]
    return "\n".join(lines) + "\n"


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
    _figure(out / "comparison.png", kspace.ground_truth, results, rows)


def _figure(path: Path, truth: Any, results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
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
            f"PSNR {row['psnr_db']:.2f} dB, SSIM {row['ssim']:.3f}",
        )
        for item, row in zip(results, rows, strict=True)
    ]
    figure, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6.8))
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
    if any("RANDOM" in row["label"] for row in rows):
        figure.suptitle("semantic prior with a RANDOM-WEIGHT tiny Janus: pipeline check only", color="red")
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
