"""The prior probe (``semrecon bank probe``): its measures on directions whose answer is known, and the command
end to end on the tiny Janus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semrecon_core.data.simulate import builtin_anatomy, coil_maps
from semrecon_core.physics.fft import fft2c, ifft2c
from semrecon_core.physics.masks import sampling_mask
from semrecon_core.priors.probe import (
    cosine,
    descent,
    measured_coils,
    point_measures,
    unmeasured_coils,
    unmeasured_fft,
)
from semrecon_core.priors.tv import TVPrior


def _random_image(seed: int, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, size, size, dtype=torch.complex64, generator=generator)


@pytest.fixture(scope="module")
def geometry() -> tuple[torch.Tensor, torch.Tensor]:
    """True unit-RSS maps ``(1, 4, 32, 32)`` and a Gaussian R = 4 mask ``(1, 32, 32)``."""
    maps = torch.from_numpy(coil_maps(4, (32, 32)))[None]
    mask = sampling_mask("gaussian", (32, 32), 4, acs_width=4, seed=0)[None]
    return maps, mask


class _TowardTruth:
    """A prior whose minimum is ``truth``: ``0.5‖x − truth‖²``; its descent direction is exactly ``truth − x``."""

    label = "distance to the truth"

    def __init__(self, truth: torch.Tensor) -> None:
        self.truth = truth

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        return 0.5 * (image - self.truth).abs().square().sum()

    def status(self, image: torch.Tensor) -> dict:
        return {}


def test_cosines_and_projections_on_known_directions(geometry) -> None:
    maps, mask = geometry
    v, w = _random_image(0), _random_image(1)
    assert cosine(v, v) == pytest.approx(1.0, abs=1e-6)
    assert cosine(v, -v) == pytest.approx(-1.0, abs=1e-6)
    assert cosine(v, 1j * v) == pytest.approx(0.0, abs=1e-6)  # real inner product: i·v is orthogonal to v
    assert abs(cosine(v, w)) < 0.1  # independent random images
    # With unit-RSS maps the coil split is exact: what was measured plus what was not is the whole image.
    energy = float(v.abs().square().sum())
    split = float(
        measured_coils(v, maps, mask).abs().square().sum() + unmeasured_coils(v, maps, mask).abs().square().sum()
    )
    assert split == pytest.approx(energy, rel=1e-5)
    assert 0.1 < float(unmeasured_coils(v, maps, mask).abs().square().sum()) / energy < 0.9
    # Adding anything measured (image FFT inside the mask) leaves the unmeasured part, and its cosine, unchanged.
    measured_part = ifft2c(fft2c(w) * mask)
    assert cosine(unmeasured_fft(v, mask), unmeasured_fft(v + measured_part, mask)) == pytest.approx(1.0, abs=1e-6)
    assert cosine(unmeasured_fft(v, mask), unmeasured_fft(measured_part + w, mask)) < 0.2


def test_descent_of_a_prior_that_points_at_the_truth(geometry) -> None:
    maps, mask = geometry
    truth, image = _random_image(2) + 3, _random_image(3) + 3
    loss, direction = descent(_TowardTruth(truth), image)
    assert loss == pytest.approx(0.5 * float((image - truth).abs().square().sum()), rel=1e-5)
    assert torch.allclose(direction, truth - image, atol=1e-5)  # sign and complex conjugation convention
    measures = point_measures(direction, image, truth, maps, mask, step_fraction=0.01)
    assert measures["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert measures["cosine_unmeasured"] == pytest.approx(1.0, abs=1e-6)
    assert measures["cosine_unmeasured_fft"] == pytest.approx(1.0, abs=1e-6)
    assert measures["gain_psnr"] > 0
    assert measures["step"] == pytest.approx(0.01 * float(image.abs().square().sum().sqrt()), rel=1e-6)
    away = point_measures(-direction, image, truth, maps, mask, step_fraction=0.01)
    assert away["cosine"] == pytest.approx(-1.0, abs=1e-6) and away["gain_psnr"] < 0


def test_descent_direction_of_tv_lowers_tv() -> None:
    image = _random_image(4)
    tv = TVPrior(weight=1.0)
    loss, direction = descent(tv, image)
    assert loss == pytest.approx(float(tv.loss(image)), rel=1e-6)
    step = 1e-3 * float(image.abs().square().sum().sqrt()) / float(direction.abs().square().sum().sqrt())
    assert float(tv.loss(image + step * direction)) < loss


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two held-out Shepp–Logan slices 48² in one ``.npy``."""
    path = tmp_path_factory.mktemp("probe-images") / "held_out.npy"
    np.save(path, builtin_anatomy((48, 48), 2))
    return path


def test_bank_probe_end_to_end_on_the_tiny_janus(tiny_janus_bank, images: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    from semrecon_core.commands.main import main

    _, bank = tiny_janus_bank
    out = tmp_path / "probe" / "results.md"
    argv = ["bank", "probe", str(bank), "--images", str(images), "--coils", "4", "--acs", "8"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    markdown = out.read_text()
    assert report["command"].startswith(f"semrecon bank probe {bank} --images {images} --acceleration 4 --coils 4")
    assert "--acs 8" in report["command"] and report["command"] in markdown
    assert [case["name"] for case in report["cases"]] == ["held_out[0]", "held_out[1]"]
    assert "RANDOM WEIGHTS" in report["prior"]
    for case in report["cases"]:
        assert case["shape"][0] == case["shape"][1] >= 48  # the simulator's grid: the image and any FOV margin
        assert 3.0 < case["acceleration"] < 5.0
        assert 0.3 < case["residual_over_noise"] < 3.0  # the true maps and phase reproduce the measured k-space
        psnr = {name: case["quality"][name]["psnr"] for name in ("zero-filled", "CG-SENSE", "CS-TV")}
        assert psnr["zero-filled"] < psnr["CG-SENSE"] < psnr["CS-TV"]
        assert all(np.isfinite(value) for value in case["loss"].values())
        assert case["tv"]["CS-TV"] < case["tv"]["CG-SENSE"]  # TV's solution has less TV than the unregularised one
        for point in ("CS-TV", "CG-SENSE"):
            for label in ("prior", "tv"):
                measures = case["at"][point][label]
                assert all(-1.0 <= measures[key] <= 1.0 for key in measures if key.startswith("cosine"))
        # TV's descent direction at the CG-SENSE image points toward the piecewise-constant truth, and a step helps.
        tv = case["at"]["CG-SENSE"]["tv"]
        assert tv["cosine"] > 0.1 and tv["cosine_unmeasured"] > 0.1 and tv["gain_psnr"] > 0
    mean_tv = np.mean([case["at"]["CG-SENSE"]["tv"]["cosine"] for case in report["cases"]])
    assert report["summary"]["at"]["CG-SENSE"]["tv"]["cosine"] == pytest.approx(mean_tv)
    verdict = report["verdict"]
    assert verdict.endswith("→ trust") == report["trust"] and ("→ do not trust" in verdict) != report["trust"]
    assert f"verdict: {verdict}" in markdown and f"verdict: {verdict}" in printed
    assert "| held_out[0] | CS-TV |" in markdown and "| **mean** | CG-SENSE |" in markdown


def test_bank_probe_refuses_bad_input_by_name(tiny_janus_bank, images: Path, tmp_path: Path, capsys) -> None:
    from semrecon_core.commands.main import main

    _, bank = tiny_janus_bank
    probe = ["bank", "probe", str(bank), "--device", "cpu"]
    undersampled = fft2c(_random_image(5)).numpy()[None]  # (coils, ky, kx)
    undersampled[:, :, ::2] = 0
    undersampled[:, :, 12:20] = fft2c(_random_image(5)).numpy()[None][:, :, 12:20]  # a fully sampled centre
    np.save(tmp_path / "under.npy", undersampled)
    (tmp_path / "foreign.safetensors").write_bytes(b"not a bank")
    cases = [
        ([*probe, "--images", str(tmp_path / "missing.npy")], "--images: "),
        ([*probe, "--images", str(images), "--acceleration", "0.5"], "--acceleration"),
        ([*probe, "--images", str(images), "--step", "0"], "--step"),
        ([*probe, "--images", str(tmp_path / "under.npy")], "undersampled"),
        (["bank", "probe", str(tmp_path / "foreign.safetensors"), "--images", str(images)], "foreign.safetensors"),
        (["bank", "probe", str(tmp_path / "none.safetensors"), "--images", str(images)], "not found"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("semrecon bank: error: ") and named in err and "Traceback" not in err
