"""The one reconstruction pipeline: ``KSpace`` → coil maps → engine → images.

Every path that reconstructs (``semrecon recon``, the Gadgetron gadget, offline replay, ``semrecon serve``,
the demo, warm-start pretraining, the study runner) calls :class:`Pipeline`; none of them estimates coil maps
or builds images on its own, so the same file and configuration give the same pixels on every path.

- Coil maps come from a pluggable :data:`CoilMapEstimator` (default :func:`espirit`: ESPIRiT on the calibration
  region, honouring ``calib_width``, through sigpy or the batched torch implementation as ``config.espirit``
  says), or precomputed maps passed to :meth:`Pipeline.run`.
- The k-space is scaled so that the zero-filled image has max magnitude 1 (λ is relative to that scale),
  handed to the engine registered for ``config.backbone`` with the prior ``config.prior`` asks for, and the
  result is scaled back.
- :meth:`Reconstruction.images` builds the ``ismrmrd.Image`` s (recon matrix and FOV, geometry and indices
  from the acquisitions, meta naming backbone, prior and encoder, the model's quality answer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from semrecon_core.config import ConfigError, ReconConfig, ResolvedConfig, preview_config
from semrecon_core.data.kspace import KSpace
from semrecon_core.engines import get_engine
from semrecon_core.engines.base import ReconProblem, ReconResult
from semrecon_core.priors.base import AnsweringPrior, Prior
from semrecon_core.settings import (
    MachineError,
    check_machine,
    device_problem,
    lam_note,
    prior_off_label,
    semantic_prior_off,
    unused,
)

if TYPE_CHECKING:
    from semrecon_core.solvers.status import Callback

log = logging.getLogger(__name__)

CoilMapEstimator = Callable[[KSpace, ReconConfig], torch.Tensor]
"""``estimator(kspace, config) -> maps``: complex64 ``(slices, coils, y, x)`` coil sensitivities."""

# An ESPIRiT result that covers less than this fraction of the object's bright pixels in any slice is refused.
MIN_MAP_COVERAGE = 0.3


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; other names are checked for availability.

    A device this machine does not have is a :class:`~semrecon_core.settings.MachineError` with the message
    :func:`~semrecon_core.settings.check_machine` gives on every path.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem is not None:
        raise MachineError(problem)
    return torch.device(name)


def espirit(kspace: KSpace, config: ReconConfig) -> torch.Tensor:
    """ESPIRiT maps (``config.espirit``) from the calibration region, ``config.calib_width`` wide at most.

    The width is clamped to the calibration block the data carry. Maps that vanish over most of the
    object (too few calibration lines) are refused with a message, never used for a silent wrong image.
    """
    from semrecon_core.physics.coils import espirit_maps

    width = min(config.calib_width, *kspace.calibration.shape[-2:])
    if width < config.calib_width:
        log.warning(
            "%s: calib_width %d is wider than the calibration region %s the data carry; ESPIRiT uses %d",
            kspace.source or "k-space",
            config.calib_width,
            "×".join(str(n) for n in kspace.calibration.shape[-2:]),
            width,
        )
    maps = espirit_maps(kspace, calib_width=width, device=resolve_device(config.device), method=config.espirit)
    check_coverage(kspace, maps)
    return maps


def check_coverage(kspace: KSpace, maps: torch.Tensor) -> None:
    """Refuse coil maps that cover less than :data:`MIN_MAP_COVERAGE` of the object in any slice."""
    from semrecon_core.physics.fft import ifft2c

    signal = ifft2c(kspace.data).abs().pow(2).sum(dim=1).sqrt()
    covered = maps.abs().pow(2).sum(dim=1).sqrt() > 0.5
    for index in range(signal.shape[0]):
        plane = signal[index]
        inside = plane > 0.2 * plane.max()
        fraction = float(covered[index][inside].float().mean()) if inside.any() else 1.0
        if fraction < MIN_MAP_COVERAGE:
            region = tuple(kspace.calibration.shape[-2:])
            raise ValueError(
                f"{kspace.source}: ESPIRiT coil maps cover only {fraction:.0%} of the object in slice "
                f"{index} (calibration region {region}); more calibration lines are needed"
            )


def prepare_problem(
    kspace: KSpace, maps: torch.Tensor, device: torch.device, *, start: torch.Tensor | None = None
) -> ReconProblem:
    """Move data to ``device`` and scale k-space so that the zero-filled image has max magnitude 1.

    ``start``: the preview image (units of the k-space) handed to the engine, scaled alike.
    """
    from semrecon_core.physics.sense import SenseOp

    data = kspace.data.to(device, torch.complex64)
    mask = kspace.mask.to(device)
    maps = maps.to(device, torch.complex64)
    if maps.shape != data.shape:
        raise ValueError(f"coil maps: expected shape {tuple(data.shape)} like the k-space, found {tuple(maps.shape)}")
    if not torch.isfinite(torch.view_as_real(data)).all():
        raise ValueError(f"{kspace.source or 'k-space'}: contains NaN or Inf samples")
    zero_filled = SenseOp(maps, mask).adjoint(data)
    scale = float(zero_filled.abs().max())
    if scale == 0.0:
        raise ValueError(f"{kspace.source or 'k-space'}: all sampled values are zero")
    scaled_start = None if start is None else start.to(device, torch.complex64) / scale
    return ReconProblem(kspace=data / scale, mask=mask, maps=maps, scale=scale, device=device, start=scaled_start)


@dataclass
class Reconstruction:
    """One reconstructed scan: the engine's result with the k-space, maps and configuration it came from.

    Attributes:
        kspace: the scan.
        maps: the coil maps used ``(slices, coils, y, x)`` (CPU).
        result: the engine's result; ``result.image`` is complex ``(slices, y, x)`` on the CPU in the
            units of the input k-space.
        config: the resolved configuration.
        answers: the model's quality answer per slice (image-language banks), else ``None``.
        seconds: wall time of coil maps and reconstruction.
        fit_seconds: wall time of the deep engines' optimisation loops and their start images (what
            ``time_budget_s`` bounds), or of the classical solver; the rest of ``seconds`` is fixed cost (coil
            maps, loading the prior and the checkpoint, the final data-consistency step, the quality answer).
    """

    kspace: KSpace
    maps: torch.Tensor
    result: ReconResult
    config: ResolvedConfig
    answers: list[dict[str, Any]] | None = None
    seconds: float = 0.0
    fit_seconds: float = 0.0

    @property
    def image(self) -> torch.Tensor:
        """Complex ``(slices, y, x)`` on the k-space grid."""
        return self.result.image

    @property
    def label(self) -> str:
        """What produced the image (backbone, prior, encoder)."""
        return self.result.label

    def cropped(self) -> torch.Tensor:
        """Complex ``(slices, y, x)`` cropped to the recon matrix."""
        from semrecon_core.data.images import crop_to_recon

        return torch.as_tensor(crop_to_recon(self.result.image, self.kspace))

    def images(self, *, series_index: int = 1, comment: str | None = None, role: str = "Image") -> list[Any]:
        """One float magnitude ``ismrmrd.Image`` per slice, with geometry, indices and meta.

        ``comment`` replaces the default ``GADGETRON_ImageComment`` (``semrecon <label>; λ <value> (<its
        source>)`` unless λ has no use (zero-filled), then the iterations run and why the fit stopped,
        :func:`fit_summary`), e.g. for a labelled fallback; ``role`` is the ``GADGETRON_DataRole``. The meta carry λ
        and its source also as ``SEMRECON_Lambda`` and ``SEMRECON_LambdaSource``.
        """
        from semrecon_core.data.images import ascii_text

        summary = fit_summary(self.result.info.get("fits", []))
        lam = "" if unused("lam", self.config) else f"; {lam_note(self.config)}"  # zero-filled: no λ
        default = f"semrecon {self.result.label}{lam}" + (f"; {summary}" if summary else "")
        images = build_images(
            self.result.image,
            self.kspace,
            config=self.config,
            comment=comment or default,
            role=role,
            series_index=series_index,
            answers=self.answers,
        )
        for image in images:
            image.meta["SEMRECON_Seconds"] = f"{self.seconds:.3f}"
            image.meta["SEMRECON_FitSeconds"] = f"{self.fit_seconds:.3f}"
            if lam:
                image.meta["SEMRECON_Lambda"] = f"{self.config.lam:g}"
                image.meta["SEMRECON_LambdaSource"] = ascii_text(self.config.source("lam"))
        return images


def fit_summary(fits: list[dict[str, Any]]) -> str:
    """``"<n> it (<why stopped>)"`` of a deep engine's fits (a range over slice batches and phases); ``""``: none."""
    if not fits:
        return ""
    counts = sorted({int(fit["iterations"]) for fit in fits})
    reasons = sorted({str(fit["stopped"]) for fit in fits})
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{span} it ({', '.join(reasons)})"


def build_images(
    image: torch.Tensor,
    kspace: KSpace,
    *,
    config: ReconConfig,
    comment: str,
    role: str = "Image",
    series_index: int = 1,
    answers: list[dict[str, Any]] | None = None,
) -> list[Any]:
    """``ismrmrd.Image`` s of a complex or magnitude ``(slices, y, x)`` image with semrecon's meta."""
    from semrecon_core.data.images import quality_meta, to_ismrmrd_images

    prior: str = config.prior
    if isinstance(config, ResolvedConfig) and semantic_prior_off(config):
        prior = "semantic-off"  # λ 0: the series says the prior is off
    meta = {
        "GADGETRON_DataRole": role,
        "GADGETRON_ImageComment": comment,
        "GADGETRON_SeqDescription": f"_semrecon_{config.backbone}_{prior}",
        "GADGETRON_ImageProcessingHistory": "SEMRECON",
    }
    images = to_ismrmrd_images(image.abs(), kspace, series_index=series_index, meta=meta)
    for number, img in enumerate(images):
        if answers:
            img.meta.update(quality_meta(answers[min(number, len(answers) - 1)]))
    return images


class Pipeline:
    """Reconstructs scans with one configuration; keeps the prior (encoder, bank) loaded between scans.

    Args:
        config: the validated configuration (resolved and checked against this machine here:
            :func:`semrecon_core.settings.check_machine`, which raises ``MachineError``).
        coil_maps: the coil-map estimator (default :func:`espirit`).
        prior: an already built prior to use (e.g. kept loaded by ``semrecon serve``); built from
            ``config`` on first use when ``None`` (the prior factory caches encoders and banks per process).
    """

    def __init__(
        self, config: ReconConfig, *, coil_maps: CoilMapEstimator = espirit, prior: Prior | None = None
    ) -> None:
        self.config = check_machine(
            config
        )  # resolves (bank metadata read once, reused by the prior), checks the device
        if self.config.checkpoint and not Path(self.config.checkpoint).is_file():
            raise ConfigError(
                f"property 'checkpoint': {self.config.checkpoint} does not exist; make one from the site's own "
                f"images with `semrecon pretrain {self.config.checkpoint} --backbone {self.config.backbone} "
                "--images DIR` (magnitude .npy images)"
            )
        self.device = resolve_device(self.config.device)
        self.estimate_maps_with = coil_maps
        self._prior = prior
        self._previewer: Pipeline | None = None
        if semantic_prior_off(self.config):
            log.warning("semrecon: %s: the encoder is not loaded and the fit has no prior term", self.prior_off)

    @property
    def prior_off(self) -> str | None:
        """``semantic prior off (...)`` when the semantic prior has λ 0 (then neither built nor run); else ``None``."""
        return prior_off_label(self.config) if semantic_prior_off(self.config) else None

    @property
    def prior(self) -> Prior | None:
        """The prior ``config.prior`` asks for (``None`` for ``none`` and for the semantic prior at λ 0), built once."""
        if semantic_prior_off(self.config):
            return None
        if self._prior is None and self.config.prior != "none":
            from semrecon_core.priors.factory import build_prior

            self._prior = build_prior(self.config, self.device)
        return self._prior

    def estimate_maps(self, kspace: KSpace) -> torch.Tensor:
        """Coil maps ``(slices, coils, y, x)`` of ``kspace`` from this pipeline's estimator (CPU)."""
        return self.estimate_maps_with(kspace, self.config).to("cpu", torch.complex64)

    def run(
        self,
        kspace: KSpace,
        *,
        maps: torch.Tensor | None = None,
        callback: Callback | None = None,
        start: torch.Tensor | None = None,
    ) -> Reconstruction:
        """Reconstruct ``kspace`` (with precomputed ``maps`` when given); ``callback`` sees every iteration.

        ``start``: the CG-SENSE preview of ``kspace`` already computed with these maps (complex ``(slices, y,
        x)``), which an engine with ``start=preview`` starts from instead of computing it again.
        """
        import time

        started = time.perf_counter()
        config = self.config
        maps = self.estimate_maps(kspace) if maps is None else maps
        torch.manual_seed(config.seed)
        problem = prepare_problem(kspace, maps, self.device, start=start)
        engine = get_engine(config.backbone)
        log.info(
            "reconstructing %s with backbone=%s prior=%s on %s",
            kspace.source,
            config.backbone,
            config.prior,
            self.device,
        )
        prior = self.prior
        fit_started = time.perf_counter()
        result = engine(problem, config, prior=prior, callback=callback)
        if prior is None and self.prior_off is not None:  # the engines say "no prior": say why
            result.label = result.label.replace("+ no prior", f"+ {self.prior_off}")
            result.info["prior_off"] = self.prior_off
        fits = result.info.get("fits")  # the deep engines' optimisation loops; else the whole engine call
        fit_seconds = sum(fit["seconds"] for fit in fits) if fits else time.perf_counter() - fit_started
        image = (result.image * problem.scale).detach()
        if not bool(torch.isfinite(torch.view_as_real(image.to(torch.complex64))).all()):
            raise FloatingPointError(
                f"{kspace.source or 'k-space'}: the {config.backbone} reconstruction contains NaN or Inf"
            )
        answers = None
        if isinstance(prior, AnsweringPrior):
            with torch.no_grad():  # the model's quality answer for the final image
                answers = prior.answer(image / problem.scale)
        result.image = image.to("cpu", torch.complex64)
        return Reconstruction(
            kspace=kspace,
            maps=maps.cpu(),
            result=result,
            config=config,
            answers=answers,
            seconds=time.perf_counter() - started,
            fit_seconds=fit_seconds,
        )

    @property
    def previewer(self) -> Pipeline:
        """The CG-SENSE pipeline of the preview (:func:`~semrecon_core.config.preview_config` on this device)."""
        if self._previewer is None:
            self._previewer = Pipeline(preview_config(self.config).replace(device=self.config.device))
        return self._previewer

    def stream(
        self,
        kspace: KSpace,
        *,
        preview: bool = True,
        maps: torch.Tensor | None = None,
        callback: Callback | None = None,
        name: str | None = None,
    ) -> Iterator[Step]:
        """The online recipe: the preview, then the final images, or a labelled fallback; never raises.

        Coil maps are estimated once (or ``maps`` used). With ``preview`` and a backbone that is fitted (not
        zero-filled, CG-SENSE or CS-TV) the CG-SENSE preview with those maps comes first (a :class:`Step` of
        kind ``preview``); the fit (time budget ``time_budget_s``) receives it as its start image when it
        starts there (``start=preview``). Then the final reconstruction (kind ``final``). When anything fails,
        the error is logged and a step of kind ``fallback`` follows: the preview, relabelled, when there is
        one, else the CPU CG-SENSE image (:func:`fallback_stream`), else the zero-filled root-sum-of-squares
        image; its comment says ``FALLBACK ... (<backbone>+<prior> failed: <the error>)``. Every step carries
        the seconds since the call (:attr:`Step.elapsed_s`). The gadget, ``semrecon serve`` (both protocols),
        replay and ``benchmarks/bench_online.py`` all reconstruct through this generator.
        """
        import time

        started = time.perf_counter()
        name = name or kspace.source or "k-space"
        failed = f"{self.config.backbone}+{self.config.prior} failed"
        first: Reconstruction | None = None
        try:
            maps = self.estimate_maps(kspace) if maps is None else maps
            if preview and not self.config.is_classical:
                first = self.previewer.run(kspace, maps=maps)
                log.info("semrecon: %s preview in %.1f s", name, time.perf_counter() - started)
                yield Step("preview", kspace, first, f"semrecon preview {first.label}", time.perf_counter() - started)
            start = first.result.image if first is not None and self.config.start == "preview" else None
            final = self.run(kspace, maps=maps, callback=callback, start=start)
            yield Step("final", kspace, final, None, time.perf_counter() - started)
            return
        except Exception as exc:  # any failure of one scan becomes a labelled fallback
            reason = describe_error(exc, name)  # shortened for the image comment; the log gets all of it
            whole = f"{type(exc).__name__}: {exc}"
            log.error("semrecon: %s: %s: %s", name, failed, whole, exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            release_cuda_memory()
        if first is not None:  # the preview is the CG-SENSE image the fallback would compute
            comment = f"FALLBACK CG-SENSE ({failed}: {reason})"
            yield Step("fallback", kspace, first, comment, time.perf_counter() - started, error=reason)
            return
        for step in fallback_stream(kspace, self.config, f"{failed}: {reason}", maps=maps, name=name):
            yield replace(step, elapsed_s=time.perf_counter() - started)


# Longest error text put into an image comment (scanner displays truncate long comments anyway).
MAX_REASON = 160


@dataclass
class Step:
    """One result of :meth:`Pipeline.stream`: a preview, the final reconstruction, or a labelled fallback.

    Attributes:
        kind: ``preview``, ``final`` or ``fallback``.
        kspace: the scan.
        reconstruction: what the images are made of (``None`` for the zero-filled RSS last resort).
        comment: the ``GADGETRON_ImageComment`` (``None``: the reconstruction's own).
        elapsed_s: seconds from the start of :meth:`Pipeline.stream` until this step was ready.
        rss: the zero-filled root-sum-of-squares image of the last resort, else ``None``.
        error: why the fit failed (fallbacks), else ``None``.
    """

    kind: str
    kspace: KSpace
    reconstruction: Reconstruction | None
    comment: str | None
    elapsed_s: float = 0.0
    rss: torch.Tensor | None = None
    error: str | None = None

    @property
    def role(self) -> str:
        """The ``GADGETRON_DataRole``: ``Fallback`` for fallbacks, else ``Image``."""
        return "Fallback" if self.kind == "fallback" else "Image"

    def images(self, *, series_index: int) -> list[Any]:
        """The step's ``ismrmrd.Image`` s in series ``series_index`` (image indices 1, 2, ... by slice)."""
        if self.reconstruction is not None:
            return self.reconstruction.images(series_index=series_index, comment=self.comment, role=self.role)
        assert self.rss is not None
        return build_images(
            self.rss,
            self.kspace,
            config=ReconConfig(backbone="zero-filled", device="cpu"),
            comment=self.comment or "FALLBACK zero-filled RSS",
            role="Fallback",
            series_index=series_index,
        )


def fallback_stream(
    kspace: KSpace, config: ReconConfig, why: str, *, maps: torch.Tensor | None = None, name: str = ""
) -> Iterator[Step]:
    """The labelled fallback of a scan whose reconstruction failed (``why``): one :class:`Step`.

    The CG-SENSE image on the CPU (so that it also survives GPU out-of-memory errors), labelled ``FALLBACK
    CG-SENSE (<why>)``; when that fails too, the zero-filled root-sum-of-squares image labelled ``FALLBACK
    zero-filled RSS (<why>; CG-SENSE: <its error>)``. Never zeros, never raises for the data.
    """
    try:
        fallback = Pipeline(preview_config(config)).run(kspace, maps=maps)
    except Exception as exc:  # noqa: BLE001 - the last resort below is labelled as well
        second = describe_error(exc, name)
        log.error("semrecon: CG-SENSE fallback for %s failed too: %s", name or kspace.source, second)
        yield rss_fallback(kspace, f"FALLBACK zero-filled RSS ({why}; CG-SENSE: {second})", error=why)
        return
    yield Step("fallback", kspace, fallback, f"FALLBACK CG-SENSE ({why})", error=why)


def rss_fallback(kspace: KSpace, comment: str, *, error: str | None = None) -> Step:
    """The zero-filled root-sum-of-squares image of ``kspace`` (no coil maps) as a fallback step."""
    from semrecon_core.physics.coils import rss
    from semrecon_core.physics.fft import ifft2c

    return Step("fallback", kspace, None, comment, rss=rss(ifft2c(kspace.data)), error=error)


def describe_error(exc: BaseException, name: str = "") -> str:
    """``Type: message`` on one line, without a leading ``name: `` the caller states already; shortened."""
    message = str(exc)
    if name and message.startswith(f"{name}: "):
        message = message[len(name) + 2 :]
    text = f"{type(exc).__name__}: {message}".replace("\n", " ")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def release_cuda_memory() -> None:
    """Return cached GPU memory after a scan (when CUDA is in use)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reconstruct(
    kspace: KSpace,
    config: ReconConfig,
    *,
    maps: torch.Tensor | None = None,
    prior: Prior | None = None,
    callback: Callback | None = None,
) -> Reconstruction:
    """One-shot :meth:`Pipeline.run` for scripts and tests."""
    return Pipeline(config, prior=prior).run(kspace, maps=maps, callback=callback)
