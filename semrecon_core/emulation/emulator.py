"""The Gadgetron side of an ``<external>`` / ``<connect>`` node, for offline runs and tests.

:func:`run_external` does what Gadgetron does for ``<execute name="MODULE" target="FUNC" type="python"/>``:
it opens a port on 127.0.0.1, starts ``python -m gadgetron PORT MODULE FUNC`` with the gadget directory
appended to ``PYTHONPATH``, waits for the child to connect back, sends CONFIG (the ``<configuration>``
element text), HEADER, the data messages (ReconData buffers, acquisitions, ...) and CLOSE over the real
wire format (:mod:`~semrecon_core.emulation.wire`), and reads Images / ImageArrays back until the
child's CLOSE. :func:`run_connect` does the same against a running ``<connect>`` server
(``semrecon serve``). Every wait has a timeout, and the child is killed if it outlives the session.

:func:`run_node` takes an ``<external>`` node of a chain (:class:`~semrecon_core.emulation.chain.Node`)
and picks the right one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semrecon_core.emulation import wire

if TYPE_CHECKING:
    from semrecon_core.emulation.chain import Node

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Lines of the child's log kept for error messages.
_LOG_LINES = 200


class EmulatorError(RuntimeError):
    """The gadget did not complete the session (did not connect, crashed, broke the protocol, timed out)."""


@dataclass
class ProtocolRun:
    """What came back from the gadget during one session.

    Attributes:
        items: every data message the gadget sent, in order (``ismrmrd.Image``, ``ImageArray``, ...).
        errors: texts of ERROR messages.
        returncode: exit status of the launched child (``None`` for ``<connect>`` servers).
        log: the last lines the child wrote to stdout/stderr.
        seconds: wall time from connection to the gadget's CLOSE.
    """

    items: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    returncode: int | None = None
    log: str = ""
    seconds: float = 0.0

    @property
    def images(self) -> list[Any]:
        """The ``ismrmrd.Image`` messages among :attr:`items`."""
        import ismrmrd

        return [item for item in self.items if isinstance(item, ismrmrd.Image)]


def default_gadget_path() -> list[str]:
    """Directories Gadgetron would append to ``PYTHONPATH``.

    This checkout's ``gadgets/`` and/or ``$GADGETRON_HOME/share/gadgetron/python``, whichever exist.
    """
    paths = []
    checkout = Path(__file__).resolve().parents[2] / "gadgets"
    if checkout.is_dir():
        paths.append(str(checkout))
    home = os.environ.get("GADGETRON_HOME")
    if home and (Path(home) / "share" / "gadgetron" / "python").is_dir():
        paths.append(str(Path(home) / "share" / "gadgetron" / "python"))
    return paths


def child_environment(gadget_path: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """The environment Gadgetron gives the child: ``PYTHONPATH=$PYTHONPATH:<gadget dirs>``."""
    env = dict(os.environ)
    parts = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    parts.extend(str(p) for p in gadget_path)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


# A log line of gadgetron-python's ``python -m gadgetron``: "MM-DD HH:MM:SS.mmm LEVEL [ext. PID M.T] text".
_CHILD_LOG_LINE = re.compile(r"^\d\d-\d\d \d\d:\d\d:\d\d\.\d+ (?P<level>[A-Z]+) \[ext\. \d+ [^\]]*\] (?P<text>.*)$")


class _LogTail:
    """Reads a child's output in a thread, keeps the last lines and logs them here.

    Lines the child logged at WARNING or above are logged at their level (so ``semrecon replay
    --protocol`` reports a buffer's failure as the in-process path does); everything else at DEBUG.
    """

    def __init__(self, stream: Any, name: str) -> None:
        self.lines: deque[str] = deque(maxlen=_LOG_LINES)
        self._thread = threading.Thread(target=self._pump, args=(stream, name), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any, name: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            match = _CHILD_LOG_LINE.match(line)
            level = logging.getLevelName(match["level"]) if match else logging.DEBUG
            if isinstance(level, int) and level >= logging.WARNING and match:
                log.log(level, "[%s] %s", name, match["text"])
            else:
                log.debug("[%s] %s", name, line)
        stream.close()

    def text(self, timeout: float = 2.0) -> str:
        self._thread.join(timeout)
        return "\n".join(self.lines)


def exchange(
    sock: socket.socket,
    configuration: str,
    header_xml: str,
    messages: Iterable[Any],
    *,
    timeout: float = 300.0,
) -> ProtocolRun:
    """Run one session on a connected socket, as Gadgetron: send everything, collect the replies.

    A thread reads the gadget's messages while this one sends, so neither side can block the other.
    Like Gadgetron's external channel, an ERROR from the gadget stops the sending (CLOSE is sent
    next) and the remaining replies are still read; Gadgetron would then fail the chain with the
    collected errors (:attr:`ProtocolRun.errors`). CONFIG, HEADER or TEXT from the gadget are illegal.
    ``timeout`` bounds every wait for the peer (seconds without progress). Raises
    :class:`EmulatorError` when the gadget closes without CLOSE, sends an illegal message, fails to
    read, or goes silent.
    """
    from gadgetron.external import constants

    stream = wire.SocketStream(sock, timeout=timeout)
    run = ProtocolRun()
    failure: list[BaseException] = []

    def receive() -> None:
        try:
            while True:
                mid, item = wire.read_message(stream)
                if mid == constants.GADGET_MESSAGE_CLOSE:
                    return
                if mid == constants.GADGET_MESSAGE_ERROR:
                    log.error("gadget reported: %s", item)
                    run.errors.append(item)
                else:
                    run.items.append(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            failure.append(exc)

    start = time.perf_counter()
    reader = threading.Thread(target=receive, name="gadgetron-emulator-receive", daemon=True)
    reader.start()
    try:
        wire.write_config(stream, configuration)
        wire.write_header(stream, header_xml)
        for item in messages:
            if not reader.is_alive() or run.errors:
                break
            wire.write_item(stream, item)
        if reader.is_alive():
            wire.write_close(stream)
    except OSError as exc:
        if reader.is_alive() or not failure:
            failure.append(exc)
    except BaseException:
        # the messages themselves failed (e.g. a chain stage raised): end the session, then re-raise
        _shutdown(sock)
        reader.join(timeout)
        raise
    reader.join()  # bounded: every receive waits at most ``timeout`` seconds
    run.seconds = time.perf_counter() - start
    if failure:
        error = failure[0]
        if isinstance(error, TimeoutError):
            raise EmulatorError(f"the gadget was silent for more than {timeout:.0f} s") from error
        raise EmulatorError(f"the session ended abnormally: {type(error).__name__}: {error}") from error
    return run


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class GadgetProcess:
    """A gadget launched exactly as Gadgetron launches an ``<execute>`` node.

    Opens a listening socket on 127.0.0.1 (an ephemeral port), starts ``python -m gadgetron PORT MODULE
    TARGET`` with ``PYTHONPATH=$PYTHONPATH:<gadget dirs>`` and collects the child's output. Use as a
    context manager: on exit the child is given ``grace`` seconds, then terminated / killed, and the
    listener is closed.
    """

    def __init__(
        self,
        module: str,
        target: str,
        *,
        gadget_path: Sequence[str | os.PathLike[str]] | None = None,
        python: str = sys.executable,
    ) -> None:
        paths = default_gadget_path() if gadget_path is None else list(gadget_path)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(1)
        self.port: int = self.listener.getsockname()[1]
        command = [python, "-m", "gadgetron", str(self.port), module, target]
        log.info("launching %s", " ".join(command))
        self.process = subprocess.Popen(
            command,
            env=child_environment(paths),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._tail = _LogTail(self.process.stdout, f"{module}.{target}")

    @property
    def pid(self) -> int:
        """Process id of the child."""
        return self.process.pid

    def accept(self, timeout: float = 60.0) -> socket.socket:
        """The child's connection; :class:`EmulatorError` if it dies or does not connect in ``timeout`` s."""
        deadline = time.monotonic() + timeout
        self.listener.settimeout(0.2)
        while True:
            try:
                sock, _ = self.listener.accept()
                sock.settimeout(None)
                return sock
            except TimeoutError:
                pass
            if self.process.poll() is not None:
                raise EmulatorError(
                    f"the gadget process exited with status {self.process.returncode} before connecting\n"
                    f"--- gadget log ---\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise EmulatorError(f"the gadget process did not connect within {timeout:.0f} s")

    def stop(self, grace: float = 0.0) -> int:
        """Wait up to ``grace`` s for the child to exit, then terminate (and kill) it; its exit status."""
        if grace > 0:
            try:
                return self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("gadget process %d still running after %.0f s; terminating it", self.pid, grace)
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=5.0)

    def log(self) -> str:
        """The last lines the child wrote (complete once it has exited)."""
        return self._tail.text(timeout=2.0 if self.process.poll() is not None else 0.0)

    def __enter__(self) -> GadgetProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.listener.close()


def run_external(
    configuration: str,
    header_xml: str,
    messages: Iterable[Any],
    *,
    module: str,
    target: str,
    gadget_path: Sequence[str | os.PathLike[str]] | None = None,
    timeout: float = 300.0,
    connect_timeout: float = 60.0,
    python: str = sys.executable,
) -> ProtocolRun:
    """Launch ``python -m gadgetron PORT MODULE TARGET`` as Gadgetron does and run one session with it.

    Args:
        configuration: the ``<configuration>`` element text sent as CONFIG.
        header_xml: the ISMRMRD XML header sent as HEADER.
        messages: data messages to send (``gadgetron.types.ReconData``, ``ismrmrd.Acquisition``, ...).
        module: the ``<execute>`` node's ``name``.
        target: the ``<execute>`` node's ``target``.
        gadget_path: directories appended to ``PYTHONPATH`` (default :func:`default_gadget_path`).
        timeout: longest silence of the gadget during the session, seconds.
        connect_timeout: longest wait for the child to connect back (imports included), seconds.
        python: interpreter to launch.

    Raises :class:`EmulatorError` naming the failure and quoting the child's log when the child does
    not connect, ends abnormally or exits with a non-zero status.
    """
    with GadgetProcess(module, target, gadget_path=gadget_path, python=python) as gadget:
        sock = gadget.accept(connect_timeout)
        try:
            run = exchange(sock, configuration, header_xml, messages, timeout=timeout)
        except EmulatorError as exc:
            sock.close()
            gadget.stop(grace=5.0)
            raise EmulatorError(f"{exc}\n--- gadget log ---\n{gadget.log()}") from exc
        except BaseException:
            sock.close()
            raise
        sock.close()
        run.returncode = gadget.stop(grace=timeout)
        run.log = gadget.log()
        if run.returncode != 0:
            raise EmulatorError(
                f"the gadget process exited with status {run.returncode}\n--- gadget log ---\n{run.log}"
            )
        return run


def run_connect(
    configuration: str,
    header_xml: str,
    messages: Iterable[Any],
    *,
    port: int,
    address: str = LOOPBACK,
    timeout: float = 300.0,
    connect_timeout: float = 30.0,
) -> ProtocolRun:
    """Connect to a ``<connect>`` server (``semrecon serve``) and run one session with it."""
    try:
        sock = socket.create_connection((address, port), timeout=connect_timeout)
    except OSError as exc:
        raise EmulatorError(f"cannot connect to the gadget server at {address}:{port}: {exc}") from exc
    try:
        return exchange(sock, configuration, header_xml, messages, timeout=timeout)
    finally:
        sock.close()


def run_node(
    node: Node,
    header_xml: str,
    messages: Iterable[Any],
    *,
    gadget_path: Sequence[str | os.PathLike[str]] | None = None,
    timeout: float = 300.0,
) -> ProtocolRun:
    """One session of a chain's ``<external>`` node: launch its ``<execute>`` module or reach its server.

    CONFIG is the node's ``configuration``; ``<connect>`` nodes reach ``address:port``.
    """
    if node.module is not None and node.target is not None:
        return run_external(
            node.configuration,
            header_xml,
            messages,
            module=node.module,
            target=node.target,
            gadget_path=gadget_path,
            timeout=timeout,
        )
    if node.port is None:
        raise ValueError(f"<external> node '{node.name}' has neither <execute name= target=> nor <connect port=>")
    return run_connect(
        node.configuration,
        header_xml,
        messages,
        port=node.port,
        address=node.address or LOOPBACK,
        timeout=timeout,
    )
