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

Caveat: ``python -m gadgetron`` reads CONFIG and HEADER before it imports the gadget module, so a
Gadgetron that dies before sending the HEADER still meets the unpatched read (3).
"""

from __future__ import annotations

import ctypes
import logging
import socket
from typing import Any

import numpy as np

from semrecon_core.gadgetron.protocol import recv_exactly

logger = logging.getLogger(__name__)

_installed = False


def _read_exactly(self: Any, nbytes: int) -> bytes:
    """``SocketWrapper.read`` replacement: exactly ``nbytes``, :class:`ConnectionError` on end of stream."""
    buffer = bytearray(nbytes)
    try:
        recv_exactly(self.socket, memoryview(buffer), peer="Gadgetron")
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; ending the external Python process") from None
    return bytes(buffer)


def _close_quietly(self: Any) -> None:
    """``SocketWrapper.close`` replacement: send CLOSE if the peer still listens, then close."""
    from gadgetron.external import constants

    try:
        self.socket.sendall(constants.GadgetMessageIdentifier.pack(constants.GADGET_MESSAGE_CLOSE))
    except OSError as exc:
        logger.warning("could not send CLOSE to Gadgetron (%s); it has already gone", exc)
    finally:
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()


def write_array(destination: Any, array: Any, dtype: Any) -> None:
    """``writers.write_array`` replacement: dims + Fortran-order data, casting to ``dtype`` when needed."""
    from semrecon_core.gadgetron.protocol import write_ndarray

    write_ndarray(destination, np.asarray(array), dtype)


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


def use_fast_readers(connection: Any) -> None:
    """Read ReconData and ImageArray on ``connection`` with :mod:`~semrecon_core.gadgetron.protocol`.

    gadgetron's readers build the header arrays from lists of ctypes structures (slow, and numpy warns
    about their buffer format for every buffer); the replacements read them in one piece and fill the
    data arrays in place. Objects and values are the same.
    """
    from gadgetron.external import constants

    from semrecon_core.gadgetron import protocol

    connection.add_reader(constants.GADGET_MESSAGE_RECON_DATA, protocol.read_recon_data)
    connection.add_reader(constants.GADGET_MESSAGE_IMAGE_ARRAY, protocol.read_image_array)


def install() -> None:
    """Patch the ``gadgetron`` package in place (idempotent)."""
    global _installed
    if _installed:
        return
    from gadgetron.external import connection, writers
    from gadgetron.types import acquisition_bucket, image_array, recon_data

    connection.Connection.SocketWrapper.read = _read_exactly
    connection.Connection.SocketWrapper.close = _close_quietly
    writers.write_array = write_array
    recon_data.write_array = write_array
    acquisition_bucket.write_array = write_array
    image_array.write_waveforms = write_waveforms
    acquisition_bucket.read_waveform_header = read_waveform_header
    _installed = True


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed
