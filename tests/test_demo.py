"""``semrecon demo --fast``: completes without real Janus weights and labels the random encoder everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from semrecon_core.commands.main import main
from semrecon_core.data.simulate import builtin_anatomy
from semrecon_core.metrics import psnr, ssim

# (PSNR dB, SSIM) each method of `semrecon demo --fast --iterations 150` must beat against the ground truth, in the
# order of the table. Measured (64², 8 coils, R = 4, seed 0): zero-filled 18.3 dB / 0.67, CG-SENSE 21.7 / 0.77,
# CS-TV 23.4 / 0.80, SIREN (one per slice, lr 1e-4) + random-weight centred semantic prior after 150 iterations
# 15.2 / 0.39. An all-zero image scores 12.3 dB / 0.25, the best constant one 13.5 dB / 0.14.
THRESHOLDS = [(17.0, 0.6), (20.0, 0.7), (22.0, 0.75), (14.0, 0.3)]


@pytest.fixture(autouse=True)
def one_thread():
    """The small demo runs fastest on one thread, also on a busy CI machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty HuggingFace cache and no hub access: the real Janus cannot be found."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_thresholds_reject_an_empty_or_flat_image() -> None:
    truth = builtin_anatomy((64, 64))
    for baseline in (np.zeros_like(truth), np.full_like(truth, truth.mean())):  # the mean: the best flat image
        for low_psnr, low_ssim in THRESHOLDS:
            assert psnr(truth, baseline) < low_psnr and ssim(truth, baseline) < low_ssim


def test_demo_fast_without_weights(tmp_path: Path, no_hub: None, capsys: pytest.CaptureFixture[str]) -> None:
    from semrecon_core.data.images import read_images

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast", "--iterations", "150", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "RANDOM WEIGHTS" in err and "--allow-download" in err and "expect about" in err
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["random_weights"] is True
    methods = [row["method"] for row in summary["methods"]]
    assert methods[:3] == ["zero-filled", "CG-SENSE", "CS-TV"]
    assert "RANDOM WEIGHTS" in methods[3] and "RANDOM WEIGHTS" in summary["methods"][3]["label"]
    by_method = {row["method"]: row for row in summary["methods"]}
    assert by_method["CS-TV"]["psnr_db"] > by_method["zero-filled"]["psnr_db"]
    assert "RANDOM WEIGHTS" in (out / "metrics.md").read_text()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = read_images(out / "images.h5")
    assert len(images) == 4
    # the written images against the simulation's ground truth; the reported metrics are theirs
    truth = builtin_anatomy((64, 64))
    for image, row, (low_psnr, low_ssim) in zip(images, summary["methods"], THRESHOLDS, strict=True):
        magnitude = image.data.reshape(truth.shape)
        assert psnr(truth, magnitude) == pytest.approx(row["psnr_db"], abs=0.01)
        assert ssim(truth, magnitude) == pytest.approx(row["ssim"], abs=1e-4)
        assert row["psnr_db"] > low_psnr and row["ssim"] > low_ssim and row["tenengrad"] > 0, row
    comments = [image.meta["GADGETRON_ImageComment"] for image in images]
    assert "RANDOM WEIGHTS" in comments[3] and "RANDOM" not in comments[1]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_demo_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "d"), "--size", "8"]) == 2
    assert "--size" in capsys.readouterr().err
