"""Shared fixtures: the optional ../shared/data folder, tools on PATH, and the cuda marker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real MRI data beside the repository; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it is not part of the repository)")
    return SHARED_DATA


def require_tool(name: str) -> str:
    """Path of a command-line tool, or skip the test naming the missing Debian package."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"'{name}' is not on PATH (install the Debian package: bart / ismrmrd-tools)")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def shepp_logan_raw(path: Path, *, matrix: int, coils: int, acs: int, repetitions: int) -> Path:
    """Write ``ismrmrd_generate_cartesian_shepp_logan``'s raw file to a fresh ``path``; skip without the tool.

    Always with a noise scan (``-C``), 2× readout oversampling, acceleration 2 and noise 0.05; the tool
    stores the true phantom and coil maps beside the acquisitions. It appends to existing files, so
    ``path`` must not exist.
    """
    import subprocess

    tool = require_tool("ismrmrd_generate_cartesian_shepp_logan")
    args = ["-m", matrix, "-c", coils, "-O", 2, "-a", 2, "-w", acs, "-C", "-r", repetitions, "-n", 0.05]
    subprocess.run([tool, *map(str, args), "-o", str(path)], check=True, capture_output=True, timeout=120)
    return path


def tiny_janus_with_bank(folder: Path) -> tuple[Path, Path]:
    """A tiny random Janus in ``folder`` and a pooled image-only bank built with it from random images.

    Returns ``(model directory, bank path)``; for pipeline tests of the semantic prior (random weights).
    """
    import torch

    from semrecon_core.encoders.janus import JanusImageEncoder
    from semrecon_core.encoders.tiny import build_tiny_janus
    from semrecon_core.priors.bank import bank_from_features, embed_images

    tiny = build_tiny_janus(folder / "tiny-janus")
    encoder = JanusImageEncoder.from_pretrained(str(tiny))
    generator = torch.Generator().manual_seed(0)
    positives = [torch.rand(1, 32, 32, generator=generator).to(torch.complex64) for _ in range(2)]
    negatives = [p + 0.3 * torch.rand(1, 32, 32, generator=generator) for p in positives]
    bank = bank_from_features(
        embed_images(encoder, positives),
        embed_images(encoder, negatives),
        identity=encoder.identity,
        similarity="pooled",
        weights=(0.005, 0.5, 1.0),
    )
    return tiny, bank.save(folder / "bank.safetensors")
