"""Gadgetron's external-language wire protocol (Gadgetron 4 ``<external>`` / ``<connect>`` nodes).

Every message is little-endian and starts with a ``uint16`` id (:class:`MessageId`). A session is
CONFIG, HEADER, data messages and CLOSE from Gadgetron; data messages and CLOSE back from Python.

Message bodies (REFERENCE.md §3):

- CONFIG, HEADER: ``uint32`` length + text (the chain's ``<configuration>`` element, the ISMRMRD XML).
- ERROR: ``uint64`` length + text. CLOSE: no body.
- Acquisition (1008), Waveform (1026), Image (1022): the ISMRMRD serialisation (Image = ImageHeader
  198 B + ``uint64`` attribute length + attribute XML + data), via the ``ismrmrd`` package.
- ReconData (1023): ``uint64`` nbits, per bit a buffer + ``bool`` has_ref + optional buffer. A buffer is
  data ``hoNDArray<complex64>`` (``uint64`` ndim, ``uint64`` dims, Fortran-order data; dims
  ``[E0, E1, E2, CHA, N, S, LOC]``) + optional trajectory / density ``hoNDArray<float>`` + headers
  ``hoNDArray<AcquisitionHeader>`` ``[E1, E2, N, S, LOC]`` + SamplingDescription (56 bytes).
- ImageArray (1024): data ``hoNDArray<complex64>``, headers ``hoNDArray<ImageHeader>``, a vector of meta
  strings (``uint64`` length each), optional vector of waveforms (header + samples, *no* message id),
  optional ``hoNDArray<AcquisitionHeader>``.

The Python objects are those of the ``gadgetron`` package (``gadgetron.types.ReconData``,
``ImageArray``) and of ``ismrmrd``, so a gadget's ``Connection`` and this module exchange the same types.
Large arrays are read into preallocated memory and written without an intermediate copy. Where the
``gadgetron`` 1.4.1 serialisers are correct (acquisition/image/waveform framing, object arrays, the
sampling description) they are reused; its ImageArray waveform writer (which inserts message ids) and its
``write_array`` (fails under numpy 2 when a cast is needed) are replaced here.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterator
from enum import IntEnum
from typing import Any, Protocol

import numpy as np

_UINT16 = struct.Struct("<H")
_UINT32 = struct.Struct("<I")
_UINT64 = struct.Struct("<Q")
_BOOL = struct.Struct("<?")

# Writes below this size are gathered into one send; larger ones go straight to the socket.
_WRITE_BUFFER = 1 << 16
# Sanity limits that turn a mis-framed stream into a clear error instead of a huge allocation.
_MAX_NDIM = 16
_MAX_TEXT = 1 << 30
_MAX_ARRAY = 1 << 40


class MessageId(IntEnum):
    """Gadgetron message identifiers (``gadgetron.external.constants``)."""

    CONFIG = 2
    HEADER = 3
    CLOSE = 4
    TEXT = 5
    ERROR = 8
    ACQUISITION = 1008
    IMAGE = 1022
    RECON_DATA = 1023
    IMAGE_ARRAY = 1024
    WAVEFORM = 1026
    BUCKET = 1050


class ProtocolError(RuntimeError):
    """The byte stream does not follow the Gadgetron protocol (unknown id, impossible sizes, wrong order)."""


class Readable(Protocol):
    """Anything with an exact ``read(n) -> bytes`` (a :class:`SocketStream`, ``io.BytesIO``)."""

    def read(self, n: int, /) -> bytes: ...


class Writable(Protocol):
    """Anything with ``write(bytes-like)``."""

    def write(self, data: Any, /) -> Any: ...


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


class SocketStream:
    """A connected socket with exact reads, explicit end-of-stream errors and gathered small writes.

    ``read(n)`` returns exactly ``n`` bytes or raises :class:`ConnectionError` when the peer closes
    the connection (never loops on an empty ``recv``); with ``timeout`` set, a peer silent for that many
    seconds raises :class:`TimeoutError`. Small writes are gathered until :meth:`flush` (the message
    writers below flush at the end of every message).
    """

    def __init__(self, sock: socket.socket, *, timeout: float | None = None) -> None:
        self.socket = sock
        self.socket.settimeout(timeout)
        self._pending = bytearray()

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes from the peer."""
        buffer = bytearray(n)
        self.read_into(memoryview(buffer))
        return bytes(buffer)

    def read_into(self, view: memoryview) -> None:
        """Fill the writable byte view ``view`` completely from the peer."""
        recv_exactly(self.socket, view)

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


# ----------------------------------------------------------------------------------------------- helpers


def _read(source: Readable, n: int) -> bytes:
    data = source.read(n)
    if len(data) != n:
        raise ConnectionError(f"stream ended in the middle of a message (got {len(data)} of {n} bytes)")
    return data


def _read_uint(source: Readable, fmt: struct.Struct) -> int:
    return fmt.unpack(_read(source, fmt.size))[0]


def _read_bool(source: Readable) -> bool:
    return bool(_BOOL.unpack(_read(source, 1))[0])


def _flush(destination: Writable) -> None:
    flush = getattr(destination, "flush", None)
    if flush is not None:
        flush()


def _read_text(source: Readable, length_type: struct.Struct, what: str) -> str:
    length = _read_uint(source, length_type)
    if length > _MAX_TEXT:
        raise ProtocolError(f"{what}: length {length} bytes is not plausible (mis-framed stream?)")
    return _read(source, length).decode("utf-8").rstrip("\0")


def _write_text(destination: Writable, text: str | bytes, length_type: struct.Struct) -> None:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    destination.write(length_type.pack(len(data)))
    destination.write(data)


def read_dimensions(source: Readable) -> tuple[int, ...]:
    """An hoNDArray dimension vector: ``uint64`` ndim + ``uint64`` dims (fastest-varying first)."""
    ndim = _read_uint(source, _UINT64)
    if ndim > _MAX_NDIM:
        raise ProtocolError(f"array with {ndim} dimensions is not plausible (mis-framed stream?)")
    if ndim == 0:
        return ()
    return tuple(int(d) for d in np.frombuffer(_read(source, 8 * ndim), dtype="<u8"))


def write_dimensions(destination: Writable, shape: tuple[int, ...]) -> None:
    """Write an hoNDArray dimension vector for a numpy ``shape`` (same order: first axis fastest)."""
    destination.write(_UINT64.pack(len(shape)) + np.asarray(shape, dtype="<u8").tobytes())


def read_ndarray(source: Readable, dtype: np.dtype | type) -> np.ndarray:
    """An ``hoNDArray<dtype>`` as a writable, Fortran-ordered numpy array of shape ``dims``."""
    dims = read_dimensions(source)
    dtype = np.dtype(dtype)
    if not dims:
        return np.empty(0, dtype=dtype)
    nbytes = int(np.prod(dims, dtype=np.float64)) * dtype.itemsize
    if nbytes > _MAX_ARRAY:
        raise ProtocolError(
            f"array of dims {list(dims)} ({nbytes / 2**30:.0f} GiB) is not plausible (mis-framed stream?)"
        )
    array = np.empty(dims, dtype=dtype, order="F")
    if array.size:
        flat = array.reshape(-1, order="F").view(np.uint8)
        read_into = getattr(source, "read_into", None)
        if read_into is not None:
            read_into(memoryview(flat))
        else:
            flat[:] = np.frombuffer(_read(source, flat.size), dtype=np.uint8)
    return array


def write_ndarray(destination: Writable, array: np.ndarray, dtype: np.dtype | type) -> None:
    """Write ``array`` as ``hoNDArray<dtype>`` (cast first when needed; no copy when already in place)."""
    data = np.asfortranarray(np.asarray(array, dtype=np.dtype(dtype)))
    write_dimensions(destination, data.shape)
    if data.size:
        destination.write(data.reshape(-1, order="F").view(np.uint8))


def _struct_array_bytes(array: np.ndarray, what: str, struct_type: type) -> bytes:
    parts = []
    for item in array.reshape(-1, order="F"):
        if not isinstance(item, struct_type):
            raise TypeError(f"{what}: expected {struct_type.__name__} elements, found {type(item).__name__}")
        parts.append(bytes(item))
    return b"".join(parts)


def read_struct_array(source: Readable, struct_type: type) -> np.ndarray:
    """An ``hoNDArray`` of fixed-size C structures as an object array (Fortran order) of ``struct_type``."""
    dims = read_dimensions(source)
    count = int(np.prod(dims)) if dims else 0
    size = ctypes.sizeof(struct_type)
    raw = _read(source, count * size) if count else b""
    items = np.empty(count, dtype=object)
    for i in range(count):
        items[i] = struct_type.from_buffer_copy(raw, i * size)
    return items.reshape(dims, order="F")


def write_struct_array(destination: Writable, array: np.ndarray, struct_type: type, what: str) -> None:
    """Write an object array of ``struct_type`` as an ``hoNDArray`` of structures (one contiguous write)."""
    array = np.asarray(array, dtype=object)
    write_dimensions(destination, array.shape)
    destination.write(_struct_array_bytes(array, what, struct_type))


# ---------------------------------------------------------------------------------------- control messages


def write_config(destination: Writable, text: str | bytes) -> None:
    """CONFIG: the chain's ``<configuration>`` element (or a config file name's text), verbatim."""
    destination.write(_UINT16.pack(MessageId.CONFIG))
    _write_text(destination, text, _UINT32)
    _flush(destination)


def write_header(destination: Writable, xml_header: str | bytes) -> None:
    """HEADER: the ISMRMRD XML header."""
    destination.write(_UINT16.pack(MessageId.HEADER))
    _write_text(destination, xml_header, _UINT32)
    _flush(destination)


def write_close(destination: Writable) -> None:
    """CLOSE: end of the session in this direction."""
    destination.write(_UINT16.pack(MessageId.CLOSE))
    _flush(destination)


def write_error(destination: Writable, text: str) -> None:
    """ERROR: a text Gadgetron logs as the failure of this node."""
    destination.write(_UINT16.pack(MessageId.ERROR))
    _write_text(destination, text, _UINT64)
    _flush(destination)


# ------------------------------------------------------------------------------------------ data messages


def write_acquisition(destination: Writable, acquisition: Any) -> None:
    """An ``ismrmrd.Acquisition`` (gadgetron's serialiser)."""
    from gadgetron.external import writers

    writers.write_acquisition(destination, acquisition)
    _flush(destination)


def write_waveform(destination: Writable, waveform: Any) -> None:
    """An ``ismrmrd.Waveform`` (gadgetron's serialiser)."""
    from gadgetron.external import writers

    writers.write_waveform(destination, waveform)
    _flush(destination)


def write_image(destination: Writable, image: Any) -> None:
    """An ``ismrmrd.Image`` with its meta attributes (gadgetron's serialiser)."""
    from gadgetron.external import writers

    writers.write_image(destination, image)
    _flush(destination)


def _sampling_type() -> type:
    from gadgetron.types.recon_data import SamplingDescription

    return SamplingDescription


def write_recon_buffer(destination: Writable, buffer: Any) -> None:
    """One ``ReconBuffer`` (data, optional trajectory and density, headers, sampling description)."""
    import ismrmrd

    sampling_type = _sampling_type()
    if buffer.data is None or np.ndim(buffer.data) != 7:
        found = "None" if buffer.data is None else f"{np.ndim(buffer.data)}-D"
        raise ValueError(f"ReconBuffer.data: expected a 7-D array [E0,E1,E2,CHA,N,S,LOC], found {found}")
    write_ndarray(destination, buffer.data, np.complex64)
    for name in ("trajectory", "density"):
        value = getattr(buffer, name)
        destination.write(_BOOL.pack(value is not None))
        if value is not None:
            write_ndarray(destination, value, np.float32)
    write_struct_array(destination, buffer.headers, ismrmrd.AcquisitionHeader, "ReconBuffer.headers")
    if not isinstance(buffer.sampling, sampling_type):
        raise TypeError(f"ReconBuffer.sampling: expected SamplingDescription, found {type(buffer.sampling).__name__}")
    destination.write(bytes(buffer.sampling))


def read_recon_buffer(source: Readable) -> Any:
    """One ``gadgetron.types.ReconBuffer``."""
    import ismrmrd
    from gadgetron.types.recon_data import ReconBuffer

    data = read_ndarray(source, np.complex64)
    trajectory = read_ndarray(source, np.float32) if _read_bool(source) else None
    density = read_ndarray(source, np.float32) if _read_bool(source) else None
    headers = read_struct_array(source, ismrmrd.AcquisitionHeader)
    sampling_type = _sampling_type()
    sampling = sampling_type.from_buffer_copy(_read(source, ctypes.sizeof(sampling_type)))
    return ReconBuffer(data, trajectory, density, headers, sampling)


def write_recon_data(destination: Writable, recon_data: Any) -> None:
    """A ``gadgetron.types.ReconData`` message (bits of data + optional reference buffers)."""
    bits = list(recon_data.bits)
    destination.write(_UINT16.pack(MessageId.RECON_DATA) + _UINT64.pack(len(bits)))
    for bit in bits:
        write_recon_buffer(destination, bit.data)
        destination.write(_BOOL.pack(bit.ref is not None))
        if bit.ref is not None:
            write_recon_buffer(destination, bit.ref)
    _flush(destination)


def read_recon_data(source: Readable) -> Any:
    """The body of a ReconData message as ``gadgetron.types.ReconData``."""
    from gadgetron.types.recon_data import ReconBit, ReconData

    count = _read_uint(source, _UINT64)
    bits = []
    for _ in range(count):
        data = read_recon_buffer(source)
        ref = read_recon_buffer(source) if _read_bool(source) else None
        bits.append(ReconBit(data, ref))
    return ReconData(bits)


def write_image_array(destination: Writable, image_array: Any) -> None:
    """A ``gadgetron.types.ImageArray`` message, waveforms framed as Gadgetron's C++ reader expects."""
    import ismrmrd

    destination.write(_UINT16.pack(MessageId.IMAGE_ARRAY))
    write_ndarray(destination, image_array.data, np.complex64)
    write_struct_array(destination, image_array.headers, ismrmrd.ImageHeader, "ImageArray.headers")
    meta = list(image_array.meta or [])
    destination.write(_UINT64.pack(len(meta)))
    for container in meta:
        _write_text(destination, str(container), _UINT64)
    destination.write(_BOOL.pack(image_array.waveform is not None))
    if image_array.waveform is not None:
        destination.write(_UINT64.pack(len(image_array.waveform)))
        for waveform in image_array.waveform:
            waveform.serialize_into(destination.write)
    destination.write(_BOOL.pack(image_array.acq_headers is not None))
    if image_array.acq_headers is not None:
        write_struct_array(destination, image_array.acq_headers, ismrmrd.AcquisitionHeader, "ImageArray.acq_headers")
    _flush(destination)


def read_image_array(source: Readable) -> Any:
    """The body of an ImageArray message as ``gadgetron.types.ImageArray``."""
    import ismrmrd
    from gadgetron.types.image_array import ImageArray

    data = read_ndarray(source, np.complex64)
    headers = read_struct_array(source, ismrmrd.ImageHeader)
    meta = [_read_text(source, _UINT64, "ImageArray meta") for _ in range(_read_uint(source, _UINT64))]
    waveform = None
    if _read_bool(source):
        waveform = [ismrmrd.Waveform.deserialize_from(source.read) for _ in range(_read_uint(source, _UINT64))]
    acq_headers = read_struct_array(source, ismrmrd.AcquisitionHeader) if _read_bool(source) else None
    return ImageArray(data=data, headers=headers, meta=meta, waveform=waveform, acq_headers=acq_headers)


def read_message(source: Readable) -> tuple[MessageId, Any]:
    """Read one message: ``(id, object)``.

    CONFIG, HEADER and ERROR give ``str``; CLOSE gives ``None``; Acquisition / Waveform / Image give
    ``ismrmrd`` objects; ReconData and ImageArray give ``gadgetron.types`` objects.
    """
    import ismrmrd

    raw_id = _read_uint(source, _UINT16)
    try:
        mid = MessageId(raw_id)
    except ValueError:
        raise ProtocolError(f"unknown Gadgetron message id {raw_id}") from None
    if mid is MessageId.CLOSE:
        return mid, None
    if mid in (MessageId.CONFIG, MessageId.HEADER):
        return mid, _read_text(source, _UINT32, mid.name)
    if mid in (MessageId.ERROR, MessageId.TEXT):
        return mid, _read_text(source, _UINT64 if mid is MessageId.ERROR else _UINT32, mid.name)
    if mid is MessageId.ACQUISITION:
        return mid, ismrmrd.Acquisition.deserialize_from(source.read)
    if mid is MessageId.WAVEFORM:
        return mid, ismrmrd.Waveform.deserialize_from(source.read)
    if mid is MessageId.IMAGE:
        return mid, ismrmrd.Image.deserialize_from(source.read)
    if mid is MessageId.RECON_DATA:
        return mid, read_recon_data(source)
    if mid is MessageId.IMAGE_ARRAY:
        return mid, read_image_array(source)
    from semrecon_core.gadgetron.compat import read_acquisition_bucket

    return mid, read_acquisition_bucket(source)


def iter_messages(source: Readable) -> Iterator[tuple[MessageId, Any]]:
    """Messages until (and excluding) CLOSE."""
    while True:
        mid, item = read_message(source)
        if mid is MessageId.CLOSE:
            return
        yield mid, item


def write_item(destination: Writable, item: Any) -> None:
    """Write a data object (Acquisition, Waveform, Image, ImageArray, ReconData) as its message type."""
    import ismrmrd
    from gadgetron.types.image_array import ImageArray
    from gadgetron.types.recon_data import ReconData

    if isinstance(item, ismrmrd.Acquisition):
        write_acquisition(destination, item)
    elif isinstance(item, ismrmrd.Waveform):
        write_waveform(destination, item)
    elif isinstance(item, ismrmrd.Image):
        write_image(destination, item)
    elif isinstance(item, ImageArray):
        write_image_array(destination, item)
    elif isinstance(item, ReconData):
        write_recon_data(destination, item)
    else:
        raise TypeError(f"no Gadgetron message type for an object of type {type(item).__name__}")
