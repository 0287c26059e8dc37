"""Settings this machine cannot satisfy are refused alike on every path (issue 23).

One check (:func:`semrecon_core.settings.check_machine`), one message: the command line (``recon``, ``replay``
in-process and ``--protocol``, ``serve``'s own settings) exits 2 with it and no traceback; the gadget (in-process
and launched over the wire) and a ``serve`` scan whose CONFIG asks for it log it as an ERROR and send the labelled
CG-SENSE fallback for every buffer, never an unlabelled image, and go on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from semrecon_core.commands.main import main  # noqa: E402
from semrecon_core.emulation import emulator  # noqa: E402
from semrecon_core.settings import MachineError, check_machine, device_problem  # noqa: E402
from tests.helpers import read_ismrmrd_scan  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")

GADGETS = Path(__file__).resolve().parents[1] / "gadgets"

# Settings this machine cannot satisfy that a CPU-only machine can produce: no CUDA at all, and a CUDA index
# beyond the devices there are (on a CUDA machine only the second applies).
UNSATISFIABLE = [
    pytest.param("cuda", id="device=cuda"),
    pytest.param(f"cuda:{max(torch.cuda.device_count(), 1)}", id="device=cuda:N-beyond-the-machine"),
]


@pytest.fixture(params=UNSATISFIABLE)
def device(request: pytest.FixtureRequest) -> str:
    """A ``device`` setting this machine cannot satisfy (skipped where it can)."""
    if device_problem(request.param) is None:
        pytest.skip(f"this machine has {request.param}")
    return request.param


@pytest.fixture(scope="module")
def raw(shepp_logan_raw) -> Path:
    """A small Shepp-Logan raw file (4 coils, 32², R = 2, 16 ACS lines, one repetition)."""
    return shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1)


@pytest.fixture(scope="module")
def scan(raw: Path) -> tuple[str, list]:
    return read_ismrmrd_scan(raw)


def _message(device: str) -> str:
    message = device_problem(device)
    assert message is not None
    return message


def _configuration(**values: str) -> str:
    """A U-Net + TV scan (preview on) with ``values`` on top, as a ``<configuration>``."""
    properties = {"backbone": "unet", "prior": "tv", "width": "4", "depth": "2", "iterations": "2", "preview": "true"}
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in {**properties, **values}.items())
    return f"<configuration>{body}</configuration>"


def _assert_labelled_fallbacks(images: list, message: str, count: int) -> None:
    """``count`` images, each the labelled CPU CG-SENSE fallback naming ``message``: no preview, no silent image."""
    assert len(images) == count, [image.meta["GADGETRON_ImageComment"] for image in images]
    for image in images:
        comment = image.meta["GADGETRON_ImageComment"]
        assert comment == f"FALLBACK CG-SENSE (unet+tv failed: MachineError: {message})", comment
        assert image.meta["GADGETRON_DataRole"] == "Fallback"
        assert image.image_series_index == 1
        pixels = np.asarray(image.data, dtype=np.float64)
        assert np.isfinite(pixels).all() and pixels.max() > 0


def _logged_errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR)


# ------------------------------------------------------------------------------ the command line: exit 2


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["recon", "{raw}", "{out}", "--device", "{device}"], id="recon --device"),
        pytest.param(["recon", "{raw}", "{out}", "--backbone", "unet", "--set", "device={device}"], id="recon --set"),
        pytest.param(["replay", "{raw}", "{out}", "--set", "device={device}"], id="replay"),
        pytest.param(["replay", "{raw}", "{out}", "--protocol", "--set", "device={device}"], id="replay --protocol"),
        pytest.param(["serve", "--port", "0", "--set", "device={device}"], id="serve --set"),
    ],
)
def test_the_command_line_exits_2_with_the_message(
    command: list[str], device: str, raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.h5"
    argv = [part.format(raw=raw, out=out, device=device) for part in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"semrecon {argv[0]}: error: {_message(device)}", err
    assert "Traceback" not in err
    assert not out.exists()


def test_replay_in_process_raises_the_machine_error_before_reading(device: str, tmp_path: Path) -> None:
    from semrecon_core.emulation.replay import replay

    with pytest.raises(MachineError) as raised:
        replay(tmp_path / "never_read.h5", overrides={"device": device})
    assert str(raised.value) == _message(device)


# ------------------------------------------------------------------------------ gadget and server: fallbacks


def test_the_gadget_sends_the_labelled_fallback_for_every_buffer(
    device: str, scan: tuple[str, list], caplog: pytest.LogCaptureFixture
) -> None:
    from semrecon_core.emulation.chain import InProcessConnection
    from semrecon_core.gadgetron.gadget import reconstruct

    header, buffers = scan
    sent: list = []
    with caplog.at_level(logging.ERROR):
        reconstruct(InProcessConnection(buffers * 2, header, _configuration(device=device), sent.append))
    _assert_labelled_fallbacks(sent, _message(device), count=2 * len(buffers))
    assert _message(device) in _logged_errors(caplog)


def test_the_gadget_over_the_wire_sends_the_labelled_fallback(
    device: str, scan: tuple[str, list], caplog: pytest.LogCaptureFixture
) -> None:
    """The gadget launched as Gadgetron launches it (a chain property asks for the device): images, no ERROR."""
    header, buffers = scan
    with caplog.at_level(logging.WARNING):
        run = emulator.run_external(
            _configuration(device=device),
            header,
            buffers,
            module="semrecon_gadget",
            target="reconstruct",
            gadget_path=[GADGETS],
            timeout=60,
        )
    assert run.errors == [] and run.returncode == 0
    _assert_labelled_fallbacks(run.images, _message(device), count=len(buffers))
    assert _message(device) in _logged_errors(caplog)


@pytest.fixture
def server() -> Iterator:
    """A :class:`GadgetServer` for U-Net + TV scans on this machine, served in a thread; stopped afterwards."""
    from semrecon_core.gadgetron.serve import GadgetServer

    server = GadgetServer(properties={"backbone": "unet", "prior": "tv", "width": "4", "depth": "2"})
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), kwargs={"grace_s": 1.0}, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(30)
    server.close()
    assert not thread.is_alive()


def test_a_serve_scan_asking_for_it_gets_the_labelled_fallback_and_the_server_goes_on(
    device: str, scan: tuple[str, list], server, caplog: pytest.LogCaptureFixture
) -> None:
    header, buffers = scan
    port = server.address[1]
    with caplog.at_level(logging.ERROR):
        run = emulator.run_connect(_configuration(device=device), header, buffers, port=port, timeout=60)
    assert run.errors == []
    _assert_labelled_fallbacks(run.images, _message(device), count=len(buffers))
    assert _message(device) in _logged_errors(caplog)
    run = emulator.run_connect(_configuration(device="cpu", preview="false"), header, buffers, port=port, timeout=60)
    assert run.errors == [] and [image.meta["GADGETRON_DataRole"] for image in run.images] == ["Image"] * len(buffers)


# ------------------------------------------------------------------------------ the check itself


def test_check_machine_passes_what_the_machine_has_and_resolves() -> None:
    from semrecon_core.config import ReconConfig, ResolvedConfig

    resolved = check_machine(ReconConfig(backbone="sense", device="cpu"))
    assert isinstance(resolved, ResolvedConfig) and resolved.device == "cpu"
    assert check_machine(ReconConfig(device="auto")).device == "auto"


def test_sigpy_espirit_on_cuda_without_cupy_is_a_warning_not_a_refusal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ESPIRiT through sigpy runs on the CPU when CuPy is missing: slower, so said once, but not refused."""
    import importlib.util

    from semrecon_core import settings
    from semrecon_core.config import ReconConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else find_spec(name, *a))
    monkeypatch.setattr(settings, "_WARNED_CUPY", set())
    with caplog.at_level(logging.WARNING):
        check_machine(ReconConfig(device="cuda", espirit="sigpy"))
        check_machine(ReconConfig(device="cuda", espirit="sigpy"))
        check_machine(ReconConfig(device="cuda", espirit="torch"))
    warnings = [record.getMessage() for record in caplog.records if "CuPy" in record.getMessage()]
    assert len(warnings) == 1 and "espirit=torch" in warnings[0]
    with pytest.raises(MachineError, match=r"'cuda:1' requested but this machine has 1 CUDA device\(s\)"):
        check_machine(ReconConfig(device="cuda:1"))
