"""The Gadgetron side of the external-language wire protocol (REFERENCE.md §3), for the emulator.

Framing is not reimplemented here. CONFIG (the chain's ``<configuration>`` text, verbatim), HEADER (the
ISMRMRD header, re-serialised as Gadgetron does for every ``<external>`` node), Acquisition, Image,
Waveform and CLOSE go out through ``ismrmrd.serialization.ProtocolSerializer``; ReconData and ImageArray
through gadgetron-python's writers, and whatever the gadget sends back is read by gadgetron-python's
readers — the same code the gadget runs, with the fixes of :mod:`semrecon_core.gadgetron.compat`
installed (numpy-2 casts, ImageArray waveform framing, arrays read in one piece), which makes them as fast
as a hand-written serialiser (``benchmarks/results/protocol.md``). Message ids are
``gadgetron.external.constants``.

What is left: :class:`SocketStream` (exact reads, timeouts, gathered small writes: gadgetron-python writes
every dimension and header separately) and the dispatch of the messages a gadget may send, ERROR
(``uint64`` length + text), which neither package reads, included.
"""

from __future__ import annotations

import socket
from typing import Any

from semrecon_core.gadgetron import compat

# Writes below this size are gathered into one send; larger ones go straight to the socket.
_WRITE_BUFFER = 1 << 16


class ProtocolError(RuntimeError):
    """The gadget sent a message Gadgetron does not accept from an external node."""


class SocketStream:
    """A connected socket with exact reads, explicit end-of-stream errors and gathered small writes.

    ``read(n)`` returns exactly ``n`` bytes or raises :class:`ConnectionError` when the peer closes
    the connection (never loops on an empty ``recv``); a claim beyond this machine's memory is refused
    before anything is allocated (:func:`~semrecon_core.gadgetron.compat.receive`). With ``timeout``
    set, a peer silent for that many seconds raises :class:`TimeoutError`. Small writes are gathered
    until :meth:`flush` (the writers below flush at the end of every message). gadgetron-python's
    patched array readers fill their arrays straight from :attr:`socket`.
    """

    def __init__(self, sock: socket.socket, *, timeout: float | None = None) -> None:
        self.socket = sock
        self.socket.settimeout(timeout)
        self._pending = bytearray()

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes from the peer (a claim beyond this machine's memory is refused unread)."""
        return compat.receive(self.socket, n, what="a message from the gadget")

    def write(self, data: Any) -> None:
        """Queue or send a bytes-like object (``bytes``, ``memoryview``, ctypes structure)."""
        view = memoryview(data).cast("B")
        if len(view) >= _WRITE_BUFFER:
            self.flush()
            self.socket.sendall(view)
        else:
            self._pending += view
            if len(self._pending) >= _WRITE_BUFFER:
                self.flush()

    def flush(self) -> None:
        """Send the gathered small writes."""
        if self._pending:
            self.socket.sendall(self._pending)
            self._pending.clear()

    def close(self) -> None:
        """Close the socket (pending writes are dropped; flush first)."""
        self.socket.close()


def _serializer(destination: Any) -> Any:
    from ismrmrd.serialization import ProtocolSerializer

    return ProtocolSerializer(destination)


def _flush(destination: Any) -> None:
    flush = getattr(destination, "flush", None)
    if flush is not None:
        flush()


def write_config(destination: Any, configuration: str) -> None:
    """CONFIG: the ``<configuration>`` element text, verbatim."""
    from ismrmrd.serialization import ConfigText

    _serializer(destination).serialize(ConfigText(configuration))
    _flush(destination)


def write_header(destination: Any, header_xml: str) -> None:
    """HEADER: the ISMRMRD XML header, parsed and re-serialised (as Gadgetron does for an external node)."""
    import ismrmrd

    _serializer(destination).serialize(ismrmrd.xsd.CreateFromDocument(header_xml))
    _flush(destination)


def write_close(destination: Any) -> None:
    """CLOSE: the end of the session in this direction (flushed)."""
    _serializer(destination).close()


def write_item(destination: Any, item: Any) -> None:
    """A data message: ``ismrmrd`` Acquisition / Image / Waveform, gadgetron-python ReconData / ImageArray."""
    import ismrmrd
    from gadgetron.types import image_array, recon_data

    compat.install()
    if isinstance(item, recon_data.ReconData):
        recon_data.write_recon_data(destination, item)
    elif isinstance(item, image_array.ImageArray):
        image_array.write_image_array(destination, item)
    elif isinstance(item, ismrmrd.Acquisition | ismrmrd.Image | ismrmrd.Waveform):
        _serializer(destination).serialize(item)
    else:
        raise TypeError(f"no Gadgetron message type for an object of type {type(item).__name__}")
    _flush(destination)


def read_message(source: Any) -> tuple[int, Any]:
    """The next message from the gadget: ``(message id, item)``.

    CLOSE gives ``None``, ERROR its text, data messages ``ismrmrd`` or gadgetron-python objects. Anything
    else (CONFIG, HEADER, TEXT, an unknown id) is a :class:`ProtocolError` naming the id.
    """
    from gadgetron.external import constants, readers
    from gadgetron.types import image_array, recon_data

    compat.install()
    mid = readers.read(source, constants.GadgetMessageIdentifier)
    if mid == constants.GADGET_MESSAGE_CLOSE:
        return mid, None
    if mid == constants.GADGET_MESSAGE_ERROR:
        length = readers.read(source, constants.uint64)
        compat.check_claim("an ERROR from the gadget", length, compat.MAX_ERROR_BYTES)
        return mid, bytes(source.read(length)).decode("utf-8", "replace")
    data_readers = {
        constants.GADGET_MESSAGE_ISMRMRD_ACQUISITION: readers.read_acquisition,
        constants.GADGET_MESSAGE_ISMRMRD_WAVEFORM: readers.read_waveform,
        constants.GADGET_MESSAGE_ISMRMRD_IMAGE: readers.read_image,
        constants.GADGET_MESSAGE_RECON_DATA: recon_data.read_recon_data,
        constants.GADGET_MESSAGE_IMAGE_ARRAY: image_array.read_image_array,
    }
    reader = data_readers.get(mid)
    if reader is None:
        names = [name for name, value in vars(constants).items() if name.startswith("GADGET_MESSAGE_") and value == mid]
        named = f" ({', '.join(names)})" if names else ""
        raise ProtocolError(f"the gadget sent message id {mid}{named}, which Gadgetron does not accept from it")
    return mid, reader(source)
