"""Gadgetron wire protocol: byte-exact framing against gadgetron's own readers, the 1.4.1 workarounds,
the Gadgetron-side emulator launching ``python -m gadgetron``, and a gadget whose Gadgetron dies."""

from __future__ import annotations

import io
import os
import socket
import struct
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from gadgetron.external import constants, readers  # noqa: E402
from gadgetron.types.image_array import ImageArray, read_image_array  # noqa: E402
from gadgetron.types.recon_data import (  # noqa: E402
    ReconBit,
    ReconBuffer,
    ReconData,
    SamplingDescription,
    read_recon_data,
)

from semrecon_core.gadgetron import compat, emulator, protocol  # noqa: E402
from semrecon_core.gadgetron.protocol import MessageId  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# gadgetron's object-array reader builds numpy arrays of ctypes structures, which numpy warns about.
pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")

HEADER_XML = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>16</x><y>12</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>200</x><y>150</y><z>5</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>16</x><y>12</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>200</x><y>150</y><z>5</z></fieldOfView_mm></reconSpace>
    <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>11</maximum><center>6</center>
      </kspace_encoding_step_1></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
"""

# Test-only gadget modules, written into a temporary gadget directory. Both install the workarounds on
# import, as gadgets/semrecon_gadget.py does.
PASS_THROUGH = textwrap.dedent(
    """
    from semrecon_core.gadgetron import compat

    compat.install()


    def passthrough(connection):
        for item in connection:
            connection.send(item)


    def failing(connection):
        for _ in connection:
            raise RuntimeError("deliberate failure in the test gadget")


    def erroring(connection):
        from semrecon_core.gadgetron import protocol

        for number, item in enumerate(connection):
            if number == 0:
                protocol.write_error(connection.socket, "cannot reconstruct this scan")
            connection.send(item)
    """
)
UNPATCHED = textwrap.dedent(
    """
    def passthrough(connection):
        for item in connection:
            connection.send(item)
    """
)


def _buffer(rng: np.random.Generator, e0: int = 16, e1: int = 12, cha: int = 3, loc: int = 2, extras: bool = False):
    shape = (e0, e1, 1, cha, 1, 1, loc)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    headers = np.empty((e1, 1, 1, 1, loc), dtype=object)
    for index in np.ndindex(headers.shape):
        head = ismrmrd.AcquisitionHeader()
        head.idx.kspace_encode_step_1 = index[0]
        head.idx.slice = index[4]
        head.scan_counter = 1000 * index[4] + index[0]
        head.number_of_samples = e0
        head.active_channels = cha
        head.position[:] = (0.0, 0.0, 5.0 * index[4])
        headers[index] = head
    sampling = SamplingDescription()
    sampling.encoded_FOV[:] = (200.0, 150.0, 5.0)
    sampling.recon_FOV[:] = (200.0, 150.0, 5.0)
    sampling.encoded_matrix[:] = (e0, e1, 1)
    sampling.recon_matrix[:] = (e0, e1, 1)
    sampling.sampling_limits[1].min, sampling.sampling_limits[1].center, sampling.sampling_limits[1].max = (
        0,
        6,
        11,
    )
    trajectory = rng.standard_normal((2, e0, e1, 1, 1, 1, loc)).astype(np.float32) if extras else None
    density = rng.random((e0, e1, 1, 1, 1, loc)).astype(np.float32) if extras else None
    return ReconBuffer(data, trajectory, density, headers, sampling)


def _recon_data(seed: int = 0) -> ReconData:
    rng = np.random.default_rng(seed)
    return ReconData(
        [
            ReconBit(_buffer(rng), _buffer(rng, e1=6)),  # with reference lines
            ReconBit(_buffer(rng, extras=True), None),  # without, with trajectory and density
        ]
    )


def _expected_buffer_bytes(buffer: ReconBuffer) -> bytes:
    """The wire layout written out independently of both implementations (REFERENCE.md §3)."""

    def ndarray(array: np.ndarray, dtype: str) -> bytes:
        return (
            struct.pack("<Q", array.ndim)
            + struct.pack(f"<{array.ndim}Q", *array.shape)
            + np.asarray(array, dtype=dtype).tobytes(order="F")
        )

    out = ndarray(buffer.data, "<c8")
    for optional in (buffer.trajectory, buffer.density):
        out += struct.pack("<?", optional is not None) + (b"" if optional is None else ndarray(optional, "<f4"))
    headers = buffer.headers
    out += struct.pack("<Q", headers.ndim) + struct.pack(f"<{headers.ndim}Q", *headers.shape)
    out += b"".join(bytes(h) for h in headers.reshape(-1, order="F"))
    sampling = buffer.sampling
    out += struct.pack(
        "<3f3f3H3H9H",
        *sampling.encoded_FOV,
        *sampling.recon_FOV,
        *sampling.encoded_matrix,
        *sampling.recon_matrix,
        *[v for limit in sampling.sampling_limits for v in limit],
    )
    return out + b"\0\0"  # C struct padding: 54 bytes of fields, 56 on the wire


def _assert_buffers_equal(a: ReconBuffer, b: ReconBuffer) -> None:
    assert a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
    for name in ("trajectory", "density"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert np.array_equal(x, y)
    assert a.headers.shape == b.headers.shape
    assert all(bytes(x) == bytes(y) for x, y in zip(a.headers.flat, b.headers.flat, strict=True))
    assert bytes(a.sampling) == bytes(b.sampling)


def _assert_recon_data_equal(a: ReconData, b: ReconData) -> None:
    assert len(a.bits) == len(b.bits)
    for x, y in zip(a.bits, b.bits, strict=True):
        _assert_buffers_equal(x.data, y.data)
        assert (x.ref is None) == (y.ref is None)
        if x.ref is not None:
            _assert_buffers_equal(x.ref, y.ref)


def _image(seed: int = 1):
    data = np.random.default_rng(seed).random((12, 16)).astype(np.float32)
    image = ismrmrd.Image.from_array(data, image_type=ismrmrd.IMTYPE_MAGNITUDE, field_of_view=(200.0, 150.0, 5.0))
    image.image_index, image.image_series_index, image.slice = 3, 7, 1
    image.meta = {
        "GADGETRON_DataRole": "Image",
        "GADGETRON_ImageComment": "semrecon sense+none",
        "WindowCenter": "5",
    }
    return image


def _waveform(seed: int = 2):
    waveform = ismrmrd.Waveform.from_array(np.random.default_rng(seed).integers(0, 2**31, (2, 5), dtype=np.uint32))
    waveform.waveform_id, waveform.time_stamp = 4, 1234
    return waveform


def _image_array(with_waveform: bool):
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((16, 12, 1, 1, 1, 1, 2)) + 0j).astype(np.complex64)
    headers = np.empty((1, 1, 2), dtype=object)
    for index in np.ndindex(headers.shape):
        head = ismrmrd.ImageHeader()
        head.slice, head.image_index = index[2], index[2] + 1
        headers[index] = head
    acq_headers = np.empty((12, 1, 1, 1, 2), dtype=object)
    for index in np.ndindex(acq_headers.shape):
        acq_headers[index] = ismrmrd.AcquisitionHeader()
        acq_headers[index].scan_counter = index[0]
    meta = [ismrmrd.Meta({"GADGETRON_DataRole": "Image", "slice": str(i)}).serialize() for i in range(2)]
    waveform = [_waveform(4), _waveform(5)] if with_waveform else None
    return ImageArray(data=data, headers=headers, meta=meta, waveform=waveform, acq_headers=acq_headers)


# --------------------------------------------------------------------------------------- framing


def test_message_ids_match_gadgetron() -> None:
    assert MessageId.CONFIG == constants.GADGET_MESSAGE_CONFIG
    assert MessageId.HEADER == constants.GADGET_MESSAGE_HEADER
    assert MessageId.CLOSE == constants.GADGET_MESSAGE_CLOSE
    assert MessageId.ERROR == constants.GADGET_MESSAGE_ERROR
    assert MessageId.ACQUISITION == constants.GADGET_MESSAGE_ISMRMRD_ACQUISITION
    assert MessageId.IMAGE == constants.GADGET_MESSAGE_ISMRMRD_IMAGE
    assert MessageId.RECON_DATA == constants.GADGET_MESSAGE_RECON_DATA
    assert MessageId.IMAGE_ARRAY == constants.GADGET_MESSAGE_IMAGE_ARRAY
    assert MessageId.WAVEFORM == constants.GADGET_MESSAGE_ISMRMRD_WAVEFORM
    assert MessageId.BUCKET == constants.GADGET_MESSAGE_BUCKET


def test_control_messages_bytes_and_round_trip() -> None:
    out = io.BytesIO()
    protocol.write_config(out, "<configuration/>")
    protocol.write_header(out, HEADER_XML)
    protocol.write_error(out, "bad buffer")
    protocol.write_close(out)
    raw = out.getvalue()
    assert raw[:22] == struct.pack("<HI", 2, 16) + b"<configuration/>"
    assert raw[-2:] == struct.pack("<H", 4)
    assert struct.pack("<HQ", 8, 10) + b"bad buffer" in raw
    source = io.BytesIO(raw)
    assert protocol.read_message(source) == (MessageId.CONFIG, "<configuration/>")
    assert protocol.read_message(source) == (MessageId.HEADER, HEADER_XML)
    assert protocol.read_message(source) == (MessageId.ERROR, "bad buffer")
    assert protocol.read_message(source) == (MessageId.CLOSE, None)
    # gadgetron's reader reads the CONFIG/HEADER strings the same way
    source = io.BytesIO(raw[2:])
    assert readers.read_byte_string(source) == b"<configuration/>"


def test_config_image_and_close_match_ismrmrd_protocol_serializer() -> None:
    from ismrmrd.serialization import ConfigText, ProtocolSerializer

    image = _image()
    theirs = io.BytesIO()
    serializer = ProtocolSerializer(theirs)
    serializer.serialize(ConfigText("<configuration/>"))
    serializer.serialize(image)
    serializer.close()  # writes CLOSE
    ours = io.BytesIO()
    protocol.write_config(ours, "<configuration/>")
    protocol.write_image(ours, image)
    protocol.write_close(ours)
    assert ours.getvalue() == theirs.getvalue()


def test_recon_data_bytes_match_the_specification_and_gadgetron() -> None:
    recon_data = _recon_data()
    ours = io.BytesIO()
    protocol.write_recon_data(ours, recon_data)
    expected = struct.pack("<HQ", 1023, 2)
    for bit in recon_data.bits:
        expected += _expected_buffer_bytes(bit.data) + struct.pack("<?", bit.ref is not None)
        if bit.ref is not None:
            expected += _expected_buffer_bytes(bit.ref)
    assert ours.getvalue() == expected
    # gadgetron's own reader parses our bytes into the same objects
    _assert_recon_data_equal(read_recon_data(io.BytesIO(expected[2:])), recon_data)
    # and our reader parses them back
    mid, parsed = protocol.read_message(io.BytesIO(expected))
    assert mid is MessageId.RECON_DATA
    _assert_recon_data_equal(parsed, recon_data)
    assert parsed.bits[1].ref is None and parsed.bits[0].data.data.flags.writeable


def test_recon_data_casts_other_dtypes_like_complex64() -> None:
    recon_data = _recon_data()
    as_complex64 = io.BytesIO()
    protocol.write_recon_data(as_complex64, recon_data)
    for bit in recon_data.bits:
        bit.data.data = bit.data.data.astype(np.complex128)  # what gadgetron 1.4.1 fails on under numpy 2
    cast = io.BytesIO()
    protocol.write_recon_data(cast, recon_data)
    assert cast.getvalue() == as_complex64.getvalue()


def test_recon_data_rejects_a_buffer_that_is_not_7d() -> None:
    recon_data = _recon_data()
    recon_data.bits[0].data.data = recon_data.bits[0].data.data[..., 0]
    with pytest.raises(ValueError, match=r"ReconBuffer.data: expected a 7-D array .* found 6-D"):
        protocol.write_recon_data(io.BytesIO(), recon_data)


def test_image_with_meta_round_trip() -> None:
    image = _image()
    ours = io.BytesIO()
    protocol.write_image(ours, image)
    raw = ours.getvalue()
    attributes = image.attribute_string.encode()
    assert raw[:2] == struct.pack("<H", 1022)
    assert raw[2:200] == bytes(image.getHead())
    assert raw[200:208] == struct.pack("<Q", len(attributes)) and raw[208 : 208 + len(attributes)] == attributes
    assert raw[208 + len(attributes) :] == image.data.astype("<f4").tobytes()
    for parsed in (readers.read_image(io.BytesIO(raw[2:])), protocol.read_message(io.BytesIO(raw))[1]):
        assert np.array_equal(parsed.data, image.data)
        assert parsed.meta["GADGETRON_ImageComment"] == "semrecon sense+none"
        assert (parsed.image_index, parsed.image_series_index, parsed.slice) == (3, 7, 1)


def test_acquisition_and_waveform_round_trip() -> None:
    acquisition = ismrmrd.Acquisition.from_array(np.random.default_rng(0).standard_normal((3, 16)).astype(np.complex64))
    acquisition.idx.kspace_encode_step_1 = 5
    out = io.BytesIO()
    protocol.write_item(out, acquisition)
    protocol.write_item(out, _waveform())
    source = io.BytesIO(out.getvalue())
    mid, parsed = protocol.read_message(source)
    assert mid is MessageId.ACQUISITION and parsed.idx.kspace_encode_step_1 == 5
    assert np.array_equal(parsed.data, acquisition.data)
    mid, parsed = protocol.read_message(source)
    assert mid is MessageId.WAVEFORM and np.array_equal(parsed.data, _waveform().data)
    with pytest.raises(TypeError, match="no Gadgetron message type for an object of type dict"):
        protocol.write_item(io.BytesIO(), {})


@pytest.mark.parametrize("with_waveform", [False, True])
def test_image_array_is_read_by_gadgetron(with_waveform: bool) -> None:
    array = _image_array(with_waveform)
    ours = io.BytesIO()
    protocol.write_image_array(ours, array)
    raw = ours.getvalue()
    for parsed in (read_image_array(io.BytesIO(raw[2:])), protocol.read_message(io.BytesIO(raw))[1]):
        assert np.array_equal(parsed.data, array.data)
        assert [bytes(h) for h in parsed.headers.flat] == [bytes(h) for h in array.headers.flat]
        assert parsed.meta == array.meta
        assert [bytes(h) for h in parsed.acq_headers.flat] == [bytes(h) for h in array.acq_headers.flat]
        if with_waveform:
            assert [w.waveform_id for w in parsed.waveform] == [4, 4]
            assert all(np.array_equal(p.data, w.data) for p, w in zip(parsed.waveform, array.waveform, strict=True))
        else:
            assert parsed.waveform is None


def test_unknown_message_id_and_truncated_stream_are_named() -> None:
    with pytest.raises(protocol.ProtocolError, match="unknown Gadgetron message id 77"):
        protocol.read_message(io.BytesIO(struct.pack("<H", 77)))
    out = io.BytesIO()
    protocol.write_recon_data(out, _recon_data())
    with pytest.raises(ConnectionError, match="stream ended in the middle of a message"):
        protocol.read_message(io.BytesIO(out.getvalue()[:-100]))
    with pytest.raises(protocol.ProtocolError, match="30 dimensions is not plausible"):
        protocol.read_ndarray(io.BytesIO(struct.pack("<Q", 30)), np.complex64)
    huge = struct.pack("<4Q", 3, 1 << 20, 1 << 20, 1 << 20)
    with pytest.raises(protocol.ProtocolError, match=r"array of dims \[1048576, 1048576, 1048576\]"):
        protocol.read_ndarray(io.BytesIO(huge), np.complex64)


def test_socket_stream_raises_on_end_of_stream_instead_of_spinning() -> None:
    left, right = socket.socketpair()
    stream = protocol.SocketStream(left, timeout=5.0)
    right.sendall(b"\x01\x02\x03")
    right.close()
    start = time.process_time()
    with pytest.raises(ConnectionError, match="got 3 of 8 bytes"):
        stream.read(8)
    assert time.process_time() - start < 1.0
    stream.close()


def test_socket_stream_times_out_on_a_silent_peer() -> None:
    left, right = socket.socketpair()
    stream = protocol.SocketStream(left, timeout=0.2)
    with pytest.raises(TimeoutError):
        stream.read(2)
    stream.close()
    right.close()


# ------------------------------------------------------------------------------------- workarounds


def test_compat_fixes_gadgetron_writers_and_socket_read() -> None:
    from gadgetron.external.connection import Connection
    from gadgetron.types import image_array, recon_data

    compat.install()
    compat.install()  # idempotent
    assert compat.installed()
    # (1) gadgetron's ReconData writer now casts and produces our bytes
    data = _recon_data()
    ours = io.BytesIO()
    protocol.write_recon_data(ours, data)
    for bit in data.bits:
        bit.data.data = bit.data.data.astype(np.complex128)
    theirs = io.BytesIO()
    recon_data.write_recon_data(theirs, data)
    assert theirs.getvalue() == ours.getvalue()
    # (2) gadgetron's ImageArray writer frames waveforms as its reader (and Gadgetron's C++) expects
    array = _image_array(with_waveform=True)
    theirs = io.BytesIO()
    image_array.write_image_array(theirs, array)
    ours = io.BytesIO()
    protocol.write_image_array(ours, array)
    assert theirs.getvalue() == ours.getvalue()
    # (3) the connection's read raises on a vanished peer
    left, right = socket.socketpair()
    wrapper = Connection.SocketWrapper(left)
    right.close()
    with pytest.raises(ConnectionError, match="Gadgetron closed the connection"):
        wrapper.read(2)
    wrapper.close()  # sending CLOSE to a vanished peer does not raise


def test_compat_reads_bucket_waveforms() -> None:
    from gadgetron.types.acquisition_bucket import bucket_meta

    waveform = _waveform()
    meta = bucket_meta()
    meta.waveforms.count = 1
    meta.waveforms.header_bytes = 40
    empty_stats = struct.pack("<Q", 0)
    raw = bytes(meta) + empty_stats + empty_stats + bytes(waveform.getHead()) + waveform.data.tobytes()
    mid, bucket = protocol.read_message(io.BytesIO(struct.pack("<H", 1050) + raw))
    assert mid is MessageId.BUCKET and bucket.data == [] and len(bucket.waveforms) == 1
    assert bucket.waveforms[0].waveform_id == 4 and np.array_equal(bucket.waveforms[0].data, waveform.data)


# --------------------------------------------------------------------------------------- emulator


@pytest.fixture()
def gadget_dir(tmp_path: Path) -> Path:
    (tmp_path / "semrecon_test_gadgets.py").write_text(PASS_THROUGH)
    (tmp_path / "semrecon_unpatched_gadget.py").write_text(UNPATCHED)
    return tmp_path


def test_emulator_round_trip_through_python_m_gadgetron(gadget_dir: Path) -> None:
    recon_data = _recon_data()
    image = _image()
    run = emulator.run_external(
        "<configuration><property name='a' value='1'/></configuration>",
        HEADER_XML,
        [recon_data, image, _image_array(with_waveform=False)],
        module="semrecon_test_gadgets",
        target="passthrough",
        gadget_path=[gadget_dir],
        timeout=60,
    )
    assert run.returncode == 0 and run.errors == []
    assert [type(item).__name__ for item in run.items] == ["ReconData", "Image", "ImageArray"]
    _assert_recon_data_equal(run.items[0], recon_data)
    assert np.array_equal(run.images[0].data, image.data)
    assert run.images[0].meta["GADGETRON_DataRole"] == "Image"


def test_emulator_reports_a_failing_gadget_with_its_log(gadget_dir: Path) -> None:
    with pytest.raises(emulator.EmulatorError, match="deliberate failure in the test gadget"):
        emulator.run_external(
            "<configuration/>",
            HEADER_XML,
            [_image()],
            module="semrecon_test_gadgets",
            target="failing",
            gadget_path=[gadget_dir],
            timeout=60,
        )


def test_emulator_stops_sending_after_an_error_like_gadgetron(gadget_dir: Path) -> None:
    sent: list[int] = []

    def slow_images():
        for number in range(20):
            sent.append(number)
            yield _image(number)
            time.sleep(0.1)

    run = emulator.run_external(
        "<configuration/>",
        HEADER_XML,
        slow_images(),
        module="semrecon_test_gadgets",
        target="erroring",
        gadget_path=[gadget_dir],
        timeout=60,
    )
    assert run.errors == ["cannot reconstruct this scan"]
    # the item pulled when the ERROR was noticed is not sent
    assert 1 <= len(run.images) <= len(sent) <= len(run.images) + 1 < 20, "data kept flowing after the ERROR"


def test_emulator_names_a_module_that_does_not_import(gadget_dir: Path) -> None:
    with pytest.raises(emulator.EmulatorError, match="No module named 'no_such_gadget'"):
        emulator.run_external(
            "<configuration/>",
            HEADER_XML,
            [],
            module="no_such_gadget",
            target="x",
            gadget_path=[gadget_dir],
            timeout=30,
        )


# ------------------------------------------------------------------------------ Gadgetron dies mid-stream


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _die_mid_stream(module: str, target: str, gadget_path: list[Path]) -> tuple[float | None, float]:
    """Launch, send CONFIG + HEADER, close the socket: (seconds until exit or None, CPU s after close)."""
    with emulator.GadgetProcess(module, target, gadget_path=gadget_path) as gadget:
        sock = gadget.accept(timeout=60)
        stream = protocol.SocketStream(sock)
        protocol.write_config(stream, "<configuration/>")
        protocol.write_header(stream, HEADER_XML)
        time.sleep(1.0)  # the child has read CONFIG + HEADER, imported the module and waits for data
        cpu_before = _cpu_seconds(gadget.pid)
        sock.close()
        closed = time.monotonic()
        exited = None
        while time.monotonic() - closed < 5.0:
            if _state(gadget.pid) == "Z":  # exited, not yet reaped: its CPU time is final
                exited = time.monotonic() - closed
                break
            time.sleep(0.05)
        cpu_after = _cpu_seconds(gadget.pid) - cpu_before
    return exited, cpu_after


def test_gadget_exits_when_gadgetron_closes_the_socket(gadget_dir: Path) -> None:
    exited, cpu = _die_mid_stream("semrecon_test_gadgets", "passthrough", [gadget_dir])
    assert exited is not None and exited < 5.0, "the gadget did not exit within 5 s of Gadgetron going away"
    assert cpu < 0.5, f"the gadget used {cpu:.1f} s of CPU after the socket closed"


def test_unpatched_gadgetron_python_spins(gadget_dir: Path) -> None:
    """The defect the workaround exists for: without it the child spins at 100 % CPU and never exits."""
    exited, cpu = _die_mid_stream("semrecon_unpatched_gadget", "passthrough", [gadget_dir])
    assert exited is None and cpu > 0.5  # up to 5 s of a busy loop (less on a loaded machine)


def test_semrecon_gadget_exits_when_gadgetron_closes_the_socket() -> None:
    if not (REPO / "gadgets" / "semrecon_gadget.py").is_file():
        pytest.skip("gadgets/semrecon_gadget.py is not in this checkout")
    exited, cpu = _die_mid_stream("semrecon_gadget", "reconstruct", [REPO / "gadgets"])
    assert exited is not None and exited < 5.0
    assert cpu < 1.0


def test_listener_binds_loopback_only() -> None:
    with emulator.GadgetProcess("semrecon_no_such_module", "x", gadget_path=[]) as gadget:
        assert gadget.listener.getsockname()[0] == "127.0.0.1"
    assert gadget.process.returncode is not None


def test_exchange_times_out_on_a_silent_gadget() -> None:
    left, right = socket.socketpair()
    start = time.monotonic()
    with pytest.raises(emulator.EmulatorError, match="silent for more than 1 s"):
        emulator.exchange(left, "<configuration/>", HEADER_XML, [], timeout=1.0)
    assert time.monotonic() - start < 5.0
    right.close()


# ------------------------------------------------------------------- the real gadget over the protocol


def test_semrecon_gadget_over_the_protocol_matches_in_process_replay(tmp_path: Path) -> None:
    """Shepp-Logan raw file (noise scan, 2x readout oversampling, R=2, 16 ACS lines, 2 interleaved
    repetitions) → chain equivalents → ReconData → the gadget launched as ``python -m gadgetron``."""

    import h5py

    from semrecon_core.gadgetron.replay import replay
    from tests.conftest import shepp_logan_raw

    path = shepp_logan_raw(tmp_path / "phantom.h5", matrix=32, coils=4, acs=16, repetitions=1)
    in_process = replay(path)
    over_protocol = replay(path, protocol=True)
    assert len(in_process.images) == len(over_protocol.images) == 2
    with h5py.File(path, "r") as raw:
        phantom = raw["dataset/phantom"][()]
    truth = np.abs(phantom["real"] + 1j * phantom["imag"]).squeeze()
    for number, (local, remote) in enumerate(zip(in_process.images, over_protocol.images, strict=True)):
        assert np.array_equal(local.data, remote.data), "pixels differ between in-process and protocol replay"
        assert bytes(local.getHead()) == bytes(remote.getHead())
        assert local.meta["GADGETRON_ImageComment"] == remote.meta["GADGETRON_ImageComment"]
        assert "CG-SENSE" in remote.meta["GADGETRON_ImageComment"]
        assert remote.image_index == number + 1 and remote.repetition == number
        assert tuple(remote.matrix_size) == (32, 32, 1)
        image = remote.data.squeeze()
        psnr = 10 * np.log10(1.0 / np.mean((truth / truth.max() - image / image.max()) ** 2))
        assert psnr > 18.0, f"PSNR {psnr:.1f} dB against the stored phantom (measured 21.7-21.9 dB)"


def test_emulator_ends_the_session_when_the_messages_fail(gadget_dir: Path) -> None:
    def broken():
        yield _image()
        raise ValueError("chain stage failed")

    start = time.monotonic()
    with pytest.raises(ValueError, match="chain stage failed"):
        emulator.run_external(
            "<configuration/>",
            HEADER_XML,
            broken(),
            module="semrecon_test_gadgets",
            target="passthrough",
            gadget_path=[gadget_dir],
            timeout=60,
        )
    assert time.monotonic() - start < 30


def test_fast_readers_on_a_gadgetron_connection() -> None:
    import warnings

    from gadgetron.external.connection import Connection

    compat.install()
    recon_data, array = _recon_data(), _image_array(with_waveform=True)
    left, right = socket.socketpair()
    stream = protocol.SocketStream(right)
    protocol.write_config(stream, "<configuration/>")
    protocol.write_header(stream, HEADER_XML)
    protocol.write_recon_data(stream, recon_data)
    protocol.write_image_array(stream, array)
    protocol.write_close(stream)
    connection = Connection(left)
    compat.use_fast_readers(connection)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(connection)
    assert [type(item).__name__ for item in items] == ["ReconData", "ImageArray"]
    _assert_recon_data_equal(items[0], recon_data)
    assert np.array_equal(items[1].data, array.data) and items[1].meta == array.meta
    assert not [w for w in caught if "PEP3118" in str(w.message)]
    left.close()
    right.close()
