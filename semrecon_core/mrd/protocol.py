"""The MRD streaming protocol as the semrecon MRD server reads and writes it, sizes checked before allocation.

Every message is a little-endian ``uint16`` id followed by its payload: CONFIG_FILE (1: 1024 bytes, a
NUL-terminated name), CONFIG_TEXT (2), METADATA_XML (3, the ISMRMRD header) and TEXT (5): ``uint32`` length +
UTF-8 text; CLOSE (4): nothing; ACQUISITION (1008), IMAGE (1022), WAVEFORM (1026): the ISMRMRD header struct,
then the arrays its fields size. The server reads with :class:`MessageReader`, which checks every length a
client claims against the limits below before it allocates anything, so a claimed 4 GiB is a
:class:`ProtocolError` naming the message and the field, never an allocation. Replies go out as the framing of
``ismrmrd.serialization`` writes them (:func:`image_message`, :func:`text_message`); errors follow the FIRE
convention: a TEXT ``ERROR <message>``, then CLOSE (:func:`send_error`).
"""

from __future__ import annotations

import ctypes
import io
import logging
import socket
import struct
from typing import Any

import numpy as np

from semrecon_core.gadgetron.compat import send_last

log = logging.getLogger(__name__)

CONFIG_FILE = 1
CONFIG_TEXT = 2
METADATA_XML = 3
CLOSE = 4
TEXT = 5
ACQUISITION = 1008
IMAGE = 1022
WAVEFORM = 1026
NAMES = {
    CONFIG_FILE: "CONFIG_FILE",
    CONFIG_TEXT: "CONFIG_TEXT",
    METADATA_XML: "METADATA_XML",
    CLOSE: "CLOSE",
    TEXT: "TEXT",
    ACQUISITION: "ACQUISITION",
    IMAGE: "IMAGE",
    WAVEFORM: "WAVEFORM",
}
CONFIG_FILE_BYTES = 1024
#: longest CONFIG_TEXT / TEXT a client may send (a JSON object of settings, a log line)
MAX_TEXT_BYTES = 1 << 20
#: longest ISMRMRD XML header
MAX_HEADER_BYTES = 16 << 20
#: most channels, trajectory dimensions and bytes of samples one acquisition may claim
MAX_CHANNELS = 1024
MAX_TRAJECTORY_DIMENSIONS = 16
MAX_ACQUISITION_BYTES = 256 << 20
#: most bytes of samples one waveform may claim (waveforms are read and dropped)
MAX_WAVEFORM_BYTES = 64 << 20
#: longest error text sent back
MAX_ERROR_BYTES = 4096
_LINGER_S = 2.0


class ProtocolError(ValueError):
    """A message the server refuses: an unknown id, a claimed size beyond the limits, a malformed payload."""


class MessageReader:
    """Reads MRD messages from a connected socket (blocking; the socket's timeouts apply)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages = 0

    def _exactly(self, size: int, what: str) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = self.sock.recv_into(view[got:], size - got)
            if count == 0:
                raise ConnectionResetError(f"the client closed the connection in the middle of {what}")
            got += count
        return bytes(buffer)

    def message_id(self) -> int:
        """The next message's id (``ConnectionResetError`` when the client has gone between messages)."""
        raw = self.sock.recv(2, socket.MSG_WAITALL)
        if len(raw) < 2:
            raise ConnectionResetError("the client closed the connection without a CLOSE message")
        self.messages += 1
        return int(struct.unpack("<H", raw)[0])

    def config_file(self) -> str:
        """The name a CONFIG_FILE carries."""
        raw = self._exactly(CONFIG_FILE_BYTES, "CONFIG_FILE")
        try:
            return raw.split(b"\0", 1)[0].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ProtocolError("CONFIG_FILE: the name is not UTF-8 text") from None

    def text(self, what: str, limit: int = MAX_TEXT_BYTES) -> str:
        """A length-prefixed UTF-8 payload (CONFIG_TEXT, METADATA_XML, TEXT) of at most ``limit`` bytes."""
        (length,) = struct.unpack("<I", self._exactly(4, what))
        if length > limit:
            raise ProtocolError(f"{what}: claims {length} bytes, more than the {limit} this server accepts")
        raw = self._exactly(length, what)
        try:
            return raw.decode("utf-8").rstrip("\0")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what}: the {length} bytes are not UTF-8 text") from None

    def acquisition(self) -> Any:
        """One ``ismrmrd.Acquisition``; channels, samples and trajectory checked before the arrays exist."""
        import ismrmrd

        head = ismrmrd.AcquisitionHeader.from_buffer_copy(
            self._exactly(ctypes.sizeof(ismrmrd.AcquisitionHeader), "ACQUISITION")
        )
        channels, samples = int(head.active_channels), int(head.number_of_samples)
        dims = int(head.trajectory_dimensions)
        where = f"ACQUISITION #{self.messages} (scan counter {int(head.scan_counter)})"
        if channels > MAX_CHANNELS:
            raise ProtocolError(f"{where}: active_channels {channels}, more than {MAX_CHANNELS}")
        if dims > MAX_TRAJECTORY_DIMENSIONS:
            raise ProtocolError(f"{where}: trajectory_dimensions {dims}, more than {MAX_TRAJECTORY_DIMENSIONS}")
        size = channels * samples * 8 + samples * dims * 4
        if size > MAX_ACQUISITION_BYTES:
            raise ProtocolError(
                f"{where}: claims {size} bytes ({channels} channels × {samples} samples), more than the "
                f"{MAX_ACQUISITION_BYTES} this server accepts"
            )
        traj = np.frombuffer(self._exactly(samples * dims * 4, where), dtype=np.float32).reshape(samples, dims)
        data = np.frombuffer(self._exactly(channels * samples * 8, where), dtype=np.complex64)
        return ismrmrd.Acquisition(head, data.reshape(channels, samples).copy(), traj.copy() if dims else None)

    def skip_waveform(self) -> None:
        """Read one WAVEFORM and drop it (its size checked first)."""
        from ismrmrd.waveform import WaveformHeader

        head = WaveformHeader.from_buffer_copy(self._exactly(ctypes.sizeof(WaveformHeader), "WAVEFORM"))
        size = int(head.channels) * int(head.number_of_samples) * 4
        if size > MAX_WAVEFORM_BYTES:
            raise ProtocolError(
                f"WAVEFORM: claims {size} bytes, more than the {MAX_WAVEFORM_BYTES} this server accepts"
            )
        self._exactly(size, "WAVEFORM")


def image_message(image: Any) -> bytes:
    """The IMAGE message of ``image`` as ``ismrmrd.serialization`` frames it."""
    from ismrmrd.serialization import ProtocolSerializer

    stream = io.BytesIO()
    ProtocolSerializer(stream).serialize(image)
    return stream.getvalue()


def text_message(text: str) -> bytes:
    """A TEXT message (``uint32`` length + UTF-8)."""
    body = text.encode("utf-8", "replace")
    return struct.pack("<HI", TEXT, len(body)) + body


def close_message() -> bytes:
    """The CLOSE message."""
    return struct.pack("<H", CLOSE)


def send_error(sock: socket.socket, text: str, *, linger: float = _LINGER_S) -> bool:
    """FIRE's error report: TEXT ``ERROR <text>`` and CLOSE, then the socket is closed; never raises.

    After CLOSE the sending side is shut down and whatever the client still sends is read and dropped for at
    most ``linger`` seconds, so that closing does not reset the connection before the client has read the
    error. Returns whether the error went out.
    """
    body = ("ERROR " + text).encode("utf-8", "replace")[:MAX_ERROR_BYTES].decode("utf-8", "ignore")
    return send_last(sock, text_message(body) + close_message(), linger=linger, what="the error to the MRD client")
