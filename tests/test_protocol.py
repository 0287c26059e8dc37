"""The emulator's side of the Gadgetron wire (framed by ``ismrmrd.serialization`` and gadgetron-python with
semrecon's fixes) against the wire layout of REFERENCE.md §3, the fixes themselves, the Gadgetron-side
emulator launching ``python -m gadgetron``, and gadgets whose Gadgetron dies."""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from gadgetron.external import constants  # noqa: E402
from gadgetron.types.image_array import ImageArray  # noqa: E402
from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription  # noqa: E402

from semrecon_core.emulation import emulator, wire  # noqa: E402
from semrecon_core.gadgetron import compat  # noqa: E402
from tests.helpers import cpu_seconds, process_exited, wait_until_idle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

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

# Test-only gadget modules, written into a temporary gadget directory. They install the fixes on import, as
# gadgets/semrecon_gadget.py does.
TEST_GADGETS = textwrap.dedent(
    """
    from gadgetron.external import constants, writers

    from semrecon_core.gadgetron import compat

    compat.install()


    def passthrough(connection):
        for item in connection:
            connection.send(item)


    def failing(connection):
        for _ in connection:
            raise RuntimeError("deliberate failure in the test gadget")


    def erroring(connection):
        for number, item in enumerate(connection):
            if number == 0:
                connection.socket.write(constants.GadgetMessageIdentifier.pack(constants.GADGET_MESSAGE_ERROR))
                writers.write_byte_string(connection.socket, b"cannot reconstruct this scan", constants.uint64)
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


def _written(*items) -> bytes:
    out = io.BytesIO()
    for item in items:
        wire.write_item(out, item)
    return out.getvalue()


# --------------------------------------------------------------------------------------- framing


def test_a_gadgetron_connection_reads_the_emulator_session() -> None:
    """What the emulator sends is what gadgetron-python's Connection (with the fixes) reads, unchanged."""
    from gadgetron.external.connection import Connection

    configuration = "<configuration><property name='a' value='1'/></configuration>"
    recon_data, array, image = _recon_data(), _image_array(with_waveform=True), _image()
    acquisition = ismrmrd.Acquisition.from_array(np.ones((3, 16), np.complex64))
    left, right = socket.socketpair()
    stream = wire.SocketStream(right)
    wire.write_config(stream, configuration)
    wire.write_header(stream, HEADER_XML)
    for item in (recon_data, array, image, acquisition, _waveform()):
        wire.write_item(stream, item)
    wire.write_close(stream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        connection = Connection(left)
        items = list(connection)
    assert connection.raw_bytes.config == configuration.encode()  # CONFIG is verbatim
    assert connection.header.encoding[0].encodedSpace.matrixSize.y == 12
    assert [type(item).__name__ for item in items] == ["ReconData", "ImageArray", "Image", "Acquisition", "Waveform"]
    _assert_recon_data_equal(items[0], recon_data)
    assert items[0].bits[0].data.data.flags.writeable
    assert np.array_equal(items[1].data, array.data) and items[1].meta == array.meta
    assert items[2].meta["GADGETRON_ImageComment"] == "semrecon sense+none"
    assert np.array_equal(items[3].data, acquisition.data) and np.array_equal(items[4].data, _waveform().data)
    assert not [w for w in caught if "PEP3118" in str(w.message)]
    left.close()
    right.close()


def test_recon_data_bytes_match_the_specification() -> None:
    recon_data = _recon_data()
    expected = struct.pack("<HQ", 1023, 2)
    for bit in recon_data.bits:
        expected += _expected_buffer_bytes(bit.data) + struct.pack("<?", bit.ref is not None)
        if bit.ref is not None:
            expected += _expected_buffer_bytes(bit.ref)
    assert _written(recon_data) == expected
    mid, parsed = wire.read_message(io.BytesIO(expected))
    assert mid == constants.GADGET_MESSAGE_RECON_DATA
    _assert_recon_data_equal(parsed, recon_data)
    assert parsed.bits[1].ref is None and parsed.bits[0].data.data.flags.writeable


def test_recon_data_casts_other_dtypes_like_complex64() -> None:
    recon_data = _recon_data()
    as_complex64 = _written(recon_data)
    for bit in recon_data.bits:
        bit.data.data = bit.data.data.astype(np.complex128)  # what gadgetron 1.4.1 fails on under numpy 2
    assert _written(recon_data) == as_complex64


@pytest.mark.parametrize("with_waveform", [False, True])
def test_image_array_round_trip_with_waveforms_framed_as_gadgetron_reads_them(with_waveform: bool) -> None:
    array = _image_array(with_waveform)
    raw = _written(array)
    if with_waveform:  # count, then header + samples per waveform, no message id in between
        first = array.waveform[0]
        assert struct.pack("<?Q", True, 2) + bytes(first.getHead()) + first.data.tobytes() in raw
    mid, parsed = wire.read_message(io.BytesIO(raw))
    assert mid == constants.GADGET_MESSAGE_IMAGE_ARRAY
    assert np.array_equal(parsed.data, array.data)
    assert [bytes(h) for h in parsed.headers.flat] == [bytes(h) for h in array.headers.flat]
    assert parsed.meta == array.meta
    assert [bytes(h) for h in parsed.acq_headers.flat] == [bytes(h) for h in array.acq_headers.flat]
    if with_waveform:
        assert [w.waveform_id for w in parsed.waveform] == [4, 4]
        assert all(np.array_equal(p.data, w.data) for p, w in zip(parsed.waveform, array.waveform, strict=True))
    else:
        assert parsed.waveform is None


def test_messages_from_the_gadget_and_what_gadgetron_refuses() -> None:
    image = _image()
    source = io.BytesIO(_written(image) + struct.pack("<HQ", 8, 10) + b"bad buffer" + struct.pack("<H", 4))
    mid, parsed = wire.read_message(source)
    assert mid == constants.GADGET_MESSAGE_ISMRMRD_IMAGE and np.array_equal(parsed.data, image.data)
    assert parsed.meta["GADGETRON_ImageComment"] == "semrecon sense+none" and parsed.image_series_index == 7
    assert wire.read_message(source) == (constants.GADGET_MESSAGE_ERROR, "bad buffer")
    assert wire.read_message(source) == (constants.GADGET_MESSAGE_CLOSE, None)
    with pytest.raises(wire.ProtocolError, match=r"message id 2 \(GADGET_MESSAGE_CONFIG\)"):
        wire.read_message(io.BytesIO(struct.pack("<HI", 2, 0)))
    with pytest.raises(wire.ProtocolError, match="message id 77,"):
        wire.read_message(io.BytesIO(struct.pack("<H", 77)))
    with pytest.raises(ConnectionError, match="stream ended in the middle of a message"):
        wire.read_message(io.BytesIO(_written(_recon_data())[:-100]))
    with pytest.raises(TypeError, match="no Gadgetron message type for an object of type dict"):
        wire.write_item(io.BytesIO(), {})


def test_socket_stream_raises_on_end_of_stream_instead_of_spinning() -> None:
    left, right = socket.socketpair()
    stream = wire.SocketStream(left, timeout=5.0)
    right.sendall(b"\x01\x02\x03")
    right.close()
    start = time.process_time()
    with pytest.raises(ConnectionError, match="got 3 of 8 bytes"):
        stream.read(8)
    assert time.process_time() - start < 1.0
    stream.close()


def test_socket_stream_times_out_on_a_silent_peer() -> None:
    left, right = socket.socketpair()
    stream = wire.SocketStream(left, timeout=0.2)
    with pytest.raises(TimeoutError):
        stream.read(2)
    stream.close()
    right.close()


# ------------------------------------------------------------------------------------- workarounds


def test_compat_socket_read_raises_on_a_vanished_peer_and_close_does_not() -> None:
    from gadgetron.external.connection import Connection

    compat.install()
    compat.install()  # idempotent
    assert compat.installed()
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
    bucket = compat.read_acquisition_bucket(io.BytesIO(raw))
    assert bucket.data == [] and len(bucket.waveforms) == 1
    assert bucket.waveforms[0].waveform_id == 4 and np.array_equal(bucket.waveforms[0].data, waveform.data)


# --------------------------------------------------------------------------------------- emulator


@pytest.fixture
def gadget_dir(tmp_path: Path) -> Path:
    (tmp_path / "semrecon_test_gadgets.py").write_text(TEST_GADGETS)
    return tmp_path


def _run_test_gadget(gadget_dir: Path, target: str, messages, configuration: str = "<configuration/>"):
    return emulator.run_external(
        configuration,
        HEADER_XML,
        messages,
        module="semrecon_test_gadgets",
        target=target,
        gadget_path=[gadget_dir],
        timeout=60,
    )


def test_emulator_round_trip_through_python_m_gadgetron(gadget_dir: Path) -> None:
    recon_data, image = _recon_data(), _image()
    configuration = "<configuration><property name='a' value='1'/></configuration>"
    run = _run_test_gadget(gadget_dir, "passthrough", [recon_data, image, _image_array(False)], configuration)
    assert run.returncode == 0 and run.errors == []
    assert [type(item).__name__ for item in run.items] == ["ReconData", "Image", "ImageArray"]
    _assert_recon_data_equal(run.items[0], recon_data)
    assert np.array_equal(run.images[0].data, image.data)
    assert run.images[0].meta["GADGETRON_DataRole"] == "Image"


def test_emulator_reports_a_failing_gadget_with_its_log(gadget_dir: Path) -> None:
    with pytest.raises(emulator.EmulatorError, match="deliberate failure in the test gadget"):
        _run_test_gadget(gadget_dir, "failing", [_image()])


def test_emulator_stops_sending_after_an_error_like_gadgetron(gadget_dir: Path) -> None:
    sent: list[int] = []

    def slow_images():
        for number in range(20):
            sent.append(number)
            yield _image(number)
            time.sleep(0.1)

    run = _run_test_gadget(gadget_dir, "erroring", slow_images())
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


def test_emulator_ends_the_session_when_the_messages_fail(gadget_dir: Path) -> None:
    def broken():
        yield _image()
        raise ValueError("chain stage failed")

    start = time.monotonic()
    with pytest.raises(ValueError, match="chain stage failed"):
        _run_test_gadget(gadget_dir, "passthrough", broken())
    assert time.monotonic() - start < 30


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


# ------------------------------------------------------------------------------ Gadgetron dies mid-stream


def _die_mid_stream(module: str, target: str, gadget_path: list[Path], partial: bytes = b"") -> tuple[float, str]:
    """Launch, send CONFIG + HEADER (+ ``partial`` bytes of a message), close the socket once the gadget waits.

    Returns the seconds until the gadget exited and its log; fails if it does not exit within 5 s of the
    close or uses more than 1 s of CPU after it (ending a process with torch loaded takes about half of that;
    a gadget spinning on the closed socket takes all of it).
    """
    with emulator.GadgetProcess(module, target, gadget_path=gadget_path) as gadget:
        sock = gadget.accept(timeout=60)
        stream = wire.SocketStream(sock)
        wire.write_config(stream, "<configuration/>")
        wire.write_header(stream, HEADER_XML)
        stream.write(partial)
        stream.flush()
        wait_until_idle(gadget.pid)
        cpu_before = cpu_seconds(gadget.pid)
        sock.close()
        closed = time.monotonic()
        while not process_exited(gadget.pid):
            assert time.monotonic() - closed < 5.0, "the gadget did not exit within 5 s of Gadgetron going away"
            time.sleep(0.05)
        exited = time.monotonic() - closed
        cpu = cpu_seconds(gadget.pid) - cpu_before
        assert cpu < 1.0, f"the gadget used {cpu:.1f} s of CPU after the socket closed"
        gadget.stop()
        return exited, gadget.log()


def test_gadget_exits_when_gadgetron_closes_the_socket(gadget_dir: Path) -> None:
    _, log = _die_mid_stream("semrecon_test_gadgets", "passthrough", [gadget_dir])
    assert "Gadgetron closed the connection" in log


def _semrecon_gadget_dir() -> Path:
    if not (REPO / "gadgets" / "semrecon_gadget.py").is_file():
        pytest.skip("gadgets/semrecon_gadget.py is not in this checkout")
    return REPO / "gadgets"


def test_semrecon_gadget_exits_when_gadgetron_closes_the_socket() -> None:
    _, log = _die_mid_stream("semrecon_gadget", "reconstruct", [_semrecon_gadget_dir()])
    assert "Gadgetron closed the connection" in log


def test_semrecon_gadget_exits_when_gadgetron_dies_in_the_middle_of_a_buffer() -> None:
    message = _written(_recon_data())
    _, log = _die_mid_stream("semrecon_gadget", "reconstruct", [_semrecon_gadget_dir()], message[: len(message) // 2])
    assert "in the middle of a message" in log and "ending the external Python process" in log


# ------------------------------------------------------------------------- claims, ids and the start-up hook


def _connection_on(raw: bytes):
    """A gadgetron-python Connection (fixes installed) reading ``raw`` from a socket pair; the other end closed."""
    from gadgetron.external.connection import Connection

    compat.install()
    left, right = socket.socketpair()
    right.sendall(raw)
    right.close()
    return Connection(left)


def _session(configuration: bytes = b"<configuration/>") -> bytes:
    out = io.BytesIO()
    wire.write_header(out, HEADER_XML)
    return struct.pack("<HI", 2, len(configuration)) + configuration + out.getvalue()


def test_compat_refuses_oversized_config_and_header_claims_and_a_wrong_first_message() -> None:
    with pytest.raises(compat.BadMessage, match=r"CONFIG claims 4\.0 GiB \(4294967295 bytes\); at most 16\.0 MiB"):
        _connection_on(struct.pack("<HI", 2, 2**32 - 1))
    header_claim = _session()[: 6 + len(b"<configuration/>")] + struct.pack("<HI", 3, 2**31)
    with pytest.raises(compat.BadMessage, match=r"HEADER claims 2\.0 GiB .* at most 64\.0 MiB"):
        _connection_on(header_claim)
    with pytest.raises(compat.BadMessage, match=r"expected CONFIG \(id 2\) .* got id 1023 \(ReconData\)"):
        _connection_on(struct.pack("<H", 1023))
    with pytest.raises(compat.BadMessage, match="the HEADER is not an ISMRMRD header"):
        _connection_on(struct.pack("<HI", 2, 0) + struct.pack("<HI", 3, 5) + b"<oops")
    with pytest.raises(ConnectionError, match=r"Gadgetron closed the connection .*while reading the CONFIG"):
        _connection_on(struct.pack("<HI", 2, 100) + b"<configuration")


def test_compat_names_an_unknown_message_id_instead_of_ending_the_scan() -> None:
    connection = _connection_on(_session() + struct.pack("<H", 1234) + b"\0" * 8)
    with pytest.raises(compat.BadMessage, match=r"message id 1234, which the gadget cannot read"):
        list(connection)


def test_compat_refuses_recon_data_claims_naming_the_field() -> None:
    limit, origin = compat.memory_limit()
    dims = (4096, 4096, 1024, 16, 1, 1, 1)  # 2 TiB of complex64
    huge = struct.pack("<HQQ7Q", 1023, 1, 7, *dims)
    with pytest.raises(compat.BadMessage) as caught:
        list(_connection_on(_session() + huge))
    text = str(caught.value)
    assert text.startswith("ReconData bit 0 data: dims [4096, 4096, 1024, 16, 1, 1, 1] of complex64 claims 2.0 TiB")
    assert f"at most {compat.format_bytes(limit)} ({origin}) is allowed" in text
    with pytest.raises(compat.BadMessage, match="ReconData bit 0 data: claims 1000 dimensions; at most 16"):
        list(_connection_on(_session() + struct.pack("<HQQ", 1023, 1, 1000)))
    with pytest.raises(compat.BadMessage, match=r"ReconData: claims 1099511627776 bits"):
        list(_connection_on(_session() + struct.pack("<HQ", 1023, 2**40)))
    # the reference buffer and the header array of a valid first buffer are named too
    recon_data = _recon_data()
    ref_at = 2 + 8 + len(_expected_buffer_bytes(recon_data.bits[0].data))  # id, bit count, the first data buffer
    bad_ref = _written(recon_data)[:ref_at] + struct.pack("<?Q7Q", True, 7, *dims)
    with pytest.raises(compat.BadMessage, match="ReconData bit 0 ref data: dims"):
        list(_connection_on(_session() + bad_ref))


def test_compat_image_claims_are_checked_before_allocating() -> None:
    image = _image()
    head = image.getHead()
    head.attribute_string_len = 2**62
    raw = struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", 2**62)
    with pytest.raises(compat.BadMessage, match=r"the Image message \(id 1022\) claims 4096\.0 PiB"):
        list(_connection_on(_session() + raw))


def test_compat_large_reads_grow_with_the_data_that_arrives() -> None:
    left, right = socket.socketpair()
    payload = bytes(range(256)) * (1 << 17)  # 32 MiB: two pieces
    sender = threading.Thread(target=right.sendall, args=(payload,))
    sender.start()
    assert compat.receive(left, len(payload)) == payload
    sender.join()
    right.sendall(b"x" * 100)
    right.close()
    with pytest.raises(ConnectionError, match=r"got at least 0 of 33554432 bytes"):
        compat.receive(left, 1 << 25)
    left.close()


def test_send_error_delivers_the_error_and_close_and_does_not_hang() -> None:
    left, right = socket.socketpair()
    start = time.monotonic()
    assert compat.send_error(left, "semrecon gadget: bad things", linger=0.5)  # the peer never closes
    assert time.monotonic() - start < 2.0
    stream = wire.SocketStream(right, timeout=2)
    assert wire.read_message(stream) == (constants.GADGET_MESSAGE_ERROR, "semrecon gadget: bad things")
    assert wire.read_message(stream) == (constants.GADGET_MESSAGE_CLOSE, None)
    right.close()
    gone_left, gone_right = socket.socketpair()
    gone_right.close()
    compat.send_error(gone_left, "nobody listens", linger=0.5)  # does not raise


def test_the_emulator_refuses_an_oversized_error_from_the_gadget() -> None:
    with pytest.raises(compat.BadMessage, match=r"an ERROR from the gadget claims 1\.0 GiB .* at most 16\.0 MiB"):
        wire.read_message(io.BytesIO(struct.pack("<HQ", 8, 1 << 30)))


def test_sitecustomize_hooks_semrecon_gadget_processes_only_and_runs_the_shadowed_one(tmp_path: Path) -> None:
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['SHADOWED_SITECUSTOMIZE_RAN'] = '1'\n")
    probe = (
        "import os, sys; from semrecon_core.gadgetron import compat; "
        "print(os.environ.get('SHADOWED_SITECUSTOMIZE_RAN'), compat.installed())"
    )
    env = emulator.child_environment([REPO / "gadgets", other])
    plain = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == ["1", "False"], "only gadget processes are patched"

    import importlib.util

    spec = importlib.util.spec_from_file_location("semrecon_sitecustomize", REPO / "gadgets" / "sitecustomize.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)  # in this process: not a gadget process, so it changes nothing
    cases = {
        ("python", "-m", "gadgetron", "9002", "semrecon_gadget", "reconstruct"): True,
        ("python", "-u", "-m", "gadgetron", "9002", "semrecon_gadget"): True,
        ("python", "-m", "gadgetron", "9002", "other_gadget", "run"): False,
        ("python", "-m", "gadgetron"): False,
        ("python", "-c", "pass"): False,
    }
    for argv, expected in cases.items():
        original = sys.orig_argv
        sys.orig_argv = list(argv)
        try:
            assert hook._semrecon_gadget_process() is expected, argv
        finally:
            sys.orig_argv = original
