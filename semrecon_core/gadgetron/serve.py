"""The warm server behind ``semrecon serve``: Gadgetron ``<connect>`` chains with the model kept loaded.

With ``<external><connect port="P" address="..."/>...</external>`` Gadgetron connects to a Python
process that is already running instead of launching one per scan. :class:`GadgetServer` listens on
127.0.0.1 (by default) and serves each connection in its own thread with the semrecon gadget
(:class:`~semrecon_core.gadgetron.gadget.SemreconGadget`, one :class:`~semrecon_core.pipeline.Pipeline`
per scan): each connection is one session (CONFIG, HEADER, ReconData..., CLOSE) answered with images and
CLOSE. The prior of a configuration (for ``semantic``: encoder and embedding bank) is loaded by the first
scan that needs it (or :meth:`GadgetServer.preload`) and handed to the pipelines of the following scans.

Connections are independent: a client that is slow, silent, or sends something the server refuses never
holds up another one. Every connection reads with its own timeouts (``handshake_timeout`` until the
HEADER is complete, ``idle_timeout`` afterwards), claimed sizes are checked before anything is allocated
(:mod:`~semrecon_core.gadgetron.compat`), and at most ``max_connections`` sessions run at once (one more
is refused with an ERROR). Reconstructions run one at a time (one lock around each buffer's
reconstruction, so one device is never shared by two scans); reading, validating and sending go on in
parallel.

Properties of a scan are, in increasing priority: the server's base properties (``--config``), the
CONFIG Gadgetron sends for the scan, and the overrides (``--set``). A scan whose properties do not
validate, or that sends a message the server refuses, gets an ERROR naming the cause; a Gadgetron that
goes away or stays silent too long ends that scan only. Settings this machine cannot satisfy
(:func:`~semrecon_core.settings.check_machine`: ``device=cuda`` without CUDA) stop the server before it listens
when they are its own (``--config``, ``--set``); when a scan's CONFIG asks for them, the scan's every buffer gets
the labelled CG-SENSE fallback and an ERROR is logged, as in the gadget.

Graceful stop: once its stop event is set, :meth:`GadgetServer.serve_forever` refuses new connections with an
ERROR, closes the connections whose CONFIG and HEADER have not arrived (with an ERROR), and lets the scans in
progress finish and send their images for up to ``grace_s`` seconds (default :data:`DEFAULT_GRACE_S`, inside
Docker's 10 s and Kubernetes' 30 s stop timeouts); scans still running then are closed with an ERROR, and it
returns within ``shutdown_timeout`` seconds more. The command line lives in :mod:`semrecon_core.commands.serve`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from semrecon_core.config import ReconConfig
    from semrecon_core.priors.base import Prior

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_POLL_SECONDS = 0.25
DEFAULT_GRACE_S = 8.0
"""Seconds the scans in progress get to finish after a stop (SIGTERM): inside Docker's default 10 s stop timeout."""
_CLOSE_LINGER_S = 1.0  # how long a closing ERROR waits for Gadgetron to read it (shutdown)


@dataclass
class _Session:
    """One accepted connection and the thread serving it."""

    name: str
    sock: socket.socket
    thread: threading.Thread = field(init=False)
    stopped: bool = False  # closed by the server's shutdown
    running: bool = False  # CONFIG and HEADER read: a scan in progress, which a graceful stop lets finish
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while sending on ``sock``; guards the flags


class GadgetServer:
    """Accepts Gadgetron ``<connect>`` sessions and reconstructs them with the semrecon gadget.

    Args:
        host, port: where to listen (port 0 picks a free port; see :attr:`address`).
        properties: base properties (from ``--config``), overridden by each scan's CONFIG.
        overrides: properties that win over each scan's CONFIG (``--set``).
        idle_timeout: seconds Gadgetron may stay silent (or not read) during a scan before it is dropped.
        handshake_timeout: seconds a new connection has to deliver CONFIG and HEADER (at most
            ``idle_timeout``).
        max_connections: sessions served at once; one more is refused with an ERROR.

    The base settings are validated and checked against this machine here, so a bad ``--config`` / ``--set``
    fails before listening (``ConfigError``; ``MachineError`` for a device this machine lacks).
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int = 0,
        *,
        properties: dict[str, str] | None = None,
        overrides: dict[str, str] | None = None,
        idle_timeout: float = 3600.0,
        handshake_timeout: float = 30.0,
        max_connections: int = 8,
    ) -> None:
        from semrecon_core.gadgetron import compat
        from semrecon_core.gadgetron.properties import settings_from_properties
        from semrecon_core.settings import check_machine

        if max_connections < 1:
            raise ValueError(f"max_connections: expected at least 1, found {max_connections}")
        compat.install()
        self.properties = dict(properties or {})
        self.overrides = dict(overrides or {})
        self.idle_timeout = idle_timeout
        self.handshake_timeout = min(handshake_timeout, idle_timeout)
        self.max_connections = max_connections
        self.settings = settings_from_properties(
            {**self.properties, **self.overrides}, source="semrecon serve configuration"
        )
        check_machine(self.settings.config)
        self._closers: list[threading.Thread] = []
        self.scans = 0
        self._priors: dict[ReconConfig, Prior | None] = {}
        self._prior_lock = threading.Lock()
        self._device_lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._sessions_lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError as exc:
            self.listener.close()
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.listener.listen(max(4, max_connections))

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on."""
        host, port = self.listener.getsockname()[:2]
        return host, port

    @property
    def active(self) -> int:
        """Sessions being served now."""
        with self._sessions_lock:
            return len(self._sessions)

    def preload(self) -> Prior | None:
        """Load the prior of the base settings now (encoder and bank for ``semantic``); returns it."""
        return self.prior_for(self.settings.config)

    def prior_for(self, config: ReconConfig) -> Prior | None:
        """The prior ``config`` asks for, loaded by the first scan that needs it and kept for the next ones."""
        with self._prior_lock:
            if config not in self._priors:
                from semrecon_core.pipeline import Pipeline
                from semrecon_core.settings import MachineError

                start = time.perf_counter()
                try:
                    prior = Pipeline(config).prior
                except MachineError:  # the scan's gadget logs it and sends the labelled fallback for every buffer
                    return None
                if prior is not None:
                    log.warning("semrecon serve: loaded prior %s in %.1f s", prior.label, time.perf_counter() - start)
                self._priors[config] = prior
            return self._priors[config]

    def serve_forever(
        self,
        stop: threading.Event,
        *,
        max_scans: int = 0,
        grace_s: float = DEFAULT_GRACE_S,
        shutdown_timeout: float = 1.0,
    ) -> int:
        """Serve connections until ``stop`` is set (or ``max_scans`` > 0 scans are done); the number accepted.

        With ``max_scans`` reached the server stops accepting and waits for the open sessions to end
        (each bounded by its timeouts). Once ``stop`` is set the server stops gracefully: new connections get an
        ERROR, connections without a complete CONFIG and HEADER are closed with an ERROR, and the scans in progress
        have ``grace_s`` seconds to finish and send their images; those still running then are closed with an
        ERROR and the call returns within ``shutdown_timeout`` seconds more.
        """
        self.listener.settimeout(_POLL_SECONDS)
        while not stop.is_set() and not (max_scans and self.scans >= max_scans):
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # the listener was closed
                break
            self._start(sock, peer)
        while not stop.is_set() and self.active:
            stop.wait(_POLL_SECONDS)
        if stop.is_set():
            self._drain(grace_s)
        self._shut_down(shutdown_timeout)
        return self.scans

    def _drain(self, grace_s: float) -> None:
        """Refuse new connections and close the unstarted ones, while the scans in progress finish (``grace_s``)."""
        deadline = time.monotonic() + grace_s
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        running = [session.name for session in sessions if self._lets_finish(session)]
        if running:
            log.warning(
                "semrecon serve: stopping: %s may finish within %g s; new scans are refused",
                ", ".join(running),
                grace_s,
            )
        listening = True
        while self.active and (left := deadline - time.monotonic()) > 0:
            if not listening:
                time.sleep(min(_POLL_SECONDS, left))
                continue
            self.listener.settimeout(min(_POLL_SECONDS, left))
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # the listener was closed
                listening = False
                continue
            log.error("semrecon serve: refused a connection from %s:%d: the server is stopping", *peer[:2])
            self._close_later(sock, f"semrecon serve: {_STOPPING}; this scan was not started, send it again")

    def _lets_finish(self, session: _Session) -> bool:
        """Whether ``session``'s scan is in progress and may finish (else it is closed with an ERROR)."""
        with session.lock:
            if session.running or session.stopped:
                return session.running and not session.stopped
            session.stopped = True
        log.warning("semrecon serve: %s closed by the server shutdown before its CONFIG and HEADER", session.name)
        self._close_later(session.sock, f"semrecon serve: {session.name}: {_STOPPING} before the scan started")
        return False

    @staticmethod
    def send_error(sock: socket.socket, text: str, *, linger: float = _CLOSE_LINGER_S) -> bool:
        """Report ``text`` to the client in this server's protocol (Gadgetron: ERROR, CLOSE), then close ``sock``."""
        from semrecon_core.gadgetron import compat

        return compat.send_error(sock, text, linger=linger)

    def _close_later(self, sock: socket.socket, text: str) -> None:
        """Send ERROR ``text`` and close ``sock`` in a thread of its own (joined by :meth:`_shut_down`)."""
        closer = threading.Thread(
            target=self.send_error, args=(sock, text), kwargs={"linger": _CLOSE_LINGER_S}, daemon=True
        )
        closer.start()
        self._closers.append(closer)

    def _start(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        with self._sessions_lock:
            busy = len(self._sessions) >= self.max_connections
            if not busy:
                self.scans += 1
                session = _Session(f"scan {self.scans}", sock)
                session.thread = threading.Thread(
                    target=self._serve_session, args=(session,), name=f"semrecon-serve-{session.name}", daemon=True
                )
                self._sessions[id(session)] = session
        if busy:
            log.error(
                "semrecon serve: refused a connection from %s:%d: %d scans in progress, the most served at once",
                *peer[:2],
                self.max_connections,
            )
            text = (
                f"semrecon serve: {self.max_connections} scans are in progress, the most this server serves at "
                "once (--max-connections); try again when one has finished"
            )
            threading.Thread(target=self.send_error, args=(sock, text), daemon=True).start()
            return
        log.warning("semrecon serve: %s from %s:%d", session.name, *peer[:2])
        session.thread.start()

    def _serve_session(self, session: _Session) -> None:
        try:
            self.serve_scan(session.sock, name=session.name, session=session)
        finally:
            with self._sessions_lock:
                self._sessions.pop(id(session), None)

    def _shut_down(self, timeout: float) -> None:
        """Close every open connection with an ERROR; wait up to ``timeout`` s for the ERRORs to go out."""
        deadline = time.monotonic() + timeout
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            locked = session.lock.acquire(timeout=min(1.0, timeout))  # not in the middle of sending an image
            try:
                if session.stopped:
                    continue
                session.stopped = True
            finally:
                if locked:
                    session.lock.release()
            log.error("semrecon serve: %s closed by the server shutdown before it finished", session.name)
            if locked:
                self._close_later(session.sock, f"semrecon serve: {session.name}: {_STOPPING}; the scan was cut off")
            else:  # a send is stuck (a client that does not read): no ERROR can go out in order
                with contextlib.suppress(OSError):
                    session.sock.shutdown(socket.SHUT_RDWR)
        for closer in self._closers:  # the ERRORs go out; a scan cut off mid-reconstruction is not waited for
            closer.join(max(0.0, deadline - time.monotonic()))
        left = [session.name for session in sessions if session.thread.is_alive()]
        if left:
            log.warning("semrecon serve: left %s reconstructing at shutdown (its images go nowhere)", ", ".join(left))

    def serve_scan(self, sock: socket.socket, *, name: str = "scan", session: _Session | None = None) -> None:
        """One session on an accepted socket; never raises for a failing scan (it is logged and reported)."""
        from gadgetron.external import Connection

        from semrecon_core.gadgetron import compat

        set_kernel_timeouts(sock, self.handshake_timeout)
        start = time.perf_counter()
        try:
            connection = Connection(sock)
        except compat.BadMessage as exc:
            log.error("semrecon serve: %s refused: %s", name, exc)
            compat.send_error(sock, f"semrecon serve: {name}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - one bad client must not stop the server
            reason = self._reason(exc, session, self.handshake_timeout)
            log.error("semrecon serve: %s: no CONFIG/HEADER from Gadgetron (%s)", name, reason)
            sock.close()
            return
        set_kernel_timeouts(sock, self.idle_timeout)
        session = session or _Session(name, sock)
        with session.lock:
            if session.stopped:  # the server stopped during the handshake and closes the socket
                return
            session.running = True
        connection.send = _guarded(connection.send, session)
        try:
            try:
                gadget = self._gadget_for(connection, name)
            except Exception as exc:  # noqa: BLE001 - the scan is rejected with the cause; the server goes on
                log.error("semrecon serve: %s rejected: %s", name, exc)
                _report(session, f"semrecon serve: {exc}")
                return
            try:
                gadget.handle(connection)
            except compat.BadMessage as exc:
                log.error("semrecon serve: %s refused: %s", name, exc)
                _report(session, f"semrecon serve: {name}: {exc}")
                return
            except OSError as exc:
                log.error("semrecon serve: %s ended early: %s", name, self._reason(exc, session, self.idle_timeout))
                return
            except Exception as exc:  # reported to Gadgetron; the next scan is served
                log.exception("semrecon serve: %s failed", name)
                _report(session, f"semrecon serve: {name} failed: {type(exc).__name__}: {exc}")
                return
        finally:
            with session.lock:
                if not session.stopped:  # else the shutdown (or an ERROR) has closed the session
                    connection.socket.close()  # CLOSE, then close (compat's SocketWrapper.close)
        log.warning("semrecon serve: %s done in %.1f s", name, time.perf_counter() - start)

    def _gadget_for(self, connection: Any, name: str) -> Any:
        from semrecon_core.gadgetron.gadget import SemreconGadget
        from semrecon_core.gadgetron.properties import parse_properties, settings_from_properties
        from semrecon_core.weights import DamagedWeightsError

        source = f"{name} CONFIG"
        scan = parse_properties(connection.raw_bytes.config, source=source)
        settings = settings_from_properties({**self.properties, **scan, **self.overrides}, source=source)
        try:
            prior = self.prior_for(settings.config)
        except DamagedWeightsError as exc:  # the scan still gets images: each buffer's labelled fallback
            log.error("semrecon serve: %s: %s; its buffers get the labelled fallback", name, exc)
            prior = None
        return SemreconGadget(settings, connection.header, prior=prior, device_lock=self._device_lock)

    @staticmethod
    def _reason(exc: BaseException, session: _Session | None, timeout: float) -> str:
        if session is not None and session.stopped:
            return "closed by the server shutdown"
        if isinstance(exc, BlockingIOError | TimeoutError):
            return f"Gadgetron was silent for more than {timeout:g} s"
        return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        """Stop listening."""
        self.listener.close()


_STOPPING = "the server is stopping (SIGTERM/SIGINT)"


def _guarded(send: Any, session: _Session) -> Any:
    """``send`` under the session's lock, refused once the server's shutdown has closed the session."""

    def guarded(item: Any) -> Any:
        with session.lock:
            if session.stopped:
                raise ConnectionAbortedError(f"{session.name} was closed by the server shutdown")
            return send(item)

    return guarded


def _report(session: _Session, text: str) -> None:
    """ERROR ``text`` on the session's socket (then closed), unless the shutdown has closed it already."""
    from semrecon_core.gadgetron import compat

    with session.lock:
        if session.stopped:
            return
        session.stopped = True  # nothing more goes out on this socket
    compat.send_error(session.sock, text)


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Receive/send timeouts in the kernel: they survive gadgetron's ``settimeout(None)``."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
