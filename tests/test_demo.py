"""``semrecon demo --fast``: completes without real Janus weights and labels the random encoder everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from semrecon_core.cli import main  # noqa: E402


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


def test_demo_fast_without_weights(tmp_path: Path, no_hub: None, capsys: pytest.CaptureFixture[str]) -> None:
    from semrecon_core.data.images import read_images

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast", "--iterations", "3", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "RANDOM WEIGHTS" in err and "--allow-download" in err and "expect about" in err
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["random_weights"] is True
    methods = [row["method"] for row in summary["methods"]]
    assert methods[:3] == ["zero-filled", "CG-SENSE", "CS-TV"]
    assert "RANDOM WEIGHTS" in methods[3] and "RANDOM WEIGHTS" in summary["methods"][3]["label"]
    for row in summary["methods"]:
        assert row["psnr_db"] > 10 and 0 < row["ssim"] <= 1 and row["tenengrad"] > 0
    by_method = {row["method"]: row for row in summary["methods"]}
    assert by_method["CS-TV"]["psnr_db"] > by_method["zero-filled"]["psnr_db"]
    assert "RANDOM WEIGHTS" in (out / "metrics.md").read_text()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = read_images(out / "images.h5")
    assert len(images) == 4
    comments = [image.meta["GADGETRON_ImageComment"] for image in images]
    assert "RANDOM WEIGHTS" in comments[3] and "RANDOM" not in comments[1]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_demo_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "d"), "--size", "8"]) == 2
    assert "--size" in capsys.readouterr().err
