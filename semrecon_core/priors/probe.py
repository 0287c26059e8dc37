"""A probe a site runs before trusting a semantic prior: does its gradient point toward the truth?

``semrecon bank probe BANK --images DIR`` (:mod:`semrecon_core.commands.bank`) takes held-out fully sampled
magnitude images (anything ``bank build --positives`` reads, :mod:`semrecon_core.priors.bank_sources`), simulates
an undersampled multicoil scan of each (:func:`~semrecon_core.data.simulate.simulate_kspace`: Gaussian 1-D mask,
R = 4, 15 birdcage coils by default) and asks of the prior the bank makes (configured as ``semrecon recon`` would
configure it: the bank's layers, weights, similarity and preset):

- **loss ranking**: the contrastive loss at the truth against the loss at the zero-filled, CG-SENSE and CS-TV
  images. A prior that a reconstruction can lower below the truth's own loss pulls the fit away from the truth.
- **direction**: the cosine between the prior's descent direction ``−∇R(x)`` (the gradient with respect to the
  complex image, in the real inner product ``Re⟨a, b⟩`` of the (real, imaginary) parts) and the error
  ``truth − x``, at the CS-TV image (and the CG-SENSE image), next to the same cosine for isotropic TV. Measured
  overall and restricted to the **unmeasured k-space** in two ways: through the SENSE operator's coil images,
  ``P v = (1 − M) · F(S_c v)`` for every coil (the column "unmeasured"; with the simulator's unit-RSS maps
  ``‖v‖² = ‖M F S v‖² + ‖(1 − M) F S v‖²``, an exact split of the energy into what the scan measured and what it
  did not), and through the image's own 2-D FFT, ``(1 − M) · F v`` (``unmeasured_fft`` in the JSON).
- **TV at the truth and at the CS-TV image** (isotropic, sum form): a CS-TV image whose TV is below the truth's
  has been smoothed past it, and TV's own descent direction there points away from the truth.
- **gain of one step**: PSNR change (and HaarPSI change when :mod:`semrecon_core.metrics` has ``haarpsi``) of
  ``x + s · d / ‖d‖`` along each descent direction ``d``, with the same step for both priors: ``s`` a fixed
  fraction (``step_fraction``, default 0.2 %) of ``‖x‖``. Along a direction of cosine ``c`` the error shrinks iff
  ``s < 2 c ‖truth − x‖``, so the step rewards a direction in proportion to how well it points.

Everything runs on the scale the engines see (the k-space divided so that the zero-filled image has max
magnitude 1). The coil maps are the simulator's **true** maps (:func:`~semrecon_core.data.simulate.coil_maps`),
and the complex truth (magnitude × the simulator's smooth phase) is the coil combination of a noise-free, fully
sampled simulation with the same seed; both are checked against the measured k-space (the residual
``‖A·truth − y‖`` must be at the noise level), so a simulator that changed its maps or phase gives an error,
not a wrong probe. ESPIRiT maps are not used: their phase is arbitrary relative to the truth's, which would make
``truth − x`` meaningless.

Verdict (:func:`verdict`): **trust** when, at the CS-TV image, the prior's mean cosine overall and in the
unmeasured k-space are both at least :data:`TRUST_COSINE`, its step raises PSNR on average and the truth's loss is
below every reconstruction's for every image; otherwise **do not trust**, with the reasons.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from semrecon_core.data.kspace import KSpace
    from semrecon_core.priors.base import Prior

TRUST_COSINE = 0.1
"""Smallest mean cosine (overall and in the unmeasured k-space) of the prior's descent direction with the error
at the CS-TV image for a trust verdict. Isotropic TV measured about 0.5 on the DINOv2 knee case; variants of the
DINOv2 prior that reconstructions showed to be harmful stayed at or below 0.1 (REFERENCE.md §11)."""
DEFAULT_STEP_FRACTION = 0.002
"""Step length of the one-step gain, as a fraction of the evaluation image's norm ``‖x‖``: small against the error
of a CS-TV image (about 4 % of ``‖x‖`` on the 160² knee at R = 4), so the gain's sign follows the cosine's for any
cosine above ``0.002 / (2 · 0.04)`` = 0.025."""
RESIDUAL_TOLERANCE = 3.0
"""``‖A·truth − y‖`` may be at most this many times the simulated noise's expected norm."""
RECONSTRUCTIONS = ("zero-filled", "CG-SENSE", "CS-TV")
EVALUATION_POINTS = ("CS-TV", "CG-SENSE")
"""Images the gradients are evaluated at; the verdict uses the first."""


@dataclass(frozen=True)
class ProbeSettings:
    """How the held-out images are turned into scans and how the step is taken.

    Attributes:
        acceleration: R of the Gaussian 1-D mask.
        coils: simulated birdcage coils.
        acs_width: fully sampled centre lines; ``None``: the simulator's default.
        size: resize every image to ``size × size`` first (antialiased bilinear); ``None``: keep its size.
        step_fraction: step length as a fraction of ``‖x‖`` (same for every prior).
        tv_lam: λ of the CS-TV reconstruction; ``None``: the classical default.
        seed: image ``i`` is simulated with seed ``seed + i`` (phase, noise and mask).
    """

    acceleration: float = 4.0
    coils: int = 15
    acs_width: int | None = None
    size: int | None = None
    step_fraction: float = DEFAULT_STEP_FRACTION
    tv_lam: float | None = None
    seed: int = 0

    def check(self) -> None:
        """Raise ``ValueError`` naming the first option out of range."""
        if not (math.isfinite(self.acceleration) and self.acceleration >= 1):
            raise ValueError(f"--acceleration: expected R >= 1, found {self.acceleration!r}")
        if self.coils < 1:
            raise ValueError(f"--coils: expected at least 1, found {self.coils}")
        if self.acs_width is not None and self.acs_width < 1:
            raise ValueError(f"--acs: expected at least 1 line, found {self.acs_width}")
        if self.size is not None and self.size < 16:
            raise ValueError(f"--size: expected at least 16 pixels, found {self.size}")
        if not (math.isfinite(self.step_fraction) and self.step_fraction > 0):
            raise ValueError(f"--step: expected a positive fraction of the image norm, found {self.step_fraction!r}")
        if self.tv_lam is not None and not (math.isfinite(self.tv_lam) and self.tv_lam > 0):
            raise ValueError(f"--tv-lam: expected a positive number, found {self.tv_lam!r}")


# --- the measures ------------------------------------------------------------------------------------------


def real_inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """``Re⟨a, b⟩ = Σ Re(conj(a)·b)``: the inner product of the (real, imaginary) parts."""
    return float((a.conj() * b).real.sum()) if a.is_complex() or b.is_complex() else float((a * b).sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors in the real inner product (``nan`` when either is zero)."""
    norms = float(a.abs().square().sum().sqrt()) * float(b.abs().square().sum().sqrt())
    return real_inner(a, b) / norms if norms > 0 else float("nan")


def unmeasured_coils(image: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 − M) · F(S_c · image)`` per coil ``(slices, coils, ky, kx)``: what the scan did not measure."""
    from semrecon_core.physics.fft import fft2c

    return fft2c(maps * image.unsqueeze(-3)) * (~mask.bool()).unsqueeze(-3)


def measured_coils(image: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``M · F(S_c · image)`` per coil: the SENSE forward model (the complement of :func:`unmeasured_coils`)."""
    from semrecon_core.physics.fft import fft2c

    return fft2c(maps * image.unsqueeze(-3)) * mask.bool().unsqueeze(-3)


def unmeasured_fft(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 − M) · F(image)``: the image's own 2-D FFT outside the sampling mask."""
    from semrecon_core.physics.fft import fft2c

    return fft2c(image) * ~mask.bool()


def descent(prior: Prior, image: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(R(image), −∇R(image))``: the loss and its steepest-descent direction for a complex image.

    PyTorch's gradient of a real loss with respect to a complex tensor is the conjugate Wirtinger derivative,
    the steepest-ascent direction of the (real, imaginary) parts; its negative is the descent direction.
    """
    point = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = prior.loss(point)
        (gradient,) = torch.autograd.grad(loss, point)
    return float(loss.detach()), -gradient.detach()


def _image_quality(reference: torch.Tensor, image: torch.Tensor) -> dict[str, float]:
    from semrecon_core import metrics

    scores = {"psnr": metrics.psnr(reference, image)}
    scores["haarpsi"] = metrics.haarpsi(reference, image)
    return scores


def point_measures(
    direction: torch.Tensor,
    image: torch.Tensor,
    truth: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor,
    *,
    step_fraction: float = DEFAULT_STEP_FRACTION,
) -> dict[str, float]:
    """Cosines of ``direction`` with ``truth − image`` and the gain of one step along it.

    Returns ``cosine`` (overall), ``cosine_unmeasured`` (coil images outside the mask), ``cosine_unmeasured_fft``
    (the image's FFT outside the mask), ``step`` (``s = step_fraction · ‖image‖``) and ``gain_psnr`` (and
    ``gain_haarpsi`` when that metric exists): the metric at ``image + s · direction / ‖direction‖`` minus the
    metric at ``image``, both against ``|truth|``.
    """
    error = truth - image
    norm = float(direction.abs().square().sum().sqrt())
    step = step_fraction * float(image.abs().square().sum().sqrt())
    moved = image + (step / norm) * direction if norm > 0 else image
    before = _image_quality(truth.abs(), image)
    after = _image_quality(truth.abs(), moved)
    result = {
        "cosine": cosine(direction, error),
        "cosine_unmeasured": cosine(unmeasured_coils(direction, maps, mask), unmeasured_coils(error, maps, mask)),
        "cosine_unmeasured_fft": cosine(unmeasured_fft(direction, mask), unmeasured_fft(error, mask)),
        "step": step,
    }
    for name, value in after.items():
        result[f"gain_{name}"] = value - before[name]
    return result


# --- the cases ---------------------------------------------------------------------------------------------


@dataclass
class ProbeCase:
    """One held-out image as a simulated scan: k-space, the true maps and the complex truth (k-space units)."""

    name: str
    kspace: KSpace
    maps: torch.Tensor
    truth: torch.Tensor
    residual_ratio: float


def resize_magnitude(image: np.ndarray, size: int) -> np.ndarray:
    """``(y, x)`` magnitude resized to ``size × size`` (bilinear with antialiasing, torch)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return resized[0, 0].clamp_min(0).numpy()


def read_images(sources: Sequence[str | Path], size: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``(name, magnitude (y, x))`` of every slice of the fully sampled ``sources`` (``--images``).

    Sources are what ``bank build --positives`` reads; k-space sources must be fully sampled (their RSS is used).
    """
    from semrecon_core.priors.bank_sources import expand_sources, read_source

    images: list[tuple[str, np.ndarray]] = []
    for path in expand_sources(sources, "images"):
        source = read_source(path, "images")
        if source.kspace is not None:
            sampled = source.kspace.abs().sum(dim=(0, 1, 3)) > 0
            if not bool(sampled.all()):
                raise ValueError(
                    f"--images: {path}: k-space is undersampled ({int(sampled.sum())} of {sampled.numel()} lines); "
                    "the probe needs fully sampled images (the truth)"
                )
        magnitudes = source.images.abs().numpy()
        for index, magnitude in enumerate(magnitudes):
            if not float(magnitude.max()) > 0:
                raise ValueError(f"--images: {path}: slice {index} is all zero")
            name = path.stem if len(magnitudes) == 1 else f"{path.stem}[{index}]"
            images.append((name, magnitude if size is None else resize_magnitude(magnitude, size)))
    return images


def _default_acs() -> int:
    import inspect

    from semrecon_core.data.simulate import simulate_kspace

    return int(inspect.signature(simulate_kspace).parameters["acs_width"].default)


class ScanSettings(Protocol):
    """How a held-out image's scan is simulated (:class:`ProbeSettings`, the calibration's settings)."""

    @property
    def acceleration(self) -> float: ...  # noqa: D102
    @property
    def coils(self) -> int: ...  # noqa: D102
    @property
    def acs_width(self) -> int | None: ...  # noqa: D102


def simulate_held_out(magnitude: np.ndarray, settings: ScanSettings, seed: int, **overrides: float) -> KSpace:
    """The scan of a held-out image as the probe and the calibration simulate it.

    A 1-D Gaussian mask with ``settings``' acceleration, coils and ACS width; ``overrides`` replace
    ``acceleration`` or ``noise_std``.
    """
    from semrecon_core.data.simulate import simulate_kspace

    options: dict[str, Any] = {"coils": settings.coils, "mask_kind": "gaussian", "seed": seed}
    if settings.acs_width is not None:
        options["acs_width"] = settings.acs_width
    return simulate_kspace(magnitude, **({"acceleration": settings.acceleration} | options | overrides))


def simulate_case(name: str, magnitude: np.ndarray, settings: ProbeSettings, seed: int) -> ProbeCase:
    """Simulate the scan of ``magnitude``; attach the true maps and the complex truth, checked against the data."""
    from semrecon_core.data.simulate import coil_maps
    from semrecon_core.physics.fft import ifft2c
    from semrecon_core.physics.sense import SenseOp

    kspace = simulate_held_out(magnitude, settings, seed)
    full = simulate_held_out(magnitude, settings, seed, acceleration=1, noise_std=0.0)
    ny, nx = (int(n) for n in kspace.data.shape[-2:])
    maps = torch.from_numpy(coil_maps(settings.coils, (ny, nx)))[None]
    if maps.shape[-2:] != full.data.shape[-2:]:
        raise ValueError(f"{name}: the simulator's k-space grid {tuple(full.data.shape[-2:])} is not the image's")
    truth = (maps.conj() * ifft2c(full.data)).sum(dim=-3)
    residual = float((SenseOp(maps, kspace.mask)(truth) - kspace.data).abs().square().sum().sqrt())
    noise_std = float(kspace.info.get("noise_std", 0.0))
    expected = noise_std * math.sqrt(int(kspace.mask.sum()) * settings.coils)
    scale = float(kspace.data.abs().square().sum().sqrt())
    ratio = residual / max(expected, 1e-6 * scale)
    if ratio > RESIDUAL_TOLERANCE:
        raise ValueError(
            f"{name}: the simulator's true maps and phase do not reproduce its k-space (‖A·truth − y‖ = "
            f"{residual:.4g}, {ratio:.1f} × the noise's expected {expected:.4g}); the probe cannot use them"
        )
    return ProbeCase(name, kspace, maps, truth.to(torch.complex64), ratio)


# --- the probe ---------------------------------------------------------------------------------------------


def semantic_prior_for(
    bank: str | Path,
    *,
    encoder: str | None,
    device: torch.device,
    properties: Mapping[str, str] | None = None,
) -> Prior:
    """The semantic prior ``semrecon recon`` would build from ``bank``: its encoder, layers, weights, preset.

    ``properties`` (``--set`` of ``bank probe``) override these like ``recon --set`` does, e.g. ``hinge`` or
    ``views`` to probe a variant of the prior.
    """
    from semrecon_core.config import ReconConfig
    from semrecon_core.priors.bank import read_metadata
    from semrecon_core.priors.factory import build_prior

    metadata = read_metadata(bank)
    identity = metadata["encoder"]
    values = {
        "backbone": "unet",
        "prior": "semantic",
        "preset": "public-code" if metadata.get("preset") == "public-code" else "paper",
        "bank": str(bank),
        "encoder": encoder or str(identity.get("model")),
        "device": str(device),
    }
    if identity.get("kind") == "image":
        values["layers"] = ",".join(str(int(layer)) for layer in identity.get("layers") or ())
        values["similarity"] = str(metadata["similarity"])
        if metadata.get("weights"):
            values["level_weights"] = ",".join(repr(float(w)) for w in metadata["weights"])
    prior = build_prior(ReconConfig.from_properties({**values, **(properties or {})}), device)
    if prior is None:  # pragma: no cover - prior "semantic" always gives one
        raise ValueError(f"{bank}: no semantic prior")
    return prior


def _reconstructions(case: ProbeCase, settings: ProbeSettings, device: torch.device) -> dict[str, torch.Tensor]:
    from semrecon_core.config import ReconConfig
    from semrecon_core.pipeline import Pipeline

    configs = {
        "zero-filled": ReconConfig(backbone="zero-filled", device=str(device)),
        "CG-SENSE": ReconConfig(backbone="sense", prior="none", device=str(device)),
        "CS-TV": ReconConfig(backbone="sense", prior="tv", lam=settings.tv_lam, device=str(device)),
    }
    return {name: Pipeline(config).run(case.kspace, maps=case.maps).image for name, config in configs.items()}


def probe_case(case: ProbeCase, prior: Prior, settings: ProbeSettings, device: torch.device) -> dict[str, Any]:
    """Losses at the truth and the reconstructions, and the direction measures at each evaluation point."""
    from semrecon_core.priors.tv import TVPrior

    images = _reconstructions(case, settings, device)
    scale = float(images["zero-filled"].abs().max())  # the engines' scale: max |zero-filled| = 1
    truth = (case.truth / scale).to(device)
    maps, mask = case.maps.to(device), case.kspace.mask.to(device)
    scaled = {name: (image / scale).to(device) for name, image in images.items()}
    tv = TVPrior(weight=1.0, scaling="sum")
    with torch.no_grad():
        losses = {name: float(prior.loss(image)) for name, image in {"truth": truth, **scaled}.items()}
        tv_values = {name: float(tv.loss(image)) for name, image in {"truth": truth, **scaled}.items()}
    at: dict[str, Any] = {}
    for point in EVALUATION_POINTS:
        image = scaled[point]
        measures: dict[str, Any] = {}
        for label, regulariser in (("prior", prior), ("tv", tv)):
            _, direction = descent(regulariser, image)
            measures[label] = point_measures(direction, image, truth, maps, mask, step_fraction=settings.step_fraction)
        measures["error_norm_relative"] = float((truth - image).norm() / image.norm())
        at[point] = measures
    quality = {name: _image_quality(truth.abs(), image) for name, image in scaled.items()}
    return {
        "name": case.name,
        "shape": list(case.truth.shape[-2:]),
        "acceleration": round(case.kspace.acceleration, 3),
        "residual_over_noise": round(case.residual_ratio, 3),
        "loss": losses,
        "tv": tv_values,
        "quality": quality,
        "at": at,
    }


def run_probe(
    bank: str | Path,
    sources: Sequence[str | Path],
    *,
    encoder: str | None = None,
    settings: ProbeSettings | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    properties: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Probe the prior of ``bank`` on the held-out images ``sources``; the report :func:`markdown` renders.

    ``properties`` override the prior's settings as ``recon --set`` does (:func:`semantic_prior_for`).
    """
    from semrecon_core.priors.bank import describe_separability, read_metadata

    settings = settings or ProbeSettings()
    settings.check()
    device = torch.device(device)
    started = time.perf_counter()
    metadata = read_metadata(bank)
    images = read_images(sources, settings.size)
    if not images:
        raise ValueError("--images: no images to probe")
    prior = semantic_prior_for(bank, encoder=encoder, device=device, properties=properties)
    indexed = list(enumerate(images))
    iterator = progress(indexed) if progress is not None else indexed
    cases = []
    for index, (name, magnitude) in iterator:
        case = simulate_case(name, magnitude, settings, settings.seed + index)
        cases.append(probe_case(case, prior, settings, device))
    report: dict[str, Any] = {
        "bank": str(bank),
        "prior": prior.label,
        "bank_separability": describe_separability(metadata.get("separability")),
        "settings": {
            "acceleration": settings.acceleration,
            "coils": settings.coils,
            "acs_width": settings.acs_width
            if settings.acs_width is not None
            else f"simulator default ({_default_acs()})",
            "mask": "gaussian 1-D",
            "size": settings.size,
            "step_fraction": settings.step_fraction,
            "tv_lam": settings.tv_lam if settings.tv_lam is not None else "classical default",
            "seed": settings.seed,
            "device": str(device),
            "prior_settings": dict(properties or {}),
        },
        "method": {
            "maps": "the simulator's true birdcage maps (unit RSS); complex truth = coil combination of a noise-free "
            "fully sampled simulation with the same seed, checked: ‖A·truth − y‖ at the noise level",
            "scale": "every image divided by max |zero-filled| (the scale the engines and the prior see)",
            "direction": "−∇R(x), gradient w.r.t. the complex image; cosines in Re⟨a, b⟩",
            "unmeasured": "coil images outside the mask, (1 − M)·F(S_c v) for every coil (JSON also: the image's "
            "FFT outside the mask, cosine_unmeasured_fft)",
            "tv": "isotropic TV (sum form; the direction does not depend on its weight)",
            "step": f"x + s·d/‖d‖ with s = {settings.step_fraction:g}·‖x‖, the same for the prior and TV",
        },
        "cases": cases,
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["summary"] = summarise(cases)
    trust, line = verdict(report["summary"])
    report["trust"] = trust
    report["verdict"] = line
    return report


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the cases of every measure, and how many cases rank the truth's loss below every reconstruction."""
    summary: dict[str, Any] = {
        "cases": len(cases),
        "loss": {name: _mean(c["loss"][name] for c in cases) for name in ("truth", *RECONSTRUCTIONS)},
        "truth_lowest": sum(1 for c in cases if all(c["loss"]["truth"] < c["loss"][name] for name in RECONSTRUCTIONS)),
        "at": {},
    }
    for point in EVALUATION_POINTS:
        summary["at"][point] = {
            label: {key: _mean(c["at"][point][label][key] for c in cases) for key in cases[0]["at"][point][label]}
            for label in ("prior", "tv")
        }
    return summary


def verdict(summary: dict[str, Any]) -> tuple[bool, str]:
    """``(trust, line)`` from :func:`summarise`'s means at the CS-TV image (module docstring)."""
    point = EVALUATION_POINTS[0]
    prior, tv = summary["at"][point]["prior"], summary["at"][point]["tv"]
    loss = summary["loss"]
    reasons = []
    if not prior["cosine"] >= TRUST_COSINE:
        reasons.append(f"cosine {prior['cosine']:.3f} < {TRUST_COSINE:g}")
    if not prior["cosine_unmeasured"] >= TRUST_COSINE:
        reasons.append(f"unmeasured-k-space cosine {prior['cosine_unmeasured']:.3f} < {TRUST_COSINE:g}")
    if not prior["gain_psnr"] > 0:
        reasons.append(f"its step lowers PSNR ({prior['gain_psnr']:+.3f} dB)")
    if summary["truth_lowest"] < summary["cases"]:
        reasons.append(f"the truth's loss is the lowest in {summary['truth_lowest']} of {summary['cases']} images only")
    trust = not reasons
    second = EVALUATION_POINTS[1]
    other = summary["at"][second]
    points = "points toward the truth" if prior["cosine"] >= TRUST_COSINE else "does not point toward the truth"
    line = (
        f"prior {points} at the {point} image: cosine {prior['cosine']:.3f} (unmeasured k-space "
        f"{prior['cosine_unmeasured']:.3f}) vs TV {tv['cosine']:.3f} ({tv['cosine_unmeasured']:.3f}) (at the {second} "
        f"image {other['prior']['cosine']:.3f} vs TV {other['tv']['cosine']:.3f}); one step "
        f"{prior['gain_psnr']:+.3f} dB vs TV {tv['gain_psnr']:+.3f} dB; loss at truth {loss['truth']:.4g} vs "
        + ", ".join(f"{name} {loss[name]:.4g}" for name in RECONSTRUCTIONS)
        + (" → trust" if trust else f" → do not trust ({'; '.join(reasons)})")
    )
    return trust, line


# --- output ------------------------------------------------------------------------------------------------


def _f(value: float, digits: int = 3, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    """The report as Markdown: settings, losses and PSNR per image, direction measures, the verdict line."""
    settings = report["settings"]
    grids = sorted({f"{rows}×{cols}" for rows, cols in (case["shape"] for case in report["cases"])})
    haarpsi = any("gain_haarpsi" in c["at"][EVALUATION_POINTS[0]]["prior"] for c in report["cases"])
    lines = [
        f"# Prior probe: {Path(report['bank']).name}",
        "",
        f"**Verdict:** {report['verdict']}",
        "",
    ]
    if command:
        lines += ["Made by:", "", "```bash", command, "```", ""]
    lines += [
        f"- prior: {report['prior']}",
        f"- bank: {report['bank']}; {report['bank_separability']}",
        f"- scans: simulated, {settings['coils']} coils, R = {settings['acceleration']:g} {settings['mask']} mask, "
        f"ACS {settings['acs_width']}, images resized to {settings['size'] or 'their own size'}"
        + ("²" if settings["size"] else "")
        + f" (simulated grid {', '.join(grids)}: the image and the simulator's field-of-view margin), seed "
        f"{settings['seed']} + image index; CS-TV λ {settings['tv_lam']}",
        *(f"- {key}: {value}" for key, value in report["method"].items()),
        f"- {report['summary']['cases']} images, {report['seconds']} s on {settings['device']}",
        "",
        "## Contrastive loss and PSNR (dB) per image",
        "",
        (
            "| image | loss truth | loss zero-filled | loss CG-SENSE | loss CS-TV | PSNR zero-filled "
            "| PSNR CG-SENSE | PSNR CS-TV | TV truth | TV CS-TV |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [*report["cases"], {"name": "**mean**", "loss": report["summary"]["loss"], "quality": None, "tv": None}]
    for case in rows:
        tv_values = case["tv"] or {name: _mean(c["tv"][name] for c in report["cases"]) for name in ("truth", "CS-TV")}
        psnr = (
            [_f(case["quality"][name]["psnr"], 2) for name in RECONSTRUCTIONS]
            if case["quality"]
            else [_f(_mean(c["quality"][name]["psnr"] for c in report["cases"]), 2) for name in RECONSTRUCTIONS]
        )
        losses = [_f(case["loss"][name], 4) for name in ("truth", *RECONSTRUCTIONS)]
        tv_cells = [_f(tv_values[name], 1) for name in ("truth", "CS-TV")]
        lines.append(f"| {case['name']} | " + " | ".join(losses + psnr + tv_cells) + " |")
    lines += [
        "",
        (
            "## Descent directions at the reconstructions: cosine with (truth − x), gain of one step "
            f"(s = {settings['step_fraction']:g}·‖x‖)"
        ),
        "",
        "| image | at | ‖truth − x‖/‖x‖ | prior cos | prior cos unmeasured | prior cos unmeasured (FFT) | TV cos | "
        "TV cos unmeasured | TV cos unmeasured (FFT) | prior ΔPSNR dB | TV ΔPSNR dB |"
        + (" prior ΔHaarPSI | TV ΔHaarPSI |" if haarpsi else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if haarpsi else ""),
    ]
    for point in EVALUATION_POINTS:
        for case in [*report["cases"], None]:
            if case is None:
                name = "**mean**"
                measures = report["summary"]["at"][point]
                error = _mean(c["at"][point]["error_norm_relative"] for c in report["cases"])
            else:
                name, measures, error = case["name"], case["at"][point], case["at"][point]["error_norm_relative"]
            prior, tv = measures["prior"], measures["tv"]
            cells = [
                name,
                point,
                _f(error),
                _f(prior["cosine"]),
                _f(prior["cosine_unmeasured"]),
                _f(prior["cosine_unmeasured_fft"]),
                _f(tv["cosine"]),
                _f(tv["cosine_unmeasured"]),
                _f(tv["cosine_unmeasured_fft"]),
                _f(prior["gain_psnr"], 3, signed=True),
                _f(tv["gain_psnr"], 3, signed=True),
            ]
            if haarpsi:
                cells += [
                    _f(prior.get("gain_haarpsi", float("nan")), 4, signed=True),
                    _f(tv.get("gain_haarpsi", float("nan")), 4, signed=True),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"verdict: {report['verdict']}", ""]
    return "\n".join(lines)
