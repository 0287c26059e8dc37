"""Checks shared by the tests (a plain module, imported by test modules)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import socket

    from semrecon_core.data.kspace import KSpace
    from semrecon_core.physics.linop import LinearOperator


def random_tensor(shape: tuple[int, ...], *, seed: int = 0, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """Standard normal samples of ``shape``, reproducible from ``seed``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    """``⟨a, b⟩ = Σ conj(a)·b``."""
    return complex((a.conj() * b).sum())


def check_linear_operator(
    op: LinearOperator,
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    dtype: torch.dtype = torch.complex64,
    *,
    rtol: float = 1e-4,
) -> None:
    """Assert that ``op`` maps ``x_shape`` to ``y_shape`` and behaves as a linear operator with its adjoint.

    Checks the dot-product test ``⟨Ax, y⟩ = ⟨x, Aᴴy⟩``, that ``A.H`` applies ``Aᴴ`` and ``A.H.H`` applies ``A``,
    that ``A.gram`` and ``A.normal`` apply ``AᴴA`` (and ``A.gram`` is self-adjoint), and that autograd's
    vector-Jacobian products through ``A`` and ``Aᴴ`` are ``Aᴴ`` and ``A`` (so gradients flow through both).
    """
    x, y = random_tensor(x_shape, seed=1, dtype=dtype), random_tensor(y_shape, seed=2, dtype=dtype)
    ax, ahy = op(x), op.adjoint(y)
    assert tuple(ax.shape) == tuple(y_shape) and tuple(ahy.shape) == tuple(x_shape)

    lhs, rhs = inner(ax, y), inner(x, ahy)
    assert abs(lhs) > 0 and abs(lhs - rhs) < rtol * abs(lhs), f"not adjoint: ⟨Ax, y⟩ = {lhs}, ⟨x, Aᴴy⟩ = {rhs}"

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        scale = float(expected.abs().max())
        assert torch.allclose(actual, expected, rtol=rtol, atol=rtol * scale), what

    close(op.H(y), ahy, "A.H does not apply the adjoint")
    close(op.H.H(x), ax, "A.H.H does not apply A")
    close(op.H.adjoint(x), ax, "the adjoint of A.H does not apply A")
    normal = op.adjoint(ax)
    close(op.gram(x), normal, "A.gram is not AᴴA")
    close(op.normal(x), normal, "A.normal is not AᴴA")
    close(op.gram.H(x), normal, "A.gram is not self-adjoint")

    x_leaf, y_leaf = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    (vjp_forward,) = torch.autograd.grad(op(x_leaf), x_leaf, grad_outputs=y)
    (vjp_adjoint,) = torch.autograd.grad(op.adjoint(y_leaf), y_leaf, grad_outputs=x)
    close(vjp_forward, ahy, "autograd through A does not give Aᴴ")
    close(vjp_adjoint, ax, "autograd through Aᴴ does not give A")


# --- tools, phantoms and models shared by several test modules ------------------------------------


def require_tool(name: str) -> str:
    """Path of a command-line tool, or skip the test naming the missing Debian package."""
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.skip(f"'{name}' is not on PATH (install the Debian package: bart / ismrmrd-tools)")
    return path


def write_shepp_logan_raw(path: Path, *, matrix: int, coils: int, acs: int, repetitions: int) -> Path:
    """Write ``ismrmrd_generate_cartesian_shepp_logan``'s raw file to a fresh ``path``; skip without the tool.

    Always with a noise scan (``-C``), 2× readout oversampling, acceleration 2 and noise 0.05; the tool
    stores the true phantom and coil maps beside the acquisitions. It appends to existing files, so
    ``path`` must not exist. Tests use the session fixture ``shepp_logan_raw`` (``conftest.py``).
    """
    import subprocess

    if path.exists():
        raise FileExistsError(f"{path}: the phantom tool would append to an existing file")
    tool = require_tool("ismrmrd_generate_cartesian_shepp_logan")
    args = ["-m", matrix, "-c", coils, "-O", 2, "-a", 2, "-w", acs, "-C", "-r", repetitions, "-n", 0.05]
    subprocess.run([tool, *map(str, args), "-o", str(path)], check=True, capture_output=True, timeout=120)
    return path


def phantom_scan(n: int = 64, coils: int = 8, acceleration: float = 1.0, acs: int = 24) -> tuple[KSpace, torch.Tensor]:
    """A Shepp-Logan phantom with birdcage coils and a smooth phase, sampled with a gaussian 1-D mask.

    Returns the ``KSpace`` (one slice, ground truth attached) and the true coil maps ``(1, coils, n, n)``.
    """
    import numpy as np
    import sigpy.mri

    from semrecon_core.data.kspace import Geometry, KSpace
    from semrecon_core.physics.fft import fft2c
    from semrecon_core.physics.masks import sampling_mask

    image = np.abs(sigpy.shepp_logan((n, n))).astype(np.complex64)
    yy, xx = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    image = image * np.exp(1j * (0.8 * xx + 0.4 * yy**2)).astype(np.complex64)
    maps = sigpy.mri.birdcage_maps((coils, n, n)).astype(np.complex64)
    full = fft2c(torch.from_numpy(maps * image))[None]
    mask = sampling_mask("gaussian", (n, n), acceleration, acs, seed=1)[None] if acceleration > 1 else None
    mask = torch.ones(1, n, n, dtype=torch.bool) if mask is None else mask
    start = n // 2 - acs // 2
    scan = KSpace(
        data=full * mask.unsqueeze(1),
        mask=mask,
        calibration=full[:, :, start : start + acs, :].clone(),
        geometry=Geometry((n, n, 1), (n, n, 1), (200.0, 200.0, 5.0), (200.0, 200.0, 5.0)),
        ground_truth=torch.from_numpy(image)[None],
        source="phantom",
    )
    return scan, torch.from_numpy(maps)[None]


def build_image_bank(encoder_directory: Path, path: Path) -> Path:
    """A pooled image-only embedding bank at ``path``, built with the Janus in ``encoder_directory``.

    Positives are two random 32² images, negatives the same images plus uniform noise; for pipeline tests
    of the semantic prior (the tiny Janus has random weights, so the prior's values mean nothing).
    """
    from semrecon_core.encoders.janus import JanusImageEncoder
    from semrecon_core.priors.bank import bank_from_features, embed_images

    encoder = JanusImageEncoder.from_pretrained(str(encoder_directory))
    generator = torch.Generator().manual_seed(0)
    positives = [torch.rand(1, 32, 32, generator=generator).to(torch.complex64) for _ in range(2)]
    negatives = [p + 0.3 * torch.rand(1, 32, 32, generator=generator) for p in positives]
    bank = bank_from_features(
        embed_images(encoder, positives),
        embed_images(encoder, negatives),
        identity=encoder.identity,
        similarity="centred",
        weights=(0.005, 0.5, 1.0),
    )
    return bank.save(path)


def read_ismrmrd_scan(path: Path) -> tuple[str, list]:
    """An ISMRMRD raw file as ``(xml header, [ReconData])``, buffered as the gadget buffers it."""
    import ismrmrd

    from semrecon_core.data.buffers import recon_data_from_acquisitions

    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        header = dataset.read_xml_header().decode("utf-8")
        acquisitions = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
    finally:
        dataset.close()
    return header, recon_data_from_acquisitions(acquisitions, header)


# --- child processes, watched through /proc ----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far, from ``/proc/PID/stat``."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_exited(pid: int) -> bool:
    """Exited, not yet reaped (its CPU time is final)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def wait_until_idle(pid: int, timeout: float = 60.0) -> None:
    """Until the child has used no CPU for 0.5 s: imports done, blocked reading the next message."""
    import time

    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline and not process_exited(pid):
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now == before:
            return
        before = now
    raise AssertionError(f"the gadget process {pid} was still busy (or gone) after {timeout:.0f} s")


def read_replies(sock: socket.socket, timeout: float) -> tuple[list, list[str]]:
    """What the other end sends on ``sock`` until its CLOSE or end of stream (``timeout`` s of silence ends it too):
    ``(items, ERROR texts)``."""
    from gadgetron.external import constants

    from semrecon_core.emulation import wire

    stream = wire.SocketStream(sock, timeout=timeout)
    items: list = []
    errors: list[str] = []
    try:
        while True:
            mid, item = wire.read_message(stream)
            if mid == constants.GADGET_MESSAGE_CLOSE:
                break
            if mid == constants.GADGET_MESSAGE_ERROR:
                errors.append(item)
            else:
                items.append(item)
    except ConnectionError:
        pass
    return items, errors


def brain_scan(shared_data: Path) -> KSpace:
    """The real 8-coil brain of ``shared_data`` (230 × 180), fully sampled, with its 24 central lines as calibration."""
    import numpy as np

    from semrecon_core.data.kspace import Geometry, KSpace

    full = torch.from_numpy(np.load(shared_data / "brain_t1_8coil" / "kspace.npy")).permute(0, 2, 1)[None]
    start = full.shape[-2] // 2 - 12
    return KSpace(
        data=full,
        mask=torch.ones(1, *full.shape[-2:], dtype=torch.bool),
        calibration=full[:, :, start : start + 24, :].contiguous(),
        geometry=Geometry((230, 180, 1), (230, 180, 1), (230.0, 180.0, 5.0), (230.0, 180.0, 5.0)),
    )


READER_METHODS = ("unet/semantic", "unet/tv")
"""The two methods of the reader-study tests' kits."""


def reader_study_inputs(folder: Path, *, cases: int = 3, size: tuple[int, int] = (40, 48)) -> dict[str, list[Path]]:
    """``.npy`` magnitude images of :data:`READER_METHODS` on ``cases`` cases, with tell-tale file names.

    The semantic method's image is the TV one with finer texture, so each case's two images look alike (the
    shared window hides no scale difference) while their pixels differ.
    """
    import numpy as np

    yy, xx = np.mgrid[-1 : 1 : size[0] * 1j, -1 : 1 : size[1] * 1j]
    files: dict[str, list[Path]] = {method: [] for method in READER_METHODS}
    for case in range(cases):
        rng = np.random.default_rng(case)
        body = ((xx / 0.8) ** 2 + (yy / 0.7) ** 2 < 1) * (0.5 + 0.1 * case) + 0.4 * (np.hypot(xx - 0.2, yy) < 0.3)
        for method, texture in zip(READER_METHODS, (0.05, 0.15), strict=True):
            image = (body + texture * rng.random(size)).astype(np.float32)
            path = folder / f"patient_doe_{method.replace('/', '_')}_case{case}.npy"
            np.save(path, image)
            files[method].append(path)
    return files


def planned_score(reader: str, method: str, case: str, criterion: str) -> int:
    """The 1–5 score the reader-study tests give: semantic mostly above TV, readers and criteria differing."""
    base = 4 if method.endswith("semantic") else 2
    spread = (sum(map(ord, reader + case + criterion)) % 3) - 1  # -1, 0 or 1
    return min(5, max(1, base + spread))


def save_tiny_siglip(directory: Path, *, width: int, layers: int, image_size: int) -> Path:
    """A random SigLIP vision tower (8 × 8 patches, seed 0) saved as a HuggingFace checkpoint in ``directory``."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=width,
        image_size=image_size,
        patch_size=8,
    )
    SiglipVisionModel(config).save_pretrained(directory)
    return directory


def check_reader_analysis(document: dict, rows: list[tuple[str, str, str, str, int]]) -> None:
    """``readers analyze``'s ``readers.json`` equals :func:`hand_reader_analysis` of the same score ``rows``."""
    import pytest

    hand = hand_reader_analysis(rows)
    for row in document["summary"]:
        assert row["mean"] == pytest.approx(hand[("mean", row["criterion"], row["method"])])
        assert row["sd"] == pytest.approx(hand[("sd", row["criterion"], row["method"])])
    for test in document["wilcoxon"]:
        assert (test["first"], test["second"]) == READER_METHODS
        assert test["p"] == pytest.approx(hand[("p", test["criterion"])])
    for row in document["kappa"]:
        assert row["kappa"] == pytest.approx(hand[("kappa", row["criterion"], *row["readers"])])
    assert len(document["kappa"]) == 5 and len(document["wilcoxon"]) == 4


def hand_reader_analysis(rows: list[tuple[str, str, str, str, int]]) -> dict[tuple[str, ...], float]:
    """The reader-study numbers computed by hand from ``(reader, method, case, criterion, score)`` rows.

    Keys: ``("mean" | "sd", criterion, method)``, ``("p", criterion)`` (scipy's Wilcoxon of semantic vs TV, paired
    by reader and case) and ``("kappa", criterion, reader_a, reader_b)`` (quadratic-weighted κ from its definition:
    1 − Σ w·observed / Σ w·expected with w = (i − j)², all criteria pooled under ``"all"``).
    """
    import itertools
    import statistics

    import numpy as np
    from scipy.stats import wilcoxon

    out: dict[tuple[str, ...], float] = {}
    criteria = sorted({r[3] for r in rows})
    readers = sorted({r[0] for r in rows})
    score = {(r, m, c, k): s for r, m, c, k, s in rows}
    for criterion in criteria:
        for method in READER_METHODS:
            values = [s for (_, m, _, k), s in score.items() if m == method and k == criterion]
            out[("mean", criterion, method)] = statistics.mean(values)
            out[("sd", criterion, method)] = statistics.stdev(values)
        units = sorted({(r, c) for (r, m, c, k) in score if k == criterion})
        semantic = [score[(r, READER_METHODS[0], c, criterion)] for r, c in units]
        tv = [score[(r, READER_METHODS[1], c, criterion)] for r, c in units]
        out[("p", criterion)] = float(wilcoxon(semantic, tv).pvalue)

    def kappa(a: list[int], b: list[int]) -> float:
        observed = np.zeros((5, 5))
        for x, y in zip(a, b, strict=True):
            observed[x - 1, y - 1] += 1
        expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
        weights = np.subtract.outer(np.arange(5), np.arange(5)) ** 2
        return float(1 - (weights * observed).sum() / (weights * expected).sum())

    for first, second in itertools.combinations(readers, 2):
        pooled: tuple[list[int], list[int]] = ([], [])
        for criterion in criteria:
            keys = sorted((m, c) for (r, m, c, k) in score if r == first and k == criterion)
            a = [score[(first, m, c, criterion)] for m, c in keys]
            b = [score[(second, m, c, criterion)] for m, c in keys]
            out[("kappa", criterion, first, second)] = kappa(a, b)
            pooled[0].extend(a)
            pooled[1].extend(b)
        out[("kappa", "all", first, second)] = kappa(*pooled)
    return out
