"""Faults a scanner site meets on the Gadgetron side, with the gadget launched exactly as Gadgetron launches it
(``python -m gadgetron PORT semrecon_gadget reconstruct`` with ``gadgets/`` appended to ``PYTHONPATH``):
Gadgetron going away before the HEADER is complete, oversized claims, unknown messages, bad CONFIGs. Each
case ends with a message naming the problem (and an ERROR to Gadgetron when it still listens) and a non-zero
exit within 5 s; nothing spins or waits for data that never comes."""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from gadgetron.external import constants  # noqa: E402

from semrecon_core.emulation import emulator, wire  # noqa: E402
from tests.helpers import cpu_seconds, process_exited, read_ismrmrd_scan, read_replies, wait_until_idle  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")

GADGETS = Path(__file__).resolve().parents[1] / "gadgets"
CONFIGURATION = "<configuration><property name='backbone' value='zero-filled'/></configuration>"
# Exit statuses of the gadget process (README, "Gadgetron"): refused with an ERROR, Gadgetron went away.
REFUSED, GONE = 2, 3
EXIT_WITHIN = 5.0


@pytest.fixture(scope="module")
def scan(shepp_logan_raw) -> tuple[str, list]:
    """A small Shepp-Logan raw file (4 coils, 32², R=2, 16 ACS lines) as ``(xml header, [ReconData])``."""
    return read_ismrmrd_scan(shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1))


# ------------------------------------------------------------------------------------------- helpers


def _text_message(mid: int, body: bytes, claimed: int | None = None) -> bytes:
    """CONFIG / HEADER framing: ``uint16`` id, ``uint32`` length (``claimed`` if given), body."""
    return struct.pack("<HI", mid, len(body) if claimed is None else claimed) + body


def _config(text: str | bytes = CONFIGURATION) -> bytes:
    return _text_message(constants.GADGET_MESSAGE_CONFIG, text.encode() if isinstance(text, str) else text)


def _header(header_xml: str) -> bytes:
    out = _Buffer()
    wire.write_header(out, header_xml)
    return bytes(out.data)


class _Buffer:
    """A write-only stream collecting what the wire writers produce."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += memoryview(data).cast("B")


def _message(item) -> bytes:
    out = _Buffer()
    wire.write_item(out, item)
    return bytes(out.data)


def _exit_status(gadget: emulator.GadgetProcess, since: float, within: float = EXIT_WITHIN) -> int:
    """The child's exit status; fails if it is still running ``within`` s after ``since`` (monotonic)."""
    while not process_exited(gadget.pid):
        assert time.monotonic() - since < within, (
            f"the gadget was still running {within:.0f} s later "
            f"(CPU {cpu_seconds(gadget.pid):.1f} s)\n--- gadget log ---\n{gadget.log()}"
        )
        time.sleep(0.05)
    gadget.cpu_at_exit = cpu_seconds(gadget.pid)  # type: ignore[attr-defined]
    return gadget.stop()


def _launch() -> emulator.GadgetProcess:
    return emulator.GadgetProcess("semrecon_gadget", "reconstruct", gadget_path=[GADGETS])


# ------------------------------------------------------------- Gadgetron goes away before the HEADER


def _before_header(scan_header: str) -> dict[str, bytes]:
    whole_config = _config()
    return {
        "nothing at all": b"",
        "half a message id": whole_config[:1],
        "partial CONFIG": whole_config[: len(whole_config) // 2],
        "partial HEADER": whole_config + _header(scan_header)[:40],
        "CONFIG claiming 4 GiB": _text_message(constants.GADGET_MESSAGE_CONFIG, b"<config", claimed=2**32 - 1),
    }


@pytest.mark.parametrize(
    "case", ["nothing at all", "half a message id", "partial CONFIG", "partial HEADER", "CONFIG claiming 4 GiB"]
)
def test_gadget_exits_when_gadgetron_goes_away_before_the_header(scan, case: str) -> None:
    header, _ = scan
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_before_header(header)[case])
        time.sleep(0.2)  # the gadget reads what there is and waits for the rest
        cpu_before = cpu_seconds(gadget.pid)
        sock.close()
        status = _exit_status(gadget, time.monotonic())
        log = gadget.log()
    assert gadget.cpu_at_exit - cpu_before < 1.0, "the gadget spun after Gadgetron went away"
    assert status in (GONE, REFUSED), f"exit status {status}\n{log}"
    if case == "CONFIG claiming 4 GiB":
        assert "CONFIG" in log and "4.0 GiB" in log
    else:
        assert "Gadgetron closed the connection" in log, log
    assert "Traceback" not in log, log


def test_config_claiming_4_gib_is_refused_with_an_error_while_gadgetron_listens() -> None:
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_text_message(constants.GADGET_MESSAGE_CONFIG, b"<configuration/>", claimed=2**32 - 1))
        sent = time.monotonic()
        _, errors = read_replies(sock, timeout=EXIT_WITHIN)  # Gadgetron stays connected and says nothing more
        status = _exit_status(gadget, sent)
        sock.close()
    assert status == REFUSED
    assert len(errors) == 1 and "CONFIG" in errors[0], errors
    assert "4.0 GiB" in errors[0] and "16.0 MiB" in errors[0], errors[0]


def test_a_first_message_other_than_config_is_refused_naming_it(scan) -> None:
    header, _ = scan
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_header(header))
        sent = time.monotonic()
        _, errors = read_replies(sock, timeout=EXIT_WITHIN)
        status = _exit_status(gadget, sent)
        sock.close()
    assert status == REFUSED
    assert len(errors) == 1 and "expected CONFIG" in errors[0] and "id 3 (HEADER)" in errors[0], errors


# ------------------------------------------------------------------------- after the HEADER


def _loaded(gadget: emulator.GadgetProcess, header: str, config: bytes | None = None) -> socket.socket:
    """Accept the child, send CONFIG + HEADER and wait until it has imported the gadget and waits for data."""
    sock = gadget.accept(timeout=60)
    sock.sendall((_config() if config is None else config) + _header(header))
    wait_until_idle(gadget.pid)
    return sock


def test_unknown_message_id_is_an_error_naming_it(scan) -> None:
    header, buffers = scan
    good = _message(buffers[0])
    with _launch() as gadget:
        sock = _loaded(gadget, header)
        sock.sendall(good + struct.pack("<H", 1234) + b"\0" * 64 + good + struct.pack("<H", 4))
        sent = time.monotonic()
        items, errors = read_replies(sock, timeout=60)
        status = _exit_status(gadget, sent, within=60)
        sock.close()
        log = gadget.log()
    assert status == REFUSED, log
    assert len(errors) == 1 and "message id 1234" in errors[0], errors
    assert "message id 1234" in log
    assert len([item for item in items if isinstance(item, ismrmrd.Image)]) == 1, "the first buffer gets its image"


def test_recon_data_claiming_2_tib_is_refused_before_allocating(scan) -> None:
    header, _ = scan
    dims = (4096, 4096, 1024, 16, 1, 1, 1)  # 2**38 complex64 samples: 2 TiB
    claim = struct.pack("<HQQ", constants.GADGET_MESSAGE_RECON_DATA, 1, len(dims)) + struct.pack("<7Q", *dims)
    with _launch() as gadget:
        sock = _loaded(gadget, header)
        sock.sendall(claim)  # and nothing more: Gadgetron stays connected
        sent = time.monotonic()
        _, errors = read_replies(sock, timeout=EXIT_WITHIN)
        status = _exit_status(gadget, sent)
        sock.close()
        log = gadget.log()
    assert status == REFUSED, log
    assert len(errors) == 1, log
    assert "ReconData" in errors[0] and "data" in errors[0] and "2.0 TiB" in errors[0], errors[0]
    assert "allowed" in errors[0]
    assert "Traceback" not in log and "Unable to allocate" not in log, log


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (b"<configuration><property name='backbone' value='\xff\xfe'/></configuration>", ("CONFIG", "UTF-8")),
        (b"<configuration><property name='lamda' value='1'/></configuration>", ("lamda",)),
        (b"<configuration><property name='backbone' value='resnet'/></configuration>", ("backbone", "resnet")),
    ],
    ids=["non-UTF-8 CONFIG", "unknown property", "bad value"],
)
def test_configuration_errors_are_sent_to_gadgetron_before_exiting(scan, config: bytes, expected) -> None:
    header, buffers = scan
    with _launch() as gadget:
        sock = gadget.accept(timeout=60)
        sock.sendall(_config(config) + _header(header) + _message(buffers[0]))
        items, errors = read_replies(sock, timeout=60)
        received = time.monotonic()
        status = _exit_status(gadget, received)
        sock.close()
        log = gadget.log()
    assert status == REFUSED, log
    assert items == [] and len(errors) == 1, (items, errors)
    for word in expected:
        assert word in errors[0], errors[0]
    assert "Traceback" not in log, log


def test_the_gadget_log_of_a_protocol_run_reaches_the_caller(scan, caplog: pytest.LogCaptureFixture) -> None:
    """``semrecon replay --protocol`` logs a buffer's failure as the in-process path does."""
    import copy

    header, buffers = scan
    broken = copy.deepcopy(buffers[0])
    broken.bits[0].data.data[0, 0] = np.nan
    with caplog.at_level(logging.WARNING):
        run = emulator.run_external(
            CONFIGURATION,
            header,
            [broken],
            module="semrecon_gadget",
            target="reconstruct",
            gadget_path=[GADGETS],
            timeout=60,
        )
    assert len(run.images) == 1 and run.images[0].meta["GADGETRON_DataRole"] == "Fallback"
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("cannot be reconstructed" in r.getMessage() and "NaN" in r.getMessage() for r in errors), caplog.text


def test_replay_protocol_logs_a_nan_buffer_like_the_in_process_path(
    shepp_logan_raw, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    import h5py

    from semrecon_core.emulation.replay import replay

    path = tmp_path / "nan.h5"
    shutil.copyfile(shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1), path)
    with h5py.File(path, "r+") as file:
        rows = file["dataset/data"]
        last = rows[rows.shape[0] - 1]
        last["data"][0] = np.nan
        rows[rows.shape[0] - 1] = last
    logged = {}
    for protocol in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = replay(path, overrides={"backbone": "zero-filled"}, protocol=protocol)
        roles = [image.meta["GADGETRON_DataRole"] for image in result.images]
        assert roles.count("Fallback") == 1, roles  # the buffer with the NaN sample; the scan goes on
        logged[protocol] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("cannot be reconstructed" in m and "NaN" in m for m in logged[False]), logged[False]
    assert len(logged[True]) == len(logged[False]), logged
    for in_process, over_the_wire in zip(logged[False], logged[True], strict=True):
        assert over_the_wire.endswith(in_process), (in_process, over_the_wire)


# =====================================================================================================
# The command line: bad files, bad options, unwritable outputs. Every case runs ``semrecon`` in-process
# and must end with exit status 2 and one line naming the problem, no traceback, within 5 s, with its
# inputs unchanged and nothing written.
# =====================================================================================================


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated ISMRMRD raw file: noise scan, 2× readout oversampling, 32², 4 coils, R = 2, 12 ACS."""
    from semrecon_core.data.simulate import write_ismrmrd_raw

    return write_ismrmrd_raw(
        tmp_path_factory.mktemp("raw") / "scan.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12, seed=3
    )


def _copy(scan: Path, folder: Path, name: str = "scan.h5") -> Path:
    import shutil

    target = folder / name
    shutil.copyfile(scan, target)
    return target


def _edited_rows(scan: Path, folder: Path, change) -> Path:
    """A copy of ``scan`` with ``change(rows)`` applied to its ``dataset/data`` rows (a NumPy record array)."""
    import h5py

    path = _copy(scan, folder)
    with h5py.File(path, "r+") as file:
        rows = file["dataset/data"][()]
        change(rows)
        file["dataset/data"][...] = rows
    return path


def _edited_header(scan: Path, folder: Path, old: str, new: str) -> Path:
    import h5py

    path = _copy(scan, folder)
    with h5py.File(path, "r+") as file:
        text = file["dataset/xml"][0]
        text = text.decode() if isinstance(text, bytes) else str(text)
        assert old in text, old
        del file["dataset/xml"]
        file.create_dataset("dataset/xml", data=[text.replace(old, new).encode()], dtype=h5py.string_dtype())
    return path


def _sample(rows, value: float) -> None:
    data = rows[-1]["data"]
    data[5] = value
    rows[-1]["data"] = data


def _short_readout(scan: Path, folder: Path) -> Path:
    """A copy in which one imaging line (acquisition #20) has 50 of the 64 samples the others have."""
    reader = ismrmrd.Dataset(str(scan), "dataset", mode="r")
    path = folder / "scan.h5"
    writer = ismrmrd.Dataset(str(path), "dataset", mode="w")
    try:
        writer.write_xml_header(reader.read_xml_header())
        for number in range(reader.number_of_acquisitions()):
            acq = reader.read_acquisition(number)
            if number == 20:
                head = acq.getHead()
                head.number_of_samples = 50
                acq = ismrmrd.Acquisition(head, np.ascontiguousarray(acq.data[:, :50]))
            writer.append_acquisition(acq)
    finally:
        reader.close()
        writer.close()
    return path


def _wrong_dtype(scan: Path, folder: Path) -> Path:
    import h5py

    path = folder / "scan.h5"
    with h5py.File(scan, "r") as source, h5py.File(path, "w") as target:
        target["dataset/xml"] = source["dataset/xml"][()]
        target["dataset/data"] = np.zeros((4, 10), np.float32)
    return path


def _no_acquisitions(scan: Path, folder: Path) -> Path:
    import h5py

    path = folder / "scan.h5"
    with h5py.File(scan, "r") as source, h5py.File(path, "w") as target:
        target["dataset/xml"] = source["dataset/xml"][()]
    return path


def _truncated(scan: Path, folder: Path) -> Path:
    path = folder / "scan.h5"
    path.write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
    return path


def _kspace_npy(folder: Path, *, nan: bool = False, name: str = "k.npy") -> Path:
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((4, 32, 32)) + 1j * rng.standard_normal((4, 32, 32))).astype(np.complex64)
    if nan:
        data[1, 3, 4] = np.nan
    path = folder / name
    np.save(path, data)
    return path


def _chain(folder: Path, text: str) -> Path:
    path = folder / "chain.xml"
    path.write_text(text)
    return path


_EXTERNAL = (
    "<configuration><version>2</version><stream>{gadget}<external>"
    "<execute name='semrecon_gadget' target='reconstruct' type='python'/>"
    "<configuration>{properties}</configuration></external></stream></configuration>"
)


def _bank(folder: Path, *, poison: str | None = None) -> Path:
    """A small pooled image-only bank (random features); ``poison`` ``nan`` / ``shape`` / ``truncate`` breaks it."""
    import torch
    from safetensors.torch import load_file, save_file

    from semrecon_core.priors.bank import bank_from_features

    generator = torch.Generator().manual_seed(0)
    positives = [torch.randn(6, 4, 8, generator=generator) + 1]
    negatives = [torch.randn(6, 4, 8, generator=generator) - 1]
    identity = {"family": "janus", "kind": "image", "revision": "random", "layers": [1]}
    bank = bank_from_features(positives, negatives, identity=identity, similarity="pooled", weights=(1.0,))
    path = bank.save(folder / "bank.safetensors")
    if poison in ("nan", "shape"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        if poison == "nan":
            tensors["positives/0"][2, 3] = float("nan")
        else:
            tensors["negatives/0"] = tensors["negatives/0"][:, :5].contiguous()
        save_file(tensors, str(path), metadata=metadata)
    elif poison == "truncate":
        path.write_bytes(path.read_bytes()[:-40])
    return path


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``--npy`` output fails after OUT.h5 and the PNG were written (as on a full disk)."""
    import errno

    def fail(*_args, **_kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", fail)


# name -> (argv builder (input folder, output folder, scan) -> argv, words the message must contain, fault)
CLI_CASES: dict[str, tuple] = {
    # --- recon: the input file
    "recon: no such file": (lambda i, o, s: ["recon", str(i / "absent.h5"), str(o / "out.h5")], ("absent.h5",)),
    "recon: not HDF5": (
        lambda i, o, s: ["recon", str(_text(i, "scan.h5")), str(o / "out.h5")],
        ("scan.h5", "not"),
    ),
    "recon: truncated HDF5": (
        lambda i, o, s: ["recon", str(_truncated(s, i)), str(o / "out.h5")],
        ("scan.h5", "truncated"),
    ),
    "recon: no ISMRMRD header": (
        lambda i, o, s: ["recon", str(_no_header(s, i)), str(o / "out.h5")],
        ("scan.h5", "header"),
    ),
    "recon: header XML does not parse": (
        lambda i, o, s: ["recon", str(_edited_header(s, i, "<encoding>", "<encoding><<")), str(o / "out.h5")],
        ("scan.h5", "does not parse"),
    ),
    "recon: header channel count disagrees with the data": (
        lambda i, o, s: [
            "recon",
            str(_edited_header(s, i, "<receiverChannels>4<", "<receiverChannels>8<")),
            str(o / "out.h5"),
        ],
        ("scan.h5", "receiverChannels", "is 8", "4 channels"),
    ),
    "recon: header claims a huge matrix": (
        lambda i, o, s: ["recon", str(_edited_header(s, i, "<y>32</y>", "<y>2000000</y>")), str(o / "out.h5")],
        ("scan.h5", "matrixSize", "2000000", "16384"),
    ),
    "recon: header claims a zero matrix": (
        lambda i, o, s: ["recon", str(_edited_header(s, i, "<x>32</x>", "<x>0</x>")), str(o / "out.h5")],
        ("scan.h5", "reconSpace", "matrixSize", "<x> is 0"),
    ),
    "recon: NaN sample": (
        lambda i, o, s: ["recon", str(_edited_rows(s, i, lambda rows: _sample(rows, np.nan))), str(o / "out.h5")],
        ("scan.h5", "NaN or Inf"),
    ),
    "recon: Inf sample": (
        lambda i, o, s: ["recon", str(_edited_rows(s, i, lambda rows: _sample(rows, np.inf))), str(o / "out.h5")],
        ("scan.h5", "NaN or Inf"),
    ),
    "recon: acquisition shorter than its header says": (
        lambda i, o, s: ["recon", str(_edited_rows(s, i, _claim_more_samples)), str(o / "out.h5")],
        ("scan.h5", "acquisition #", "header says"),
    ),
    "recon: readout lengths differ (quoted as stored)": (
        lambda i, o, s: ["recon", str(_short_readout(s, i)), str(o / "out.h5")],
        ("scan.h5", "acquisition #20", "has 50 samples", "64"),
    ),
    "recon: acquisitions of a wrong dtype": (
        lambda i, o, s: ["recon", str(_wrong_dtype(s, i)), str(o / "out.h5")],
        ("scan.h5", "acquisitions"),
    ),
    "recon: no acquisitions": (
        lambda i, o, s: ["recon", str(_no_acquisitions(s, i)), str(o / "out.h5")],
        ("scan.h5", "dataset/data"),
    ),
    "recon: .npy k-space with NaN": (
        lambda i, o, s: ["recon", str(_kspace_npy(i, nan=True)), str(o / "out.h5")],
        ("k.npy", "NaN or Inf"),
    ),
    "recon: .npy mask of the wrong shape": (
        lambda i, o, s: [
            "recon",
            str(_kspace_npy(i)),
            str(o / "out.h5"),
            "--mask",
            str(_array(i, "mask.npy", np.ones((7, 9), bool))),
        ],
        ("mask", "(7, 9)"),
    ),
    "recon: truncated .npy": (
        lambda i, o, s: ["recon", str(_cut(_kspace_npy(i), 200)), str(o / "out.h5")],
        ("k.npy", "truncated"),
    ),
    "recon: .cfl without its .hdr": (
        lambda i, o, s: ["recon", str(_text(i, "k.cfl")), str(o / "out.h5")],
        ("k", ".hdr"),
    ),
    # --- recon: options
    "recon: calib_width wider than the calibration region": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--set", "calib_width=40"],
        ("scan.h5", "calib_width", "40", "calibration region"),
    ),
    "recon: unknown property": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--set", "lamda=1"],
        ("lamda",),
    ),
    "recon: malformed property value": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--set", "iterations=many"],
        ("iterations", "many"),
    ),
    "recon: --set without =": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--set", "iterations"],
        ("--set", "iterations"),
    ),
    "recon: negative lam": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--lam", "-1"],
        ("lam", "-1"),
    ),
    "recon: CUDA without a CUDA device": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--device", "cuda"],
        ("cuda", "not available"),
    ),
    "recon: semantic prior without a bank": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--backbone", "unet", "--prior", "semantic"],
        ("bank",),
    ),
    "recon: semantic prior with a missing bank": (
        lambda i, o, s: [
            "recon",
            str(_copy(s, i)),
            str(o / "out.h5"),
            "--backbone",
            "unet",
            "--prior",
            "semantic",
            "--bank",
            str(i / "absent.safetensors"),
            "--encoder",
            str(i / "absent-encoder"),
        ],
        ("absent",),
    ),
    "recon: corrupt checkpoint": (
        lambda i, o, s: [
            "recon",
            str(_copy(s, i)),
            str(o / "out.h5"),
            "--backbone",
            "unet",
            "--iterations",
            "1",
            "--checkpoint",
            str(_text(i, "unet.safetensors")),
        ],
        ("unet.safetensors",),
    ),
    "recon: missing checkpoint": (
        lambda i, o, s: [
            "recon",
            str(_copy(s, i)),
            str(o / "out.h5"),
            "--backbone",
            "unet",
            "--iterations",
            "1",
            "--checkpoint",
            str(i / "absent.safetensors"),
        ],
        ("absent.safetensors",),
    ),
    # --- recon: outputs
    "recon: output names the input": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(i / "scan.h5")],
        ("would overwrite the input",),
    ),
    "recon: output directory missing": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "absent" / "out.h5")],
        ("does not exist",),
    ),
    "recon: --trace is a directory": (
        lambda i, o, s: ["recon", str(_copy(s, i)), str(o / "out.h5"), "--trace", str(_folder(i, "trace.json"))],
        ("--trace", "is a directory"),
    ),
    "recon: --npy fails after OUT.h5 and --png were written": (
        lambda i, o, s: [
            "recon",
            str(_copy(s, i)),
            str(o / "out.h5"),
            "--png",
            str(o / "out.png"),
            "--npy",
            str(o / "out.npy"),
            "--iterations",
            "2",
        ],
        ("No space left on device",),
        _disk_full,
    ),
    # --- simulate
    "simulate: --noise nan": (lambda i, o, s: ["simulate", str(o / "sim.h5"), "--noise", "nan"], ("noise", "nan")),
    "simulate: --noise inf": (lambda i, o, s: ["simulate", str(o / "sim.h5"), "--noise", "inf"], ("noise", "inf")),
    "simulate: --noise negative": (lambda i, o, s: ["simulate", str(o / "sim.h5"), "--noise", "-1"], ("noise",)),
    "simulate: --matrix 1x64": (
        lambda i, o, s: ["simulate", str(o / "sim.h5"), "--matrix", "1x64", "--acs", "1"],
        ("matrix", "1×64"),
    ),
    "simulate: --matrix 100000": (
        lambda i, o, s: ["simulate", str(o / "sim.h5"), "--matrix", "100000"],
        ("matrix", "100000"),
    ),
    "simulate: --acs larger than the matrix": (
        lambda i, o, s: ["simulate", str(o / "sim.h5"), "--matrix", "16", "--acs", "24"],
        ("ACS", "24"),
    ),
    "simulate: --acceleration nan": (
        lambda i, o, s: ["simulate", str(o / "sim.h5"), "--matrix", "32", "--acs", "8", "--acceleration", "nan"],
        ("acceleration", "nan"),
    ),
    "simulate: --image with NaN": (
        lambda i, o, s: [
            "simulate",
            str(o / "sim.h5"),
            "--image",
            str(_array(i, "image.npy", np.full((32, 32), np.nan, np.float32))),
        ],
        ("NaN",),
    ),
    # --- replay
    "replay: chain file missing": (
        lambda i, o, s: ["replay", str(_copy(s, i)), str(o / "out.h5"), "--config", str(i / "absent.xml")],
        ("absent.xml",),
    ),
    "replay: chain XML does not parse": (
        lambda i, o, s: ["replay", str(_copy(s, i)), str(o / "out.h5"), "--config", str(_chain(i, "<configuration"))],
        ("chain.xml",),
    ),
    "replay: chain names an unknown gadget": (
        lambda i, o, s: [
            "replay",
            str(_copy(s, i)),
            str(o / "out.h5"),
            "--config",
            str(
                _chain(
                    i,
                    _EXTERNAL.format(
                        gadget="<gadget><name>X</name><classname>NoSuchGadget</classname></gadget>", properties=""
                    ),
                )
            ),
        ],
        ("chain.xml", "NoSuchGadget"),
    ),
    "replay: bad property in the chain": (
        lambda i, o, s: [
            "replay",
            str(_copy(s, i)),
            str(o / "out.h5"),
            "--config",
            str(_chain(i, _EXTERNAL.format(gadget="", properties="<property name='iterations' value='-3'/>"))),
        ],
        ("chain.xml", "iterations", "-3"),
    ),
    "replay: bad display property": (
        lambda i, o, s: ["replay", str(_copy(s, i)), str(o / "out.h5"), "--set", "display_max_value=-1"],
        ("display_max_value", "-1"),
    ),
    "replay: unknown --set property": (
        lambda i, o, s: ["replay", str(_copy(s, i)), str(o / "out.h5"), "--set", "lamda=1"],
        ("lamda",),
    ),
    "replay: output names the input": (
        lambda i, o, s: ["replay", str(_copy(s, i)), str(i / "scan.h5")],
        ("would overwrite the input",),
    ),
    "replay: header channel count disagrees with the data": (
        lambda i, o, s: [
            "replay",
            str(_edited_header(s, i, "<receiverChannels>4<", "<receiverChannels>2<")),
            str(o / "out.h5"),
        ],
        ("scan.h5", "receiverChannels", "is 2", "4 channels"),
    ),
    "replay: readout lengths differ (quoted as stored)": (
        lambda i, o, s: ["replay", str(_short_readout(s, i)), str(o / "out.h5")],
        ("scan.h5", "acquisition #20", "has 50 samples", "64"),
    ),
    "replay: --png is a file (after the images were written)": (
        lambda i, o, s: ["replay", str(_copy(s, i)), str(o / "out.h5"), "--png", str(_text(i, "pngs"))],
        ("--png", "pngs", "not a directory"),
    ),
    # --- bank
    "bank info: NaN embedding": (
        lambda i, o, s: ["bank", "info", str(_bank(i, poison="nan"))],
        ("bank.safetensors", "NaN or Inf", "positives", "#2"),
    ),
    "bank info: embedding shapes differ": (
        lambda i, o, s: ["bank", "info", str(_bank(i, poison="shape"))],
        ("bank.safetensors", "differ in embedding shape"),
    ),
    "bank info: truncated bank": (
        lambda i, o, s: ["bank", "info", str(_bank(i, poison="truncate"))],
        ("bank.safetensors",),
    ),
    "bank info: not a bank": (
        lambda i, o, s: ["bank", "info", str(_text(i, "bank.safetensors"))],
        ("bank.safetensors", "not a readable embedding bank"),
    ),
    "bank build: no positives in the folder": (
        lambda i, o, s: ["bank", "build", str(o / "bank.safetensors"), "--positives", str(_folder(i, "empty"))],
        ("--positives", "empty"),
    ),
    "bank build: weights do not match the layers": (
        lambda i, o, s: [
            "bank",
            "build",
            str(o / "bank.safetensors"),
            "--positives",
            str(_copy(s, i)),
            "--layers",
            "1,2",
            "--weights",
            "1",
        ],
        ("--weights", "2 weights"),
    ),
}


def _text(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("this is not what semrecon expects\n")
    return path


def _folder(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    return path


def _array(folder: Path, name: str, value: np.ndarray) -> Path:
    path = folder / name
    np.save(path, value)
    return path


def _cut(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def _no_header(scan: Path, folder: Path) -> Path:
    import h5py

    path = folder / "scan.h5"
    with h5py.File(scan, "r") as source, h5py.File(path, "w") as target:
        target["dataset/data"] = source["dataset/data"][()]
    return path


def _claim_more_samples(rows) -> None:
    head = rows[-1]["head"]
    head["number_of_samples"] += 3
    rows[-1]["head"] = head


def _digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_bad_input_naming_it(
    case: str, raw_scan: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semrecon_core.commands.main import main

    build, expected, *fault = CLI_CASES[case]
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    argv = build(inputs, outputs, raw_scan)
    before = _digest(inputs)
    for prepare in fault:
        prepare(monkeypatch)
    capsys.readouterr()
    start = time.monotonic()
    status = main(argv)
    seconds = time.monotonic() - start
    captured = capsys.readouterr()
    assert status == 2, f"exit status {status}\n{captured.out}\n{captured.err}"
    message = captured.err.strip()
    assert message.startswith(f"semrecon {argv[0]}: error: "), message
    for word in expected:
        assert word in message, f"{word!r} not in: {message}"
    assert "Traceback" not in captured.err + captured.out
    assert seconds < EXIT_WITHIN, f"{case}: {seconds:.1f} s"
    assert _digest(inputs) == before, "an input was modified"
    assert list(outputs.rglob("*")) == [], f"partial outputs left behind: {list(outputs.rglob('*'))}"


# ------------------------------------------------------------------------------- outputs: modes, staging
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_gets_one_mode_subject_to_the_umask(raw_scan: Path, tmp_path: Path, umask: int) -> None:
    """recon (all four outputs), replay (images and PNGs), simulate and bank build all write 0666 less the umask."""
    from semrecon_core.commands.main import main

    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        out.mkdir()
        assert main(["simulate", str(out / "sim.h5"), "--matrix", "32", "--coils", "4", "--acs", "8"]) == 0
        recon = ["recon", str(raw_scan), str(out / "r.h5"), "--iterations", "2", "--device", "cpu"]
        assert main([*recon, "--npy", str(out / "r.npy"), "--png", str(out / "r.png"), "--trace", str(out / "t")]) == 0
        replay = ["replay", str(raw_scan), str(out / "p.h5"), "--set", "device=cpu"]
        assert main([*replay, "--png", str(out / "pngs")]) == 0
        _bank(out)
    finally:
        os.umask(previous)
    files = sorted(path for path in out.rglob("*") if path.is_file())
    assert len(files) == 8, files
    modes = {str(path.relative_to(out)): oct(path.stat().st_mode & 0o777) for path in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_staged_outputs_are_committed_together_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replacement that fails half-way restores the outputs already committed (old content, or none)."""
    from semrecon_core.data.images import StagedOutputs

    old = tmp_path / "a.txt"
    old.write_text("previous")
    with StagedOutputs() as staged:  # a normal commit
        staged.path(tmp_path / "b.txt").write_text("b")
    assert (tmp_path / "b.txt").read_text() == "b"

    real_replace = Path.replace

    def failing(self: Path, target):  # the second replacement fails (e.g. the disk goes read-only)
        if Path(target).name == "c.txt":
            raise OSError(30, "Read-only file system")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", failing)
    staged = StagedOutputs()
    staged.path(old).write_text("new")
    staged.path(tmp_path / "c.txt").write_text("c")
    with pytest.raises(OSError, match="Read-only"):
        staged.__exit__(None, None, None)
    assert old.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"], list(tmp_path.iterdir())
    failed = StagedOutputs()  # an error while writing: nothing is committed, the new directory goes too
    failed.path(tmp_path / "d" / "e.txt", mkdir=True).write_text("e")
    failed.__exit__(RuntimeError, RuntimeError("the reconstruction failed"), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


# ------------------------------------------------------------------ the gadget over the wire: more faults
def _vanish_inside_a_recon_data(gadget: emulator.GadgetProcess, scan) -> socket.socket:
    header, buffers = scan
    sock = _loaded(gadget, header)
    message = _message(buffers[0])
    sock.sendall(message[: len(message) // 2])
    return sock


def _vanish_inside_a_message_id(gadget: emulator.GadgetProcess, scan) -> socket.socket:
    sock = _loaded(gadget, scan[0])
    sock.sendall(b"\x08")
    return sock


def _vanish_after_the_header(gadget: emulator.GadgetProcess, scan) -> socket.socket:
    return _loaded(gadget, scan[0])


@pytest.mark.parametrize(
    "vanish",
    [_vanish_after_the_header, _vanish_inside_a_message_id, _vanish_inside_a_recon_data],
    ids=lambda f: f.__name__,
)
def test_gadget_exits_when_gadgetron_goes_away_after_the_header(scan, vanish) -> None:
    with _launch() as gadget:
        sock = vanish(gadget, scan)
        time.sleep(0.2)
        sock.close()
        status = _exit_status(gadget, time.monotonic())
        log = gadget.log()
    assert status == GONE, f"exit status {status}\n{log}"
    assert "Gadgetron closed the connection" in log and "Traceback" not in log, log


def _header_text(mid_length: tuple[int, int] | None, body: bytes) -> bytes:
    return _text_message(constants.GADGET_MESSAGE_HEADER, body, claimed=None if mid_length is None else mid_length[1])


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        (
            lambda header: _config() + _header_text(None, b"<ismrmrdHeader><nonsense"),
            ("HEADER", "not an ISMRMRD header"),
        ),
        (lambda header: _config() + _header_text((3, 2**31), b"<ismrmrdHeader>"), ("HEADER", "2.0 GiB", "64.0 MiB")),
        (
            lambda header: (
                _config("<configuration><property name='display_max_value' value='-5'/></configuration>")
                + _header(header)
            ),
            ("display_max_value", "-5"),
        ),
        (
            lambda header: (
                _config() + _header(header) + struct.pack("<HQQ", constants.GADGET_MESSAGE_RECON_DATA, 1, 2**40)
            ),
            ("ReconData", "1099511627776 dimensions", "at most 16"),
        ),
    ],
    ids=["HEADER that does not parse", "HEADER claiming 2 GiB", "bad display property", "ReconData claiming 2^40 dims"],
)
def test_gadget_refuses_bad_sessions_with_an_error(scan, session, expected) -> None:
    header, _ = scan
    raw = session(header)
    start = len(_config()) + len(_header(header))  # what comes after CONFIG + HEADER is sent once the gadget waits
    with _launch() as gadget:
        if raw[:start] == _config() + _header(header):
            sock = _loaded(gadget, header)
            raw = raw[start:]
        else:
            sock = gadget.accept(timeout=60)
        sock.sendall(raw)
        _, errors = read_replies(sock, timeout=60)  # a bad CONFIG is read after the gadget module is imported
        received = time.monotonic()
        status = _exit_status(gadget, received)
        sock.close()
        log = gadget.log()
    assert status == REFUSED, log
    assert len(errors) == 1, (errors, log)
    for word in expected:
        assert word in errors[0], errors[0]
    assert "Traceback" not in log, log


def test_header_and_buffers_disagreeing_on_channels_give_a_labelled_fallback(scan) -> None:
    """The gadget checks the HEADER against every buffer (the one header check): a labelled image, not a crash."""
    header, buffers = scan
    wrong = header.replace("<receiverChannels>4<", "<receiverChannels>6<")
    assert wrong != header
    run = emulator.run_external(
        CONFIGURATION,
        wrong,
        buffers[:1],
        module="semrecon_gadget",
        target="reconstruct",
        gadget_path=[GADGETS],
        timeout=60,
    )
    (image,) = run.images
    assert image.meta["GADGETRON_DataRole"] == "Fallback"
    comment = image.meta["GADGETRON_ImageComment"]
    assert comment.startswith("FALLBACK") and "receiverChannels" in comment and "is 6" in comment, comment
    assert comment.count("ReconData #1") <= 1, comment  # the buffer is not named twice


# ---------------------------------------------------------------- serve: hostile sessions, then a good scan
def _session(header: str, configuration: bytes = b"<configuration/>") -> bytes:
    return _config(configuration) + _header(header)


SERVE_CASES: dict[str, tuple] = {
    "garbage instead of CONFIG": (lambda h: b"GET / HTTP/1.1\r\n\r\n", ("expected CONFIG",)),
    "HEADER that does not parse": (lambda h: _config() + _header_text(None, b"<nonsense"), ("HEADER",)),
    "HEADER claiming 2 GiB": (lambda h: _config() + _header_text((3, 2**31), b"<"), ("HEADER", "2.0 GiB")),
    "bad display property": (
        lambda h: _session(h, b"<configuration><property name='display_max_intensity' value='x'/></configuration>"),
        ("display_max_intensity", "'x'"),
    ),
    "unknown property": (
        lambda h: _session(h, b"<configuration><property name='lamda' value='1'/></configuration>"),
        ("lamda",),
    ),
    "ReconData claiming 2^40 dims": (
        lambda h: _session(h) + struct.pack("<HQQ", constants.GADGET_MESSAGE_RECON_DATA, 1, 2**40),
        ("ReconData", "dimensions"),
    ),
    "client vanishes after CONFIG": (lambda h: _config(), ()),
    "client vanishes inside a ReconData": (None, ()),
}


@pytest.mark.parametrize("case", list(SERVE_CASES))
def test_serve_survives_a_hostile_session_and_serves_the_next_scan(scan, case: str) -> None:
    import threading

    from semrecon_core.gadgetron import serve

    header, buffers = scan
    build, expected = SERVE_CASES[case]
    raw = _session(header) + _message(buffers[0])[:500] if build is None else build(header)
    server = serve.GadgetServer(properties={"backbone": "zero-filled"}, idle_timeout=30.0)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(raw)
            start = time.monotonic()
            if expected:
                _, errors = read_replies(sock, timeout=EXIT_WITHIN)
                assert time.monotonic() - start < EXIT_WITHIN, case
                assert len(errors) == 1, errors
                for word in expected:
                    assert word in errors[0], errors[0]
        run = emulator.run_connect("<configuration/>", header, buffers[:1], port=server.address[1], timeout=60)
        assert run.errors == [] and len(run.images) == 1, run.errors
    finally:
        stop.set()
        thread.join(10)
        server.close()
    assert not thread.is_alive(), "the server did not stop"
