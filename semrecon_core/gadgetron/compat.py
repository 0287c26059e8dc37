"""Workarounds for defects of the ``gadgetron`` Python package 1.4.1 (REFERENCE.md §3), without forking it.

:func:`install` patches the package in place. A gadget process launched by Gadgetron gets it before
gadgetron-python reads anything: ``python -m gadgetron PORT MODULE TARGET`` runs with Gadgetron's
``share/gadgetron/python`` on ``PYTHONPATH``, where ``gadgets/sitecustomize.py`` is installed beside
``semrecon_gadget.py``; Python imports it at start-up and it calls :func:`install_for_gadget_process`
for semrecon's gadget modules (other Python gadgets of the site are left alone). Importing
``semrecon_gadget`` installs the fixes too, for interpreters where that start-up hook is shadowed.

1. ``writers.write_array`` calls ``np.array(..., copy=False)``, which raises under numpy 2 whenever a cast
   is needed: replaced by a version that casts (``np.asarray``).
2. ``ImageArray`` waveforms are written with a message id before each waveform, which Gadgetron's
   reader does not expect: replaced by a writer that frames them as header + samples.
3. ``Connection.SocketWrapper.read`` loops forever at 100 % CPU when ``recv`` returns ``b''`` (peer
   gone): replaced by a read that raises :class:`ConnectionError`, so the gadget process ends; ``close``
   no longer raises when the peer has already gone.
4. AcquisitionBucket waveform headers are parsed as ``ismrmrd.Waveform`` (crash): parsed as
   ``ismrmrd.WaveformHeader``.
5. ``readers.read_array`` copies every data array twice into read-only memory, and
   ``readers.read_object_array`` reads header arrays one structure per ``recv`` (numpy warns about the
   ctypes buffer format for every buffer): arrays are read straight into writable memory, header arrays
   in one piece. Objects and values are the same.
6. Claimed sizes are trusted: a CONFIG or HEADER length, an array's dimensions or an ISMRMRD message's
   sample counts are allocated before a byte of data arrives. Every claim is now checked first against
   what a scan can need (:data:`MAX_CONFIG_BYTES`, :data:`MAX_HEADER_BYTES`, :data:`MAX_DIMENSIONS`,
   :data:`MAX_RECON_BITS`, and :func:`memory_limit` for data) and refused with :class:`BadMessage`
   naming the message, the field and the claimed against the allowed size; reads larger than 16 MiB
   grow with the data that actually arrives.
7. A message id without a reader ends the stream as if Gadgetron had sent CLOSE (the rest of the scan
   is dropped without a word): now a :class:`BadMessage` naming the id. A first message other than
   CONFIG / HEADER (an ``assert``) or a HEADER that does not parse is a :class:`BadMessage` too.

:func:`send_error` is how the gadget and ``semrecon serve`` report a session they cannot go on with:
an ERROR message, CLOSE, then whatever Gadgetron still sends is discarded until it closes (at most a
couple of seconds), so that it reads the ERROR before the connection goes.

The module depends on nothing else in semrecon; its exact-read loop :func:`recv_exactly` and bounded
read :func:`receive` are shared with the offline emulator.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import socket
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_installed = False
_process_guarded = False

# What a scan can need; a claim beyond these is refused before anything is allocated.
MAX_CONFIG_BYTES = 16 << 20  # the <external> node's <configuration> (a few kB in practice)
MAX_HEADER_BYTES = 64 << 20  # the ISMRMRD XML header (user parameters included)
MAX_ERROR_BYTES = 16 << 20  # an ERROR text
MAX_DIMENSIONS = 16  # hoNDArray dimensions (ReconData buffers have 7, their headers 5)
MAX_RECON_BITS = 1 << 16  # ReconBits of one ReconData: one per encoding space (a uint16 index)

# Exit statuses of a gadget process launched by Gadgetron (``python -m gadgetron``).
EXIT_REFUSED = 2  # the session was refused with an ERROR to Gadgetron (bad message or configuration)
EXIT_GADGETRON_GONE = 3  # Gadgetron closed the connection before the end of the session

# Reads above this size are received in pieces of this size, so memory grows with the data that arrives.
_CHUNK = 16 << 20
# How long send_error waits for Gadgetron to read the ERROR and close, seconds.
_LINGER_SECONDS = 2.0

# Names of the message ids Gadgetron and gadgetron-python use.
MESSAGE_NAMES = {
    1: "FILENAME",
    2: "CONFIG",
    3: "HEADER",
    4: "CLOSE",
    5: "TEXT",
    6: "QUERY",
    7: "RESPONSE",
    8: "ERROR",
    1008: "Acquisition",
    1022: "Image",
    1023: "ReconData",
    1024: "ImageArray",
    1026: "Waveform",
    1050: "AcquisitionBucket",
}


class BadMessage(ValueError):
    """Gadgetron's side sent something the gadget refuses; the stream cannot be framed beyond it.

    Raised for a claimed size beyond what a scan can need, a message id without a reader, a first message
    other than CONFIG / HEADER, or a HEADER that does not parse. The text names the message and field.
    """


def describe_message(mid: int) -> str:
    """``"id 1023 (ReconData)"``, or ``"id 77"`` for an id nobody uses."""
    name = MESSAGE_NAMES.get(mid)
    return f"id {mid} ({name})" if name else f"id {mid}"


def format_bytes(count: int) -> str:
    """``count`` bytes in binary units with one decimal (``"4.0 GiB"``)."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@functools.cache
def memory_limit() -> tuple[int, str]:
    """The most bytes one message field may claim, and where that bound comes from.

    The memory of this machine, or the container's (cgroup) memory limit when that is lower: a buffer
    larger than either cannot be received, let alone reconstructed.
    """
    limit, origin = 64 << 30, "a default, the machine's memory being unknown"
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limit, origin = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the memory of this machine"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            value = int(Path(path).read_text(encoding="ascii").strip())
            if 0 < value < limit:
                limit, origin = value, "the container's memory limit"
    return limit, origin


def check_claim(what: str, claimed: int, allowed: int, origin: str = "") -> None:
    """:class:`BadMessage` when ``claimed`` bytes exceed ``allowed``: names ``what`` and both sizes."""
    if claimed > allowed:
        bound = f"{format_bytes(allowed)} ({origin})" if origin else format_bytes(allowed)
        raise BadMessage(f"{what} claims {format_bytes(claimed)} ({claimed} bytes); at most {bound} is allowed")


# -- what is being read, for the messages (one per thread: semrecon serve reads several sessions) ---------

_reading_now = threading.local()


class _reading:  # noqa: N801 - used like a function: ``with _reading("the CONFIG"):``
    """Names what this thread is reading (for messages) while the block runs; lets every exception through."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.previous: str | None = None

    def __enter__(self) -> None:
        self.previous = getattr(_reading_now, "what", None)
        _reading_now.what = self.what

    def __exit__(self, *exc_info: object) -> None:
        _reading_now.what = self.previous


def _current(default: str = "a message from Gadgetron") -> str:
    return getattr(_reading_now, "what", None) or default


# -- exact, bounded reads --------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, view: memoryview, *, peer: str = "the peer") -> None:
    """Fill the writable byte view ``view`` from ``sock``; :class:`ConnectionError` naming ``peer`` on end of stream.

    Never loops on an empty ``recv``: a vanished peer ends the read at once.
    """
    total = len(view)
    done = 0
    while done < total:
        received = sock.recv_into(view[done:], total - done)
        if received == 0:
            raise ConnectionError(
                f"{peer} closed the connection in the middle of a message (got {done} of {total} bytes)"
                if done
                else f"{peer} closed the connection"
            )
        done += received


def receive(sock: socket.socket, nbytes: int, *, peer: str = "the peer", what: str = "a message") -> bytes:
    """Exactly ``nbytes`` from ``sock``, checked against :func:`memory_limit` first.

    Up to 16 MiB are read into one buffer; more are received in 16 MiB pieces, so that a peer claiming
    more than it sends costs memory only for what it sent. :class:`BadMessage` for a claim beyond the
    limit, :class:`ConnectionError` naming ``peer`` on end of stream.
    """
    check_claim(what, nbytes, *memory_limit())
    if nbytes <= _CHUNK:
        buffer = bytearray(nbytes)
        recv_exactly(sock, memoryview(buffer), peer=peer)
        return bytes(buffer)
    pieces: list[bytes] = []
    got = 0
    while got < nbytes:
        piece = bytearray(min(_CHUNK, nbytes - got))
        try:
            recv_exactly(sock, memoryview(piece), peer=peer)
        except ConnectionError:
            raise ConnectionError(
                f"{peer} closed the connection in the middle of a message (got at least {got} of {nbytes} bytes)"
            ) from None
        pieces.append(bytes(piece))
        got += len(piece)
    return b"".join(pieces)


def _fill(source: Any, view: memoryview) -> None:
    """Fill ``view`` from a ``SocketWrapper`` (straight from its socket) or anything with ``read(n)``."""
    sock = getattr(source, "socket", None)
    if not isinstance(sock, socket.socket):
        data = source.read(len(view))
        if len(data) != len(view):
            raise ConnectionError(f"stream ended in the middle of a message (got {len(data)} of {len(view)} bytes)")
        view[:] = data
        return
    try:
        recv_exactly(sock, view, peer="Gadgetron")
    except ConnectionError as exc:
        raise ConnectionError(f"{exc} while reading {_current()}") from None


def _read_exactly(self: Any, nbytes: int) -> bytes:
    """``SocketWrapper.read`` replacement: exactly ``nbytes`` (bounded), :class:`ConnectionError` on end of stream."""
    try:
        return receive(self.socket, nbytes, peer="Gadgetron", what=_current())
    except ConnectionError as exc:
        raise ConnectionError(f"{exc} while reading {_current()}") from None


def _close_quietly(self: Any) -> None:
    """``SocketWrapper.close`` replacement: send CLOSE if the peer still listens, then close (once)."""
    from gadgetron.external import constants

    if self.socket.fileno() == -1:  # already closed, e.g. by send_error
        return
    try:
        self.socket.sendall(constants.GadgetMessageIdentifier.pack(constants.GADGET_MESSAGE_CLOSE))
    except OSError as exc:
        logger.warning("could not send CLOSE to Gadgetron (%s); it has already gone", exc)
    finally:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()


def send_error(sock: socket.socket, text: str, *, linger: float = _LINGER_SECONDS) -> bool:
    """Report a session that cannot go on: ERROR (``uint64`` length + text) and CLOSE, then close.

    After our CLOSE the sending side is shut down and whatever Gadgetron still sends is discarded until
    it closes, for at most ``linger`` seconds: closing with unread data would reset the connection
    before Gadgetron has read the ERROR. Returns whether the ERROR was sent (``False``: Gadgetron had
    already gone). Never raises for a vanished peer; the socket is closed afterwards.
    """
    body = text.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    message = (8).to_bytes(2, "little") + len(body).to_bytes(8, "little") + body + (4).to_bytes(2, "little")
    return send_last(sock, message, linger=linger, what="the ERROR to Gadgetron")


def send_last(sock: socket.socket, message: bytes, *, linger: float, what: str) -> bool:
    """Send the last ``message`` of a connection, shut the sending side, drain the peer for ``linger`` s, close.

    Closing with unread data would reset the connection before the peer has read ``message``. Returns whether
    it was sent; never raises for a vanished peer (logged, naming ``what``); the socket is closed afterwards.
    """
    sent = False
    try:
        if sock.fileno() == -1:
            return False
        sock.settimeout(linger)
        sock.sendall(message)
        sent = True
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                break
    except OSError as exc:  # gone, reset or still sending after ``linger`` s: nothing more to do
        if not sent:
            logger.warning("could not send %s (%s); the peer has already gone", what, exc)
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    return sent


# -- Connection: CONFIG, HEADER and message ids --------------------------------------------------------


def _read_message_id(connection: Any) -> int:
    from gadgetron.external import constants, readers

    return int(readers.read(connection.socket, constants.GadgetMessageIdentifier))


def _read_text(connection: Any, expected: int, limit: int) -> bytes:
    """The body of a CONFIG / HEADER (``uint32`` length + bytes), checking the id and the claimed length."""
    from gadgetron.external import constants, readers

    name = MESSAGE_NAMES[expected]
    with _reading(f"the {name}"):
        mid = _read_message_id(connection)
        if mid != expected:
            raise BadMessage(
                f"expected {name} (id {expected}) as the next message from Gadgetron, got {describe_message(mid)}"
            )
        length = int(readers.read(connection.socket, constants.uint32))
        check_claim(name, length, limit)
        return bytes(connection.socket.read(length))


def _read_config(self: Any) -> tuple[Any, bytes]:
    """``Connection._read_config`` replacement: a bounded CONFIG; XML that does not parse gives ``None``.

    (The gadget validates the raw bytes and names what is wrong with them.)
    """
    config_bytes = _read_text(self, 2, MAX_CONFIG_BYTES)
    try:
        parsed: Any = ET.fromstring(config_bytes)
    except ET.ParseError as exc:
        logger.warning("the CONFIG does not parse as XML (%s)", exc)
        parsed = None
    return parsed, config_bytes


def _read_header(self: Any) -> tuple[Any, bytes]:
    """``Connection._read_header`` replacement: a bounded HEADER; :class:`BadMessage` if it does not parse."""
    import ismrmrd

    header_bytes = _read_text(self, 3, MAX_HEADER_BYTES)
    try:
        return ismrmrd.xsd.CreateFromDocument(header_bytes), header_bytes
    except Exception as exc:  # noqa: BLE001 - any parser failure: the scan cannot be reconstructed
        text = str(exc).replace("\n", " ")[:300]
        raise BadMessage(f"the HEADER is not an ISMRMRD header ({type(exc).__name__}: {text})") from None


def _read_item(self: Any) -> tuple[int, Any]:
    """``Connection._read_item`` replacement: an id without a reader is a :class:`BadMessage` naming it."""
    with _reading("the next message id"):
        mid = _read_message_id(self)
    reader = self.readers.get(mid)
    if reader is None:
        known = ", ".join(describe_message(known) for known in sorted(self.readers))
        raise BadMessage(
            f"Gadgetron sent message {describe_message(mid)}, which the gadget cannot read (it reads {known}); "
            "the rest of the stream cannot be framed, so the scan ends here"
        )
    with _reading(f"the {MESSAGE_NAMES.get(mid, 'unnamed')} message (id {mid})"):
        return mid, reader(self.socket)


# -- arrays and ReconData ------------------------------------------------------------------------------


def write_array(destination: Any, array: Any, dtype: Any) -> None:
    """``writers.write_array`` replacement: ``uint64`` ndim + dims, then the data in Fortran order as ``dtype``."""
    data = np.asfortranarray(np.asarray(array, dtype=np.dtype(dtype)))
    destination.write(np.asarray([data.ndim, *data.shape], dtype="<u8").tobytes())
    if data.size:
        destination.write(data.reshape(-1, order="F").view(np.uint8))


def _read_dimensions(source: Any, what: str) -> tuple[int, ...]:
    from gadgetron.external import constants, readers

    ndim = int(readers.read(source, constants.uint64))
    if ndim > MAX_DIMENSIONS:
        raise BadMessage(f"{what}: claims {ndim} dimensions; at most {MAX_DIMENSIONS} are allowed")
    raw = bytearray(8 * ndim)
    _fill(source, memoryview(raw))
    return tuple(int(d) for d in np.frombuffer(raw, dtype="<u8"))


def _check_array(what: str, dims: tuple[int, ...], itemsize: int, type_name: str) -> int:
    count = 1
    for d in dims:
        count *= d
    check_claim(f"{what}: dims {list(dims)} of {type_name}", count * itemsize, *memory_limit())
    return count


def read_array(source: Any, numpy_type: Any = np.uint64, *, what: str = "") -> np.ndarray:
    """``readers.read_array`` replacement: one read into a writable, Fortran-ordered array of the dims.

    The claimed size is checked against :func:`memory_limit` before anything is allocated.
    """
    what = what or f"an array in {_current()}"
    dims = _read_dimensions(source, what)
    if not dims:
        return np.empty(0, dtype=numpy_type)
    dtype = np.dtype(numpy_type)
    _check_array(what, dims, dtype.itemsize, dtype.name)
    array = np.empty(dims, dtype=dtype, order="F")
    if array.size:
        _fill(source, array.reshape(-1, order="F").view(np.uint8).data)
    return array


def read_object_array(source: Any, read_object: Any, *, what: str = "") -> np.ndarray:
    """``readers.read_object_array`` replacement: arrays of ISMRMRD headers read in one piece (Fortran order)."""
    import ismrmrd
    from gadgetron.external import readers

    structures = {
        readers.read_acquisition_header: ismrmrd.AcquisitionHeader,
        readers.read_image_header: ismrmrd.ImageHeader,
    }
    what = what or f"a header array in {_current()}"
    dims = _read_dimensions(source, what)
    struct_type = structures.get(read_object)
    size = ctypes.sizeof(struct_type) if struct_type is not None else 1
    count = _check_array(what, dims, size, struct_type.__name__ if struct_type is not None else "objects")
    count = count if dims else 0
    items = np.empty(count, dtype=object)
    if struct_type is None:
        for index in range(count):
            items[index] = read_object(source)
    elif count:
        raw = bytearray(count * size)
        _fill(source, memoryview(raw))
        for index in range(count):
            items[index] = struct_type.from_buffer_copy(raw, index * size)
    return items.reshape(dims, order="F")


def _read_recon_buffer(source: Any, where: str) -> Any:
    from gadgetron.external import readers
    from gadgetron.types import recon_data

    data = read_array(source, np.complex64, what=f"{where} data")
    trajectory = read_array(source, np.float32, what=f"{where} trajectory") if _flag(source) else None
    density = read_array(source, np.float32, what=f"{where} density") if _flag(source) else None
    headers = read_object_array(source, readers.read_acquisition_header, what=f"{where} headers")
    sampling = recon_data.read_sampling_description(source)
    return recon_data.ReconBuffer(data, trajectory, density, headers, sampling)


def _flag(source: Any) -> bool:
    from gadgetron.external import constants, readers

    return bool(readers.read(source, constants.bool))


def read_recon_data(source: Any) -> Any:
    """A ReconData message body; every field named in the error when its claimed size is refused."""
    from gadgetron.external import constants, readers
    from gadgetron.types import recon_data

    count = int(readers.read(source, constants.uint64))
    if count > MAX_RECON_BITS:
        raise BadMessage(f"ReconData: claims {count} bits (encoding spaces); at most {MAX_RECON_BITS} are allowed")
    bits = []
    for number in range(count):
        data = _read_recon_buffer(source, f"ReconData bit {number}")
        reference = _read_recon_buffer(source, f"ReconData bit {number} ref") if _flag(source) else None
        bits.append(recon_data.ReconBit(data, reference))
    return recon_data.ReconData(bits)


def write_waveforms(destination: Any, waveforms: list[Any]) -> None:
    """ImageArray waveforms: ``uint64`` count, then each as header + samples (no message id)."""
    from gadgetron.external import constants

    destination.write(constants.uint64.pack(len(waveforms)))
    for waveform in waveforms:
        waveform.serialize_into(destination.write)


def read_waveform_header(source: Any) -> Any:
    """An ``ismrmrd.WaveformHeader`` (the bucket reader's replacement)."""
    import ismrmrd

    size = ctypes.sizeof(ismrmrd.WaveformHeader)
    data = source.read(size)
    if len(data) != size:
        raise ConnectionError(f"stream ended inside a waveform header (got {len(data)} of {size} bytes)")
    return ismrmrd.WaveformHeader.from_buffer_copy(data)


def read_acquisition_bucket(source: Any) -> Any:
    """An AcquisitionBucket message body, read with the fixed waveform headers."""
    from gadgetron.types import acquisition_bucket

    install()
    return acquisition_bucket.read_acquisition_bucket(source)


# -- installation ----------------------------------------------------------------------------------------


def install() -> None:
    """Patch the ``gadgetron`` package in place (idempotent)."""
    global _installed
    if _installed:
        return
    from gadgetron.external import connection, readers, writers
    from gadgetron.types import acquisition_bucket, image_array, recon_data

    connection.Connection.SocketWrapper.read = _read_exactly
    connection.Connection.SocketWrapper.close = _close_quietly
    connection.Connection._read_config = _read_config
    connection.Connection._read_header = _read_header
    connection.Connection._read_item = _read_item
    connection.read_recon_data = read_recon_data
    writers.write_array = write_array
    recon_data.write_array = write_array
    acquisition_bucket.write_array = write_array
    image_array.write_waveforms = write_waveforms
    acquisition_bucket.read_waveform_header = read_waveform_header
    readers.read_array = read_array
    readers.read_object_array = read_object_array
    recon_data.read_array = read_array
    recon_data.read_object_array = read_object_array
    recon_data.read_recon_data = read_recon_data
    _installed = True


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed


def launched_by_gadgetron() -> bool:
    """Whether this process is a gadget process as Gadgetron starts one: ``python -m gadgetron PORT MODULE ...``."""
    argv = list(getattr(sys, "orig_argv", ()))
    for index, arg in enumerate(argv):
        if arg == "-m":
            return argv[index + 1 : index + 2] == ["gadgetron"] and len(argv) > index + 3
    return False


def install_for_gadget_process() -> None:
    """:func:`install`, and end the process cleanly when the session fails before the gadget's target runs.

    For ``python -m gadgetron`` only (``gadgets/sitecustomize.py`` calls it at start-up): gadgetron-python
    reads CONFIG and HEADER before it imports the gadget module. A refused CONFIG / HEADER is logged and
    reported to Gadgetron (ERROR), exit status :data:`EXIT_REFUSED`; a Gadgetron that goes away before
    the HEADER is complete is logged, exit status :data:`EXIT_GADGETRON_GONE`. No traceback either way.
    """
    global _process_guarded
    install()
    if _process_guarded:
        return
    from gadgetron.external import connection

    original = connection.Connection.__init__

    def __init__(self: Any, sock: socket.socket) -> None:  # noqa: N807 - replaces Connection.__init__
        try:
            original(self, sock)
        except BadMessage as exc:
            logger.error("semrecon gadget: %s", exc)
            send_error(sock, f"semrecon gadget: {exc}")
            raise SystemExit(EXIT_REFUSED) from None
        except (ConnectionError, TimeoutError) as exc:
            logger.error("semrecon gadget: %s; ending the external Python process", exc)
            sock.close()
            raise SystemExit(EXIT_GADGETRON_GONE) from None

    connection.Connection.__init__ = __init__
    _process_guarded = True
