"""Workarounds for defects of the ``gadgetron`` Python package 1.4.1 (REFERENCE.md §3), without forking it.

:func:`install` patches the package in place; the gadget module calls it on import, so that the
``Connection`` that ``python -m gadgetron`` has already opened uses the fixed functions from then on.

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

The module depends on nothing else in semrecon; its exact-read loop :func:`recv_exactly` is shared with
the offline emulator. Caveat: ``python -m gadgetron`` reads CONFIG and HEADER before it imports the
gadget module, so a Gadgetron that dies before sending the HEADER still meets the unpatched read (3).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_installed = False


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
        raise ConnectionError(f"{exc}; ending the external Python process") from None


def _read_exactly(self: Any, nbytes: int) -> bytes:
    """``SocketWrapper.read`` replacement: exactly ``nbytes``, :class:`ConnectionError` on end of stream."""
    buffer = bytearray(nbytes)
    _fill(self, memoryview(buffer))
    return bytes(buffer)


def _close_quietly(self: Any) -> None:
    """``SocketWrapper.close`` replacement: send CLOSE if the peer still listens, then close."""
    from gadgetron.external import constants

    try:
        self.socket.sendall(constants.GadgetMessageIdentifier.pack(constants.GADGET_MESSAGE_CLOSE))
    except OSError as exc:
        logger.warning("could not send CLOSE to Gadgetron (%s); it has already gone", exc)
    finally:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()


def write_array(destination: Any, array: Any, dtype: Any) -> None:
    """``writers.write_array`` replacement: ``uint64`` ndim + dims, then the data in Fortran order as ``dtype``."""
    data = np.asfortranarray(np.asarray(array, dtype=np.dtype(dtype)))
    destination.write(np.asarray([data.ndim, *data.shape], dtype="<u8").tobytes())
    if data.size:
        destination.write(data.reshape(-1, order="F").view(np.uint8))


def _read_dimensions(source: Any) -> tuple[int, ...]:
    from gadgetron.external import readers

    return tuple(int(d) for d in readers.read_vector(source))


def read_array(source: Any, numpy_type: Any = np.uint64) -> np.ndarray:
    """``readers.read_array`` replacement: one read into a writable, Fortran-ordered array of the dims."""
    dims = _read_dimensions(source)
    if not dims:
        return np.empty(0, dtype=numpy_type)
    array = np.empty(dims, dtype=numpy_type, order="F")
    if array.size:
        _fill(source, array.reshape(-1, order="F").view(np.uint8).data)
    return array


def read_object_array(source: Any, read_object: Any) -> np.ndarray:
    """``readers.read_object_array`` replacement: arrays of ISMRMRD headers read in one piece (Fortran order)."""
    import ismrmrd
    from gadgetron.external import readers

    structures = {
        readers.read_acquisition_header: ismrmrd.AcquisitionHeader,
        readers.read_image_header: ismrmrd.ImageHeader,
    }
    dims = _read_dimensions(source)
    count = int(np.prod(dims)) if dims else 0
    items = np.empty(count, dtype=object)
    struct_type = structures.get(read_object)
    if struct_type is None:
        for index in range(count):
            items[index] = read_object(source)
    elif count:
        size = ctypes.sizeof(struct_type)
        raw = bytearray(count * size)
        _fill(source, memoryview(raw))
        for index in range(count):
            items[index] = struct_type.from_buffer_copy(raw, index * size)
    return items.reshape(dims, order="F")


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


def install() -> None:
    """Patch the ``gadgetron`` package in place (idempotent)."""
    global _installed
    if _installed:
        return
    from gadgetron.external import connection, readers, writers
    from gadgetron.types import acquisition_bucket, image_array, recon_data

    connection.Connection.SocketWrapper.read = _read_exactly
    connection.Connection.SocketWrapper.close = _close_quietly
    writers.write_array = write_array
    recon_data.write_array = write_array
    acquisition_bucket.write_array = write_array
    image_array.write_waveforms = write_waveforms
    acquisition_bucket.read_waveform_header = read_waveform_header
    readers.read_array = read_array
    readers.read_object_array = read_object_array
    recon_data.read_array = read_array
    recon_data.read_object_array = read_object_array
    _installed = True


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed
