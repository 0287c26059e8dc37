"""The logic of the semrecon Gadgetron gadget (``gadgets/semrecon_gadget.py`` is its thin entry point).

Input: Gadgetron ``ReconData`` messages, one ``ReconBit`` per encoding space, each with ``data`` (and
optionally ``ref``) buffers of dims ``[E0, E1, E2, CHA, N, S, LOC]``. For every bit the gadget builds the
core ``KSpace`` (``KSpace.from_recon_buffer``), estimates ESPIRiT coil maps from the reference or the
embedded ACS lines, calls :func:`semrecon_core.recon.reconstruct` and sends one float magnitude
``ismrmrd.Image`` per 2-D image (N × S × LOC) with the recon matrix and FOV, the acquisitions' geometry
and indices and meta (data role, comment naming backbone / prior / encoder, window, quality answer).

Output: ``ismrmrd.Image`` messages; every other message passes through unchanged.

Failure of one buffer never ends the scan and never yields silent zeros: the cause is logged, the
gadget reconstructs the buffer again with CG-SENSE and labels the image as a fallback; if even that
fails it sends a zero-filled root-sum-of-squares image labelled likewise. (Gadgetron ends the whole
stream when an external node sends ERROR, so per-buffer failures are reported through the log — the
child's output lands in Gadgetron's log — and in the image comment, ``GADGETRON_DataRole=Fallback``.)
The fallback runs on the CPU so that it also survives GPU out-of-memory errors.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np

from semrecon_core.config import ReconConfig
from semrecon_core.gadgetron.properties import GadgetSettings, settings_from_configuration

log = logging.getLogger(__name__)

# Longest error text put into an image comment (scanner displays truncate long comments anyway).
_MAX_REASON = 160


class SemreconGadget:
    """Reconstructs ReconData buffers of one scan; keeps the running image index.

    Args:
        settings: validated gadget settings (reconstruction config, series index).
        header: the scan's ISMRMRD header (``ismrmrd.xsd.ismrmrdHeader``).
        prior: an already loaded prior to reuse (``semrecon serve``); ``None``: the semantic prior
            is built by :func:`semrecon_core.priors.build_prior` (cached per process), others by the engine.
    """

    def __init__(self, settings: GadgetSettings, header: Any, *, prior: Any = None) -> None:
        self.settings = settings
        self.header = header
        self.prior = prior
        self._indices = itertools.count(1)
        self._buffers = itertools.count(1)

    def process(self, recon_data: Any) -> list[Any]:
        """All images for one ``gadgetron.types.ReconData`` (one or more bits)."""
        images: list[Any] = []
        buffer = next(self._buffers)
        for number, bit in enumerate(recon_data.bits):
            images.extend(self.process_bit(bit, name=f"ReconData #{buffer} bit {number}"))
        return images

    def process_bit(self, bit: Any, *, name: str = "buffer") -> list[Any]:
        """Images for one ``ReconBit``; falls back (labelled) instead of raising on bad data."""
        config = self.settings.config
        try:
            return self._reconstruct_bit(bit, config, name=name)
        except Exception as exc:  # noqa: BLE001 - any failure of one buffer becomes a labelled fallback
            reason = _describe(exc)
            log.error(
                "semrecon: %s could not be reconstructed with %s+%s: %s",
                name,
                config.backbone,
                config.prior,
                reason,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        finally:
            _release_cuda_memory()
        fallback = ReconConfig(
            backbone="sense", prior="none", device="cpu", seed=config.seed, calib_width=config.calib_width
        )
        comment = f"FALLBACK CG-SENSE ({config.backbone}+{config.prior} failed: {reason})"
        try:
            return self._reconstruct_bit(bit, fallback, name=name, comment=comment, prior=None)
        except Exception as exc:  # noqa: BLE001 - the last resort below is labelled as well
            second = _describe(exc)
            log.error("semrecon: CG-SENSE fallback for %s failed too: %s", name, second)
        failed = f"{config.backbone}+{config.prior} failed: {reason}"
        comment = f"FALLBACK zero-filled RSS ({failed}; CG-SENSE: {second})"
        return self._rss_images(bit, comment)

    def handle(self, connection: Any) -> None:
        """Serve one scan on a ``gadgetron.external.Connection`` (or anything that mimics it)."""
        from gadgetron.types import ReconData

        buffers = 0
        start = time.perf_counter()
        for item in connection:
            if isinstance(item, ReconData):
                buffers += 1
                for image in self.process(item):
                    connection.send(image)
            else:
                connection.send(item)
        log.info("semrecon: %d buffer(s) done in %.1f s", buffers, time.perf_counter() - start)

    # -- internals -----------------------------------------------------------------------------

    def _reconstruct_bit(
        self, bit: Any, config: ReconConfig, *, name: str, comment: str | None = None, prior: Any = ...
    ) -> list[Any]:
        from semrecon_core.data.readers import from_recon_buffer
        from semrecon_core.physics.coils import espirit_maps
        from semrecon_core.recon import reconstruct as run_reconstruction
        from semrecon_core.recon import resolve_device

        kspace = from_recon_buffer(bit.data, bit.ref, self.header, source=name)
        device = resolve_device(config.device)
        maps = espirit_maps(kspace, device=str(device))
        if prior is ...:
            prior = self.prior
            if prior is None and config.prior == "semantic":
                from semrecon_core.priors import build_prior

                prior = build_prior(config, device)  # cached: encoder and bank load once per process
        result = run_reconstruction(kspace, maps, config, prior=prior)
        image = result.image
        if not bool(np.isfinite(image.abs().numpy()).all()):
            raise FloatingPointError(f"{name}: the {config.backbone} reconstruction contains NaN or Inf")
        label = comment or f"semrecon {result.label}"
        role = "Image" if comment is None else "Fallback"
        answers = None
        if comment is None and callable(getattr(prior, "answer", None)):
            import torch

            with torch.no_grad():  # the model's quality answer for the final image (image-language banks)
                answers = prior.answer(image.to(device))
        return self._images(image, kspace, label, config, role=role, answers=answers)

    def _images(
        self, image: Any, kspace: Any, comment: str, config: ReconConfig, *, role: str, answers: Any = None
    ) -> list[Any]:
        from semrecon_core.data.images import to_ismrmrd_images

        meta = {
            "GADGETRON_DataRole": role,
            "GADGETRON_ImageComment": _ascii(comment),
            "GADGETRON_SeqDescription": f"_semrecon_{config.backbone}_{config.prior}",
            "GADGETRON_ImageProcessingHistory": "SEMRECON",
        }
        images = to_ismrmrd_images(image.abs(), kspace, series_index=self.settings.series_index, meta=meta)
        for number, img in enumerate(images):
            img.image_index = next(self._indices)
            img.image_series_index = self.settings.series_index
            if answers:
                _add_answer(img, answers[min(number, len(answers) - 1)])
        return images

    def _rss_images(self, bit: Any, comment: str) -> list[Any]:
        """Zero-filled RSS per 2-D image straight from the raw buffer (no KSpace, no maps)."""
        import ismrmrd

        buffer = bit.data
        data = np.nan_to_num(np.asarray(buffer.data, dtype=np.complex64))
        if data.ndim != 7:
            data = data.reshape(data.shape + (1,) * (7 - data.ndim))
        _, _, e2, _, n_count, s_count, loc_count = data.shape
        sampling = buffer.sampling
        recon_matrix = (int(sampling.recon_matrix[0]), int(sampling.recon_matrix[1]))
        fov = tuple(float(v) for v in sampling.recon_FOV)
        headers = np.asarray(buffer.headers, dtype=object)
        images = []
        for n, s, loc in itertools.product(range(n_count), range(s_count), range(loc_count)):
            coil_images = np.fft.fftshift(
                np.fft.ifft2(
                    np.fft.ifftshift(data[:, :, e2 // 2, :, n, s, loc], axes=(0, 1)),
                    axes=(0, 1),
                    norm="ortho",
                ),
                axes=(0, 1),
            )
            rss = np.sqrt((np.abs(coil_images) ** 2).sum(axis=-1))  # (x, y)
            rss = _centre_crop(rss, recon_matrix).T.astype(np.float32)  # (y, x)
            acquisition = _first_sampled_header(headers, n, s, loc)
            img = ismrmrd.Image.from_array(rss, image_type=ismrmrd.IMTYPE_MAGNITUDE, field_of_view=fov)
            if acquisition is not None:
                _copy_acquisition_geometry(img, acquisition)
            img.image_index = next(self._indices)
            img.image_series_index = self.settings.series_index
            center, width = _window(rss)
            img.meta = {
                "GADGETRON_DataRole": "Fallback",
                "GADGETRON_ImageComment": _ascii(comment),
                "GADGETRON_SeqDescription": "_semrecon_fallback_rss",
                "GADGETRON_ImageProcessingHistory": "SEMRECON",
                "GADGETRON_WindowCenter": center,
                "GADGETRON_WindowWidth": width,
            }
            images.append(img)
        if not images:
            log.error("semrecon: buffer with dims %s holds no 2-D image; nothing to send", data.shape)
        return images


def settings_from_connection(connection: Any, overrides: dict[str, str] | None = None) -> GadgetSettings:
    """Validate the connection's ``<configuration>`` (``connection.config``) into gadget settings."""
    raw = getattr(getattr(connection, "raw_bytes", None), "config", None)
    configuration = raw if raw is not None else connection.config
    return settings_from_configuration(configuration, overrides=overrides, source="semrecon gadget configuration")


def reconstruct(connection: Any) -> None:
    """The Gadgetron target: validate the properties, then reconstruct every buffer of the scan."""
    settings = settings_from_connection(connection)
    log.info(
        "semrecon gadget: backbone=%s prior=%s device=%s",
        settings.config.backbone,
        settings.config.prior,
        settings.config.device,
    )
    SemreconGadget(settings, connection.header).handle(connection)


# -- helpers -------------------------------------------------------------------------------------


def _release_cuda_memory() -> None:
    """Return cached GPU memory after a buffer (only when torch has already been imported with CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


_ASCII = str.maketrans({"λ": "lambda", "σ": "sigma", "τ": "tau", "×": "x", "→": "->", "≥": ">=", "≤": "<=", "…": "..."})


def _ascii(text: str) -> str:
    """Meta containers travel as ASCII on the wire; transliterate or replace anything else."""
    return text.translate(_ASCII).encode("ascii", "replace").decode("ascii")


def _window(magnitude: np.ndarray) -> tuple[str, str]:
    """Window centre/width spanning 0 to the image maximum (as for the reconstructed images)."""
    peak = float(magnitude.max()) if magnitude.size else 0.0
    return f"{peak / 2:.6g}", f"{peak:.6g}"


def _add_answer(img: Any, answer: dict[str, Any]) -> None:
    """Meta ``SEMRECON_QualityAnswer``, ``SEMRECON_QualityChoice``, ``SEMRECON_P_<WORD>`` from an answer."""
    if "answer" in answer:
        img.meta["SEMRECON_QualityAnswer"] = _ascii(str(answer["answer"]).strip())
    if "choice" in answer:
        img.meta["SEMRECON_QualityChoice"] = _ascii(str(answer["choice"]))
    for key, value in answer.items():
        if key.startswith("p_"):
            img.meta[f"SEMRECON_P_{_ascii(key[2:]).upper()}"] = f"{float(value):.4f}"


def _centre_crop(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre crop or zero-pad the first two axes of ``image`` to ``shape``."""
    out = np.zeros(shape, dtype=image.dtype)
    pairs = list(zip(image.shape, shape, strict=True))
    src = [slice(max((a - b) // 2, 0), max((a - b) // 2, 0) + min(a, b)) for a, b in pairs]
    dst = [slice(max((b - a) // 2, 0), max((b - a) // 2, 0) + min(a, b)) for a, b in pairs]
    out[tuple(dst)] = image[tuple(src)]
    return out


def _first_sampled_header(headers: np.ndarray, n: int, s: int, loc: int) -> Any:
    """The first acquisition header (dims [E1, E2, N, S, LOC]) with data for this image, if any."""
    if headers.ndim != 5:
        return headers.flat[0] if headers.size else None
    for header in headers[:, :, n, s, loc].flat:
        if header is not None and getattr(header, "number_of_samples", 0) > 0:
            return header
    return headers[0, 0, n, s, loc]


def _copy_acquisition_geometry(img: Any, acquisition: Any) -> None:
    for name in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
        setattr(img, name, tuple(getattr(acquisition, name)))
    for name in ("slice", "repetition", "contrast", "phase", "average", "set"):
        setattr(img, name, int(getattr(acquisition.idx, name)))
    img.measurement_uid = int(acquisition.measurement_uid)
    img.acquisition_time_stamp = int(acquisition.acquisition_time_stamp)
