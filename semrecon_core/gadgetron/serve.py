"""The warm server behind ``semrecon serve``: Gadgetron ``<connect>`` chains with the model kept loaded.

With ``<external><connect port="P" address="..."/>...</external>`` Gadgetron connects to a Python
process that is already running instead of launching one per scan. :class:`GadgetServer` listens on
127.0.0.1 (by default) and serves scans one after another with the semrecon gadget
(:class:`~semrecon_core.gadgetron.gadget.SemreconGadget`, one :class:`~semrecon_core.pipeline.Pipeline`
per scan): each connection is one session (CONFIG, HEADER, ReconData..., CLOSE) answered with images and
CLOSE. The prior of a configuration (for ``semantic``: encoder and embedding bank) is loaded by the first
scan that needs it (or :meth:`GadgetServer.preload`) and handed to the pipelines of the following scans.

Properties of a scan are, in increasing priority: the server's base properties (``--config``), the
CONFIG Gadgetron sends for the scan, and the overrides (``--set``). A scan whose properties do not
validate gets an ERROR message naming the property; a Gadgetron that goes away or stays silent for
``idle_timeout`` seconds ends that scan only. The command line lives in :mod:`semrecon_core.commands.serve`.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from semrecon_core.config import ReconConfig
    from semrecon_core.priors.base import Prior

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_POLL_SECONDS = 0.25


class GadgetServer:
    """Accepts Gadgetron ``<connect>`` sessions and reconstructs them with the semrecon gadget.

    Args:
        host, port: where to listen (port 0 picks a free port; see :attr:`address`).
        properties: base properties (from ``--config``), overridden by each scan's CONFIG.
        overrides: properties that win over each scan's CONFIG (``--set``).
        idle_timeout: seconds Gadgetron may stay silent (or not read) before the scan is dropped.

    The base settings are validated here, so a bad ``--config`` / ``--set`` fails before listening.
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int = 0,
        *,
        properties: dict[str, str] | None = None,
        overrides: dict[str, str] | None = None,
        idle_timeout: float = 3600.0,
    ) -> None:
        from semrecon_core.gadgetron import compat
        from semrecon_core.gadgetron.properties import settings_from_properties

        compat.install()
        self.properties = dict(properties or {})
        self.overrides = dict(overrides or {})
        self.idle_timeout = idle_timeout
        self.settings = settings_from_properties(
            {**self.properties, **self.overrides}, source="semrecon serve configuration"
        )
        self.scans = 0
        self._priors: dict[ReconConfig, Prior | None] = {}
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError as exc:
            self.listener.close()
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.listener.listen(4)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on."""
        host, port = self.listener.getsockname()[:2]
        return host, port

    def preload(self) -> Prior | None:
        """Load the prior of the base settings now (encoder and bank for ``semantic``); returns it."""
        return self.prior_for(self.settings.config)

    def prior_for(self, config: ReconConfig) -> Prior | None:
        """The prior ``config`` asks for, loaded by the first scan that needs it and kept for the next ones."""
        if config not in self._priors:
            from semrecon_core.pipeline import Pipeline

            start = time.perf_counter()
            prior = Pipeline(config).prior
            if prior is not None:
                log.warning("semrecon serve: loaded prior %s in %.1f s", prior.label, time.perf_counter() - start)
            self._priors[config] = prior
        return self._priors[config]

    def serve_forever(self, stop: threading.Event, *, max_scans: int = 0) -> int:
        """Serve scans until ``stop`` is set (or ``max_scans`` > 0 scans are done); the number served."""
        self.listener.settimeout(_POLL_SECONDS)
        while not stop.is_set() and not (max_scans and self.scans >= max_scans):
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            self.scans += 1
            log.warning("semrecon serve: scan %d from %s:%d", self.scans, *peer[:2])
            self.serve_scan(sock, name=f"scan {self.scans}")
        return self.scans

    def serve_scan(self, sock: socket.socket, *, name: str = "scan") -> None:
        """One session on an accepted socket; never raises for a failing scan (it is logged)."""
        from gadgetron.external import Connection

        _set_kernel_timeouts(sock, self.idle_timeout)
        start = time.perf_counter()
        try:
            connection = Connection(sock)
        except Exception as exc:  # noqa: BLE001 - one bad client (bad XML, wrong first message) must not stop the server
            log.error("semrecon serve: %s: no valid CONFIG/HEADER from Gadgetron (%s)", name, _reason(exc, self))
            sock.close()
            return
        with connection:
            try:
                gadget = self._gadget_for(connection, name)
            except Exception as exc:  # noqa: BLE001 - the scan is rejected with the cause; the server goes on
                log.error("semrecon serve: %s rejected: %s", name, exc)
                _send_error(connection, f"semrecon serve: {exc}")
                return
            try:
                gadget.handle(connection)
            except OSError as exc:
                log.error("semrecon serve: %s ended early: %s", name, _reason(exc, self))
                return
            except Exception as exc:  # reported to Gadgetron; the next scan is served
                log.exception("semrecon serve: %s failed", name)
                _send_error(connection, f"semrecon serve: {name} failed: {type(exc).__name__}: {exc}")
                return
        log.warning("semrecon serve: %s done in %.1f s", name, time.perf_counter() - start)

    def _gadget_for(self, connection: Any, name: str) -> Any:
        from semrecon_core.gadgetron.gadget import SemreconGadget
        from semrecon_core.gadgetron.properties import parse_properties, settings_from_properties

        source = f"{name} configuration"
        scan = parse_properties(connection.raw_bytes.config, source=source)
        settings = settings_from_properties({**self.properties, **scan, **self.overrides}, source=source)
        return SemreconGadget(settings, connection.header, prior=self.prior_for(settings.config))

    def close(self) -> None:
        """Stop listening."""
        self.listener.close()


def _set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Receive/send timeouts in the kernel: they survive gadgetron's ``settimeout(None)``."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _reason(exc: BaseException, server: GadgetServer) -> str:
    if isinstance(exc, BlockingIOError | TimeoutError):
        return f"Gadgetron was silent for more than {server.idle_timeout:.0f} s"
    return f"{type(exc).__name__}: {exc}"


def _send_error(connection: Any, text: str) -> None:
    """Send ERROR (``uint16`` id, ``uint64`` length, text), then read on until Gadgetron's CLOSE.

    Gadgetron stops sending on ERROR; closing with unread data would reset the connection before it has
    read the error.
    """
    from gadgetron.external import constants

    body = text.encode("utf-8")
    message = constants.GadgetMessageIdentifier.pack(constants.GADGET_MESSAGE_ERROR) + constants.uint64.pack(len(body))
    try:
        connection.socket.write(message + body)
        for _ in connection:
            pass
    except OSError as exc:
        log.warning("semrecon serve: could not deliver the error to Gadgetron (%s)", exc)
