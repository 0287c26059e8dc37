"""The logic of the semrecon Gadgetron gadget (``gadgets/semrecon_gadget.py`` is its thin entry point).

Input: Gadgetron ``ReconData`` messages, one ``ReconBit`` per encoding space, each with ``data`` (and
optionally ``ref``) buffers of dims ``[E0, E1, E2, CHA, N, S, LOC]``. Every bit becomes the core ``KSpace``
(:func:`~semrecon_core.data.readers.from_recon_buffer`, the constructor offline replay uses too) and is
reconstructed by the gadget's one :class:`~semrecon_core.pipeline.Pipeline` (ESPIRiT maps honouring
``calib_width``, the configured engine, the quality answer), exactly as ``semrecon recon`` does.

Output: one float32 magnitude ``ismrmrd.Image`` per 2-D image (N × S × LOC) from
:meth:`~semrecon_core.pipeline.Reconstruction.images` (recon matrix and FOV, the acquisitions' geometry,
meta naming backbone / prior / encoder, window, quality answer), numbered across the scan in the
configured series; every other message passes through unchanged. The window (centre, width) describes the
pixels as they leave the chain: after the AutoScale and FloatToUShort gadgets that follow the gadget in
semrecon's chains (properties ``display_max_value``, ``display_max_intensity``; 0 for a chain without them).

Preview: for the fitted backbones (U-Net, unrolled, INR) the coil maps of a buffer are estimated once and a
CG-SENSE image goes out at once in its own series (``preview_series_index``, default ``series_index + 1``;
comment ``semrecon preview ...``), before the fit starts; the fitted images follow in ``series_index`` with the
iterations run and why the fit stopped in their comment. ``preview=false`` turns it off.

The order of preview, fit and fallback is the core's online recipe,
:meth:`~semrecon_core.pipeline.Pipeline.stream`; the gadget only numbers and windows its images. Failure of one
buffer never ends the scan and never yields silent zeros: the cause is logged and the buffer's preview goes
out again in the main series or, without one, the CPU CG-SENSE image, else the zero-filled root-sum-of-squares
image, labelled ``FALLBACK ... (<backbone>+<prior> failed: <the error>)`` with ``GADGETRON_DataRole=Fallback``
(a buffer from which no ``KSpace`` can be built gets the RSS image). Settings this machine cannot satisfy
(``device=cuda`` without CUDA: :func:`~semrecon_core.settings.check_machine`, checked once when the gadget is made)
are logged as an ERROR and every buffer of the scan gets the CPU CG-SENSE fallback, labelled ``FALLBACK CG-SENSE
(<backbone>+<prior> failed: MachineError: <the message>)``; no preview. (Gadgetron ends the whole stream when an
external node sends ERROR, so per-buffer failures are reported through the log, which lands in Gadgetron's log,
and in the image comment.)

What ends the scan is reported to Gadgetron as an ERROR naming the cause before the connection closes:
properties that do not validate (before the first buffer is read) and messages the gadget refuses
(:class:`~semrecon_core.gadgetron.compat.BadMessage`: an unknown message id, a claimed size beyond what a
scan can need). In a gadget process launched by Gadgetron the exit status then says what happened:
0 the scan is done, 2 (:data:`~semrecon_core.gadgetron.compat.EXIT_REFUSED`) refused with an ERROR,
3 (:data:`~semrecon_core.gadgetron.compat.EXIT_GADGETRON_GONE`) Gadgetron went away, 1 an unexpected
failure (logged with its traceback, ERROR sent). In-process callers get the exception instead.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from semrecon_core.config import ConfigError
from semrecon_core.data.images import set_window
from semrecon_core.data.kspace import KSpace
from semrecon_core.gadgetron import compat
from semrecon_core.gadgetron.properties import GadgetSettings, settings_from_configuration
from semrecon_core.pipeline import Pipeline, describe_error, fallback_stream, rss_fallback
from semrecon_core.settings import MachineError

if TYPE_CHECKING:
    import threading

    from semrecon_core.priors.base import Prior

log = logging.getLogger(__name__)

# Longest error text put into an image comment (scanner displays truncate long comments anyway).
_MAX_REASON = 160


class SemreconGadget:
    """Reconstructs the ReconData buffers of one scan with one pipeline; numbers the images it sends.

    Args:
        settings: validated gadget settings (reconstruction config, series index).
        header: the scan's ISMRMRD header (``ismrmrd.xsd.ismrmrdHeader`` or its XML text).
        prior: an already loaded prior to reuse (``semrecon serve`` keeps one between scans); ``None``:
            the pipeline builds the prior ``settings.config`` asks for on the first buffer.
        device_lock: held while a buffer is reconstructed (``semrecon serve`` shares one between its
            connections, so reconstructions run one at a time while every connection keeps reading).
    """

    def __init__(
        self,
        settings: GadgetSettings,
        header: Any,
        *,
        prior: Prior | None = None,
        device_lock: threading.Lock | None = None,
    ) -> None:
        self.settings = settings
        self.header = header
        self.device_lock = device_lock
        self.refused: MachineError | None = None
        self.pipeline: Pipeline | None = None
        try:
            self.pipeline = Pipeline(settings.config, prior=prior)
        except MachineError as exc:  # settings this machine cannot satisfy: every buffer gets the fallback
            log.error("semrecon: %s; every buffer of this scan gets the labelled CG-SENSE fallback", exc)
            self.refused = exc
        self._indices: defaultdict[int, Iterator[int]] = defaultdict(lambda: itertools.count(1))
        self._buffers = itertools.count(1)

    def process(self, recon_data: Any) -> list[Any]:
        """All images for one ``gadgetron.types.ReconData`` (one or more bits), previews first."""
        return list(self.stream(recon_data))

    def stream(self, recon_data: Any) -> Iterator[Any]:
        """The images of one ``ReconData`` as they are ready: each bit's preview, then its fitted images."""
        buffer = next(self._buffers)
        for number, bit in enumerate(recon_data.bits):
            yield from self.process_bit(bit, name=f"ReconData #{buffer} bit {number}")

    def process_bit(self, bit: Any, *, name: str = "buffer") -> Iterator[Any]:
        """Images for one ``ReconBit``, numbered on per series; labelled fallbacks instead of errors."""
        return self._numbered(self._images_of(bit, name))

    def process_kspace(self, kspace: KSpace, *, name: str = "volume") -> Iterator[Any]:
        """Images for one ``KSpace`` (a volume the MRD server assembled), numbered on per series as the buffers'."""
        return self._numbered(self._kspace_images(kspace, name))

    def locked(self, images: Iterator[Any]) -> Iterator[Any]:
        """``images`` computed under the device lock, which is released while each one is sent."""
        while True:
            with self.device_lock or contextlib.nullcontext():
                image = next(images, None)
            if image is None:
                return
            yield image

    def handle(self, connection: Any) -> None:
        """Serve one scan on a ``gadgetron.external.Connection`` (or anything that mimics it)."""
        from gadgetron.types import ReconData

        buffers = 0
        start = time.perf_counter()
        for item in connection:
            if isinstance(item, ReconData):
                buffers += 1
                for image in self.locked(self.stream(item)):
                    connection.send(image)
            else:
                connection.send(item)
        log.info("semrecon: %d buffer(s) done in %.1f s", buffers, time.perf_counter() - start)

    # -- internals -----------------------------------------------------------------------------

    def _numbered(self, images: Iterator[Any]) -> Iterator[Any]:
        for image in images:
            image.image_index = next(self._indices[int(image.image_series_index)])
            set_window(image, self.settings.display)
            yield image

    def _images_of(self, bit: Any, name: str) -> Iterator[Any]:
        from semrecon_core.data.readers import from_recon_buffer

        config = self.settings.config
        failed = f"{config.backbone}+{config.prior} failed"
        try:
            kspace = from_recon_buffer(bit.data, bit.ref, self.header, source=name)
        except Exception as exc:  # noqa: BLE001 - a buffer the core refuses still gets a labelled image
            reason = describe_error(exc, name)
            log.error("semrecon: %s cannot be reconstructed: %s", name, reason)
            step = rss_fallback(_raw_kspace(bit, name), f"FALLBACK zero-filled RSS ({failed}: {reason})")
            yield from step.images(series_index=self.settings.series_index)
            return
        yield from self._kspace_images(kspace, name)

    def _kspace_images(self, kspace: KSpace, name: str) -> Iterator[Any]:
        config = self.settings.config
        failed = f"{config.backbone}+{config.prior} failed"
        if self.pipeline is None:  # refused on this machine (check_machine)
            reason = describe_error(self.refused or MachineError("no pipeline"))
            log.error("semrecon: %s: %s: %s", name, failed, reason)
            steps = fallback_stream(kspace, config, f"{failed}: {reason}", name=name)
        else:
            steps = self.pipeline.stream(kspace, preview=self.settings.preview, name=name)
        for step in steps:
            series = self.settings.preview_series if step.kind == "preview" else self.settings.series_index
            yield from step.images(series_index=series)


def _raw_kspace(bit: Any, source: str) -> KSpace:
    """The samples of ``bit.data`` as a ``KSpace`` without checks: the last resort when the core refuses a buffer.

    NaN and Inf become zero and there is no calibration region; entries are ordered as by
    :func:`~semrecon_core.data.readers.from_recon_buffer` (N fastest, then S, LOC), each with the first
    acquisition header that has data, and the central E2 partition.
    """
    from semrecon_core.data.readers import _geometry_from_sampling

    buffer = bit.data
    data = np.nan_to_num(np.asarray(buffer.data, dtype=np.complex64), posinf=0.0, neginf=0.0)
    if data.ndim > 7:
        raise ValueError(f"{source}: expected buffer data [E0, E1, E2, CHA, N, S, LOC], found shape {data.shape}")
    shape: tuple[int, ...] = data.shape + (1,) * (7 - data.ndim)
    e0, e1, e2, channels, n_size, s_size, loc_size = shape
    data = data.reshape(shape)
    # (E0, E1, CHA, N, S, LOC) -> (entries, CHA, E1, E0)
    planes = np.ascontiguousarray(data[:, :, e2 // 2].transpose(5, 4, 3, 2, 1, 0).reshape(-1, channels, e1, e0))
    headers = np.asarray(buffer.headers, dtype=object).reshape(-1, n_size, s_size, loc_size)
    first = [
        next((h for h in headers[:, n, s, loc] if int(h.number_of_samples) > 0), headers[0, n, s, loc])
        for loc in range(loc_size)
        for s in range(s_size)
        for n in range(n_size)
    ]
    return KSpace(
        data=torch.from_numpy(planes),
        mask=torch.from_numpy(np.abs(planes).sum(axis=1) > 0),
        calibration=torch.zeros((len(planes), channels, 0, 0), dtype=torch.complex64),
        geometry=_geometry_from_sampling(buffer.sampling),
        headers=tuple(first),
        source=source,
    )


# How errors in the properties name where they come from.
CONFIG_SOURCE = "the CONFIG message (the <external> node's <configuration>)"


def settings_from_connection(connection: Any, overrides: dict[str, str] | None = None) -> GadgetSettings:
    """Validate the connection's ``<configuration>`` (``connection.config``) into gadget settings."""
    raw = getattr(getattr(connection, "raw_bytes", None), "config", None)
    configuration = raw if raw is not None else connection.config
    return settings_from_configuration(configuration, overrides=overrides, source=CONFIG_SOURCE)


def reconstruct(connection: Any) -> None:
    """The Gadgetron target: validate the properties, then reconstruct every buffer of the scan.

    What ends the scan early is logged and sent to Gadgetron as an ERROR; in a gadget process launched by
    Gadgetron the process then exits with the status of the module docstring, elsewhere the exception
    propagates.
    """
    try:
        settings = settings_from_connection(connection)
        log.info(
            "semrecon gadget: backbone=%s prior=%s device=%s",
            settings.config.backbone,
            settings.config.prior,
            settings.config.device,
        )
        SemreconGadget(settings, connection.header).handle(connection)
    except (ConfigError, compat.BadMessage) as exc:
        text = f"semrecon gadget: {exc}"
        log.error("%s", text)
        _report(connection, text)
        if compat.launched_by_gadgetron():
            raise SystemExit(compat.EXIT_REFUSED) from None
        raise
    except ConnectionError as exc:  # Gadgetron has gone: nobody to report to
        log.error("semrecon gadget: %s; ending the external Python process", exc)
        if compat.launched_by_gadgetron():
            raise SystemExit(compat.EXIT_GADGETRON_GONE) from None
        raise
    except Exception as exc:
        log.exception("semrecon gadget: the scan failed")
        _report(connection, f"semrecon gadget: the scan failed: {type(exc).__name__}: {exc}")
        raise


def _report(connection: Any, text: str) -> None:
    """Send ``text`` as an ERROR on ``connection``'s socket (a real Gadgetron connection only)."""
    sock = getattr(getattr(connection, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        compat.send_error(sock, text)
