"""``semrecon serve``: a warm server for Gadgetron ``<connect>`` chains.

With ``<external><connect port="P" address="..."/>...</external>`` Gadgetron connects to a Python
process that is already running instead of launching one per scan. This server listens on
127.0.0.1 (by default), loads the encoder and embedding bank of the semantic prior once
(:func:`semrecon_core.priors.build_prior` caches them) and serves scans one after another with the
semrecon gadget (:class:`~semrecon_core.gadgetron.gadget.SemreconGadget`): each connection is one
session (CONFIG, HEADER, ReconData..., CLOSE) answered with images and CLOSE.

Properties of a scan are, in increasing priority: the ``<configuration>`` of ``--config CHAIN.xml``,
the CONFIG Gadgetron sends for the scan, and ``--set name=value``. A scan whose properties do not
validate gets an ERROR message naming the property; a Gadgetron that goes away or stays silent for
``--idle-timeout`` seconds ends that scan only. SIGINT / SIGTERM stop the server after the running
scan (a second signal aborts it).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

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

    def preload(self) -> Any:
        """Load the prior of the base settings now (encoder and bank for ``semantic``); returns it."""
        config = self.settings.config
        if config.prior == "none":
            return None
        start = time.perf_counter()
        prior = _build_prior(config)
        log.warning(
            "semrecon serve: loaded prior %s in %.1f s",
            getattr(prior, "label", config.prior),
            time.perf_counter() - start,
        )
        return prior

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
            except (ValueError, OSError, ImportError) as exc:
                log.error("semrecon serve: %s rejected: %s", name, exc)
                _send_error(connection, f"semrecon serve: {exc}")
                return
            try:
                gadget.handle(connection)
            except OSError as exc:
                log.error("semrecon serve: %s ended early: %s", name, _reason(exc, self))
                return
            except Exception as exc:  # noqa: BLE001 - reported to Gadgetron; the next scan is served
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
        prior = None if settings.config.prior == "none" else _build_prior(settings.config)
        return SemreconGadget(settings, connection.header, prior=prior)

    def close(self) -> None:
        """Stop listening."""
        self.listener.close()


def _build_prior(config: Any) -> Any:
    from semrecon_core.priors import build_prior
    from semrecon_core.recon import resolve_device

    return build_prior(config, resolve_device(config.device))


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
    """Send ERROR, then read what Gadgetron still sends until its CLOSE (it stops sending on ERROR);
    closing with unread data would reset the connection before Gadgetron has read the error."""
    from semrecon_core.gadgetron import protocol

    try:
        protocol.write_error(connection.socket, text)
        for _ in connection:
            pass
    except OSError as exc:
        log.warning("semrecon serve: could not deliver the error to Gadgetron (%s)", exc)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``semrecon serve`` options."""
    parser.add_argument("--port", type=int, help="TCP port (default: the <connect port> of --config; 0: any free)")
    parser.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="CHAIN.xml",
        help="chain whose <external> <configuration> gives the base properties",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="property that wins over the scan's configuration (repeatable)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="drop a scan when Gadgetron is silent this long (default 3600 s)",
    )
    parser.add_argument(
        "--max-scans",
        type=int,
        default=0,
        metavar="N",
        help="exit after N scans (default 0: run until SIGINT/SIGTERM)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (or ``--max-scans``)."""
    from semrecon_core.gadgetron.properties import parse_assignments

    properties: dict[str, str] = {}
    port = args.port
    if args.config is not None:
        from semrecon_core.gadgetron.chain import parse_chain

        node = parse_chain(args.config).external
        if node is None:
            raise ValueError(f"{args.config}: the chain has no <external> node")
        properties = dict(node.properties)
        port = node.port if port is None else port
    if port is None:
        raise ValueError("--port: give a port (or a --config chain with <connect port=...>)")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port: expected 0..65535, found {port}")
    if args.idle_timeout <= 0:
        raise ValueError(f"--idle-timeout: expected a positive number of seconds, found {args.idle_timeout}")
    if args.host not in (LOOPBACK, "localhost", "::1"):
        log.warning("semrecon serve: listening on %s exposes the reconstruction server beyond this machine", args.host)
    server = GadgetServer(
        args.host,
        port,
        properties=properties,
        overrides=parse_assignments(args.set),
        idle_timeout=args.idle_timeout,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning(
            "semrecon serve: %s received; stopping after the running scan (send it again to abort)",
            signal.Signals(signum).name,
        )
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.preload()
        host, bound = server.address
        print(f"semrecon serve: listening on {host}:{bound}", flush=True)
        served = server.serve_forever(stop, max_scans=args.max_scans)
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"semrecon serve: stopped after {served} scan(s)", flush=True)
    return 0
