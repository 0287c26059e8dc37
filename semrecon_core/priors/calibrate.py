"""λ calibrated on a site's own held-out images: ``semrecon bank calibrate BANK --images SRC --out CAL``.

A bank's prior is worth its λ only on the images a site scans. The calibration takes fully sampled magnitude images
held out of the bank (anything ``bank build --positives`` reads; a file that is one of the bank's recorded sources is
refused), simulates an undersampled multicoil scan of each as the probe does (:mod:`semrecon_core.priors.probe`:
:func:`~semrecon_core.data.simulate.simulate_kspace`, Gaussian 1-D mask, R = 4, 15 birdcage coils, seed ``seed +
i``), estimates ESPIRiT maps as the chain does (once per image, ``calib_width`` and ``espirit`` of the settings) and
reconstructs it through :class:`~semrecon_core.pipeline.Pipeline` with the settings ``semrecon recon`` would resolve
(backbone, checkpoint, ``--set``; prior ``semantic`` with this bank) at every λ of a grid that always holds 0. Each
reconstruction is scored against the image with HaarPSI (the criterion), PSNR and VIF (recorded).

Calibrate with the iterations the site runs: early in a fit any added gradient (even a bank of noise images') enlarges
Adam's per-parameter second moments and shortens the data term's steps, which can look like help after a few
iterations (``tests/test_calibrate.py`` measured it at 10). The λ with the highest mean HaarPSI wins; a λ > 0 must
beat λ 0 strictly, so a prior that does not help gets λ 0,
which switches it off (the pipeline then neither loads nor runs the encoder and labels the images ``semantic prior
off (calibrated λ 0 on N held-out images ...)``). The result goes into a **new** bank file (the input is never
modified; written atomically): its metadata gain ``recommended.lam[<preset>/<backbone>]`` (which
:func:`semrecon_core.settings.resolve` gives ``recon`` and the chains when λ is not set, with the source
``calibrated on N held-out images (bank PATH)``) and ``calibration[<preset>/<backbone>]``: the grid, per-λ mean and
sd of HaarPSI, PSNR and VIF, per-image scores, the images' names and sha256, the settings and the command.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semrecon_core.config import ReconConfig

if TYPE_CHECKING:
    import torch

DEFAULT_LAMS = (0.0, 1e-4, 4e-4, 1.6e-3)
"""The default λ grid (U-Net + semantic at the paper preset: 0.0016 is the preset's λ)."""
METRICS = ("haarpsi", "psnr", "vif")
"""Scores recorded per reconstruction; the first decides."""
RECORDED_SETTINGS = (
    "backbone",
    "preset",
    "iterations",
    "lr",
    "checkpoint",
    "width",
    "depth",
    "lora_rank",
    "start",
    "final_dc",
    "encoder",
    "layers",
    "level_weights",
    "similarity",
    "tau",
    "hinge",
    "views",
    "calib_width",
    "espirit",
    "device",
    "autocast",
    "seed",
)


@dataclass(frozen=True)
class CalibrationSettings:
    """The grid and how held-out images become scans (as :class:`~semrecon_core.priors.probe.ProbeSettings`).

    Attributes:
        lams: the λ grid; 0 is added when absent.
        acceleration: R of the Gaussian 1-D mask.
        coils: simulated birdcage coils.
        acs_width: fully sampled centre lines; ``None``: the simulator's default.
        size: resize every image to ``size × size`` first; ``None``: keep its size.
        seed: image ``i`` is simulated with seed ``seed + i``.
    """

    lams: tuple[float, ...] = DEFAULT_LAMS
    acceleration: float = 4.0
    coils: int = 15
    acs_width: int | None = None
    size: int | None = None
    seed: int = 0

    def grid(self) -> tuple[float, ...]:
        """The sorted, distinct λ of :attr:`lams` with 0 included."""
        return tuple(sorted({0.0, *(float(v) for v in self.lams)}))

    def check(self) -> None:
        """Raise ``ValueError`` naming the first option out of range."""
        from semrecon_core.priors.probe import ProbeSettings

        ProbeSettings(self.acceleration, self.coils, self.acs_width, self.size, seed=self.seed).check()
        bad = [v for v in self.lams if not (math.isfinite(v) and v >= 0)]
        if not self.lams or bad:
            raise ValueError(f"--lams: expected non-negative finite numbers, found {', '.join(map(str, self.lams))}")


def settings_for(bank: str | Path, config: ReconConfig, metadata: dict[str, Any]) -> ReconConfig:
    """``config`` with the semantic prior of ``bank``; encoder, layers, similarity, weights from the bank if not set.

    Encoder and layers count as not set at their defaults (as ``semrecon bank probe`` configures the prior).

    λ must not be set: the grid sets it.
    """
    if config.lam is not None:
        raise ValueError("--set lam: the calibration sets λ itself (--lams)")
    if config.is_classical:
        raise ValueError(f"--backbone {config.backbone}: the semantic prior needs a deep backbone: unet, unrolled, inr")
    identity = metadata["encoder"]
    changes: dict[str, Any] = {"prior": "semantic", "bank": str(bank)}
    default = ReconConfig()
    if config.encoder == default.encoder:
        changes["encoder"] = str(identity.get("model"))
    if identity.get("kind") == "image":
        if config.layers == default.layers and identity.get("layers"):
            changes["layers"] = tuple(int(layer) for layer in identity["layers"])
        if config.similarity is None:
            changes["similarity"] = metadata["similarity"]
        if config.level_weights is None and metadata.get("weights"):
            changes["level_weights"] = tuple(float(w) for w in metadata["weights"])
    return config.replace(**changes)


@dataclass
class HeldOut:
    """One held-out image: its name, the file it came from (with sha256) and its magnitude."""

    name: str
    path: Path
    sha256: str
    magnitude: np.ndarray


def held_out_images(sources: Sequence[str | Path], metadata: dict[str, Any], size: int | None) -> list[HeldOut]:
    """Every slice of ``sources``; a file whose sha256 is one of the bank's recorded sources is refused."""
    from semrecon_core.priors.bank import file_sha256
    from semrecon_core.priors.bank_sources import expand_sources
    from semrecon_core.priors.probe import read_images

    in_bank = {str(s.get("sha256")): s for s in metadata.get("sources") or [] if isinstance(s, dict)}
    images: list[HeldOut] = []
    for path in expand_sources(sources, "images"):
        digest = file_sha256(path)
        if digest in in_bank:
            raise ValueError(
                f"--images: {path} is the bank's {in_bank[digest].get('role', 'source')} {in_bank[digest].get('path')} "
                "(same sha256); calibrate on images held out of the bank"
            )
        images.extend(HeldOut(name, path, digest, magnitude) for name, magnitude in read_images([path], size))
    if not images:
        raise ValueError("--images: no images to calibrate on")
    return images


def _simulate(image: HeldOut, settings: CalibrationSettings, seed: int) -> Any:
    import dataclasses

    from semrecon_core.priors.probe import simulate_held_out

    return dataclasses.replace(simulate_held_out(image.magnitude, settings, seed), source=image.name)


def _scores(reference: np.ndarray, image: np.ndarray) -> dict[str, float]:
    from semrecon_core import metrics

    return {name: float(getattr(metrics, name)(reference, image)) for name in METRICS}


def choose(summary: Sequence[dict[str, Any]]) -> float:
    """The λ of the highest mean HaarPSI; a larger λ must beat a smaller one strictly (ties keep the smaller)."""
    best = min(summary, key=lambda row: row["lam"])
    for row in sorted(summary, key=lambda row: row["lam"]):
        if row["haarpsi"]["mean"] > best["haarpsi"]["mean"]:
            best = row
    return float(best["lam"])


def run_calibration(
    bank: str | Path,
    sources: Sequence[str | Path],
    config: ReconConfig,
    settings: CalibrationSettings,
    *,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Reconstruct the held-out ``sources`` at every λ of the grid; the calibration record (module docstring)."""
    from semrecon_core.pipeline import Pipeline
    from semrecon_core.priors.bank import read_metadata
    from semrecon_core.settings import resolve

    settings.check()
    started = time.perf_counter()
    metadata = read_metadata(bank)
    config = settings_for(bank, config, metadata)
    grid = settings.grid()
    resolved = resolve(config.replace(lam=grid[-1]))
    images = held_out_images(sources, metadata, settings.size)
    maps_config = ReconConfig(
        calib_width=resolved.calib_width, espirit=resolved.espirit, device=resolved.device, seed=resolved.seed
    )
    pipelines = {lam: Pipeline(config.replace(lam=lam)) for lam in grid}
    pairs = [(index, lam) for index in range(len(images)) for lam in grid]
    iterator = progress(pairs) if progress is not None else pairs
    cases: list[dict[str, Any]] = [
        {"name": image.name, "path": str(image.path), "sha256": image.sha256, "scores": {}} for image in images
    ]
    current: tuple[int, Any, torch.Tensor, np.ndarray] | None = None
    for index, lam in iterator:
        if current is None or current[0] != index:
            kspace = _simulate(images[index], settings, settings.seed + index)
            maps = Pipeline(maps_config).estimate_maps(kspace)
            reference = kspace.ground_truth.abs().numpy().astype(np.float64)
            cases[index]["shape"] = list(reference.shape[-2:])
            cases[index]["acceleration"] = round(float(kspace.acceleration), 3)
            current = (index, kspace, maps, reference)
        _, kspace, maps, reference = current
        done = pipelines[lam].run(kspace, maps=maps)
        image = done.cropped().abs().numpy().astype(np.float64)
        if image.shape != reference.shape:
            raise ValueError(f"{images[index].name}: reconstruction {image.shape} and image {reference.shape} differ")
        cases[index]["scores"][f"{lam:g}"] = {**_scores(reference, image), "label": done.label}
    summary = []
    for lam in grid:
        row: dict[str, Any] = {"lam": lam}
        for name in METRICS:
            values = np.array([case["scores"][f"{lam:g}"][name] for case in cases])
            row[name] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        summary.append(row)
    chosen = choose(summary)
    key = f"{resolved.preset}/{resolved.backbone}"
    return {
        "lam": chosen,
        "key": key,
        "images": len(images),
        "grid": list(grid),
        "criterion": "mean held-out HaarPSI (a larger λ must beat a smaller one strictly)",
        "summary": summary,
        "cases": cases,
        "settings": {
            **{name: _plain(getattr(resolved, name)) for name in RECORDED_SETTINGS},
            "explicit": config.replace(bank=None).to_properties(),
            "simulation": {
                "acceleration": settings.acceleration,
                "coils": settings.coils,
                "mask": "gaussian 1-D",
                "acs_width": settings.acs_width,
                "size": settings.size,
                "seed": settings.seed,
                "maps": f"ESPIRiT ({resolved.espirit}, calib_width {resolved.calib_width})",
                "scores": "magnitude of the reconstruction cropped to the recon matrix vs the simulator's ground truth",
            },
        },
        "seconds": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def write_calibrated_bank(bank: str | Path, out: str | Path, record: dict[str, Any]) -> Path:
    """A copy of ``bank`` at ``out`` whose metadata carry the record's λ under ``recommended`` and the record.

    Written atomically; ``out`` must not be ``bank`` (the input is never modified).
    """
    from semrecon_core.priors.bank import file_sha256, load_bank

    bank, out = Path(bank), Path(out)
    if out.resolve() == bank.resolve() or (out.exists() and out.samefile(bank)):
        raise ValueError(f"--out {out}: is the input bank; the calibration writes a new bank file")
    copy = load_bank(bank)
    metadata = dict(copy.metadata)
    recommended = dict(metadata.get("recommended") or {})
    lam = recommended.get("lam")
    table = dict(lam) if isinstance(lam, dict) else ({} if lam is None else {"*": lam})
    table[record["key"]] = record["lam"]
    recommended["lam"] = table
    calibration = dict(metadata.get("calibration") or {})
    calibration[record["key"]] = {**record, "input_bank": {"path": str(bank), "sha256": file_sha256(bank)}}
    metadata["recommended"] = recommended
    metadata["calibration"] = calibration
    copy.metadata = metadata
    return copy.save(out)


def haarpsi_by_lam(record: dict[str, Any]) -> str:
    """The grid's mean held-out HaarPSI, ``λ: value`` pairs in grid order (for one-line summaries)."""
    return ", ".join(f"{row['lam']:g}: {row['haarpsi']['mean']:.4f}" for row in record["summary"])


def markdown(record: dict[str, Any]) -> str:
    """The calibration as Markdown: command, settings, the grid's means ± sd, per-image HaarPSI, the chosen λ."""
    simulation = record["settings"]["simulation"]
    lam = float(record["lam"])
    verdict = (
        "the prior does not help on these images: λ 0 (the semantic prior is off)"
        if lam == 0
        else f"λ {lam:g} maximises the mean held-out HaarPSI"
    )
    settings = ", ".join(f"{k} {v}" for k, v in record["settings"].items() if k not in ("explicit", "simulation"))
    lines = [
        f"# λ calibration ({record['key']})",
        "",
        f"**Result:** {verdict}.",
        "",
        "Made by:",
        "",
        "```bash",
        str(record.get("command", "")),
        "```",
        "",
        f"- {record['images']} held-out images: "
        + ", ".join(f"{c['name']} (sha256 {c['sha256'][:12]})" for c in record["cases"]),
        (
            f"- scans: simulated, {simulation['coils']} coils, R = {simulation['acceleration']:g} "
            f"{simulation['mask']}, ACS {simulation['acs_width'] or 'simulator default'}, size "
            f"{simulation['size'] or 'own'}, seed {simulation['seed']} + image index; maps {simulation['maps']}"
        ),
        f"- settings: {settings}",
        f"- criterion: {record['criterion']}; {record['seconds']} s",
        "",
        "| λ | HaarPSI mean ± sd | PSNR dB mean ± sd | VIF mean ± sd | "
        + " | ".join(f"HaarPSI {c['name']}" for c in record["cases"])
        + " |",
        "|---|---|---|---|" + "---|" * len(record["cases"]),
    ]
    for row in record["summary"]:
        key = f"{row['lam']:g}"
        per = [f"{c['scores'][key]['haarpsi']:.4f}" for c in record["cases"]]
        mark = " **(chosen)**" if row["lam"] == lam else ""
        lines.append(
            f"| {key}{mark} | {row['haarpsi']['mean']:.4f} ± {row['haarpsi']['sd']:.4f} | "
            f"{row['psnr']['mean']:.2f} ± {row['psnr']['sd']:.2f} | "
            f"{row['vif']['mean']:.4f} ± {row['vif']['sd']:.4f} | " + " | ".join(per) + " |"
        )
    labels = sorted({c["scores"][f"{g:g}"]["label"] for c in record["cases"] for g in record["grid"]})
    lines += ["", "Labels of the reconstructions:", "", *(f"- {label}" for label in labels), ""]
    return "\n".join(lines)
