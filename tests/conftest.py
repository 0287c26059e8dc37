"""Shared fixtures: the optional ../shared/data folder, the cuda marker, and session-wide test inputs.

Session fixtures build each expensive input once per test run: the tiny random Janus (``tiny_janus``), an
image-only bank built with it (``tiny_janus_bank``) and ismrmrd-tools' Shepp-Logan raw files
(``shepp_logan_raw``). They are shared by every test that asks, so tests must treat them as read-only.
Plain helper functions live in ``tests/helpers.py``; test modules import from there, never from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import build_image_bank, write_shepp_logan_raw

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real MRI data beside the repository; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it is not part of the repository)")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of small fits: on a busy 2-core machine two threads spin on each other and
    make tiny convolutions and BatchNorm calls up to 100 × slower (used through ``pytest.mark.usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_janus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random Janus (``build_tiny_janus``, seed 0), built once per session."""
    pytest.importorskip("transformers")
    from semrecon_core.encoders.tiny import build_tiny_janus

    return build_tiny_janus(tmp_path_factory.mktemp("tiny-janus") / "tiny-janus")


@pytest.fixture(scope="session")
def tiny_janus_bank(tiny_janus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(model directory, bank path)``: the session's tiny Janus and a pooled image-only bank built with it."""
    return tiny_janus, build_image_bank(tiny_janus, tmp_path_factory.mktemp("tiny-janus-bank") / "bank.safetensors")


@pytest.fixture(scope="session")
def shepp_logan_raw(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``shepp_logan_raw(matrix=32, coils=4, acs=16, repetitions=1) -> Path``: an ismrmrd-tools phantom file.

    Each parameter set is written once per session (noise scan, 2× readout oversampling, R = 2, noise 0.05,
    true phantom and coil maps stored beside the acquisitions); tests skip without the tool.
    """
    files: dict[tuple[int, int, int, int], Path] = {}

    def make(*, matrix: int = 32, coils: int = 4, acs: int = 16, repetitions: int = 1) -> Path:
        key = (matrix, coils, acs, repetitions)
        if key not in files:
            folder = tmp_path_factory.mktemp(f"shepp-logan-{matrix}-{coils}c-{acs}acs-{repetitions}r")
            files[key] = write_shepp_logan_raw(
                folder / "shepp_logan.h5", matrix=matrix, coils=coils, acs=acs, repetitions=repetitions
            )
        return files[key]

    return make
