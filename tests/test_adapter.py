"""``semrecon encoder adapt``: a head trained on a frozen encoder, written, loaded with its base, used by a bank.

The base is a tiny random SigLIP vision tower (64² input, 8 × 8 patches) made offline: what it learns means nothing
for a pretrained encoder, but every step of the path runs as on the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semrecon_core.commands.main import main
from semrecon_core.data.simulate import builtin_anatomy
from tests.helpers import save_tiny_siglip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SigLIP and five fully sampled phantom slices as separate files."""
    pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("adapt")
    save_tiny_siglip(work / "vit", width=32, layers=2, image_size=64)
    images = work / "positives"
    images.mkdir()
    for k, plane in enumerate(builtin_anatomy((64, 64), 5)):
        np.save(images / f"slice_{k}.npy", np.roll(plane, 3 * k, axis=1))
    return {"vit": work / "vit", "positives": images, "work": work}


def test_adapt_writes_a_head_that_loads_with_its_base_and_builds_a_bank(
    site: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from semrecon_core.encoders.adapter import AdaptedEncoder, load_hf_vision
    from semrecon_core.encoders.hf_vision import HFVisionEncoder
    from semrecon_core.priors.bank import read_metadata

    out = site["work"] / "adapter"
    before = {p.name: p.read_bytes() for p in site["positives"].iterdir()}
    argv = ["encoder", "adapt", str(out), "--encoder", str(site["vit"]), "--layers", "1,2", "--weights", "0.5,1"]
    argv += ["--positives", str(site["positives"]), "--dim", "8", "--steps", "40", "--views", "2", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "validation AUC" in printed
    assert {p.name: p.read_bytes() for p in site["positives"].iterdir()} == before  # inputs untouched
    record = json.loads((out / "adapter.json").read_text())
    assert record["layers"] == [1, 2] and record["dim"] == 8 and record["widths"] == [32, 32]
    assert record["train_images"] == 3 and record["validation_images"] == 2
    assert record["embeddings"] == 5 * (1 + 4) * 2  # positives and their 4 negatives, 2 views each
    assert 0.0 <= record["validation_auc"] <= 1.0 and 0.0 <= record["validation_auc_frozen"] <= 1.0
    assert record["train_auc"] > 0.9  # the head fits its own training images
    assert record["command"].startswith(f"semrecon encoder adapt {out} --encoder {site['vit']} --layers 1,2")
    assert "--dim 8 --views 2" in record["command"] and "--steps 40" in record["command"]
    encoder = load_hf_vision(str(out), layers=(1, 2))
    assert isinstance(encoder, AdaptedEncoder) and "MR-quality head" in encoder.label
    base = HFVisionEncoder.from_pretrained(str(site["vit"]), layers=(1, 2))
    assert encoder.identity["revision"].startswith(base.revision + "+head:")
    image = torch.from_numpy(builtin_anatomy((64, 64), 2)).to(torch.complex64).requires_grad_(True)
    features = encoder.encode(image)
    assert [tuple(f.shape) for f in features] == [(2, 8), (2, 8)]
    features[1].sum().backward()
    assert image.grad is not None and float(image.grad.abs().max()) > 0  # differentiable in the image
    with pytest.raises(ValueError, match="trained on layers 1/2"):
        load_hf_vision(str(out), layers=(2,))
    # a bank of the adapted encoder, through the command line; its identity is not the frozen encoder's
    bank = site["work"] / "bank.safetensors"
    build = ["bank", "build", str(bank), "--encoder", str(out), "--family", "hf-vision", "--layers", "1,2"]
    build += ["--weights", "0.5,1", "--positives", str(site["positives"]), "--device", "cpu"]
    assert main(build) == 0
    identity = read_metadata(bank)["encoder"]
    assert identity["adapter"]["head_sha256"] == encoder.sha256 and identity["revision"] != base.revision


def test_adapt_refuses_bad_input(site: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["encoder", "adapt", str(site["work"] / "refused"), "--encoder", str(site["vit"]), "--layers", "1,2"]
    cases = [
        ([*base, "--positives", str(site["positives"]), "--held-out", "4"], "--held-out"),
        ([*base, "--positives", str(site["positives"]), "--weights", "1"], "--weights"),
        ([*base, "--positives", str(site["work"] / "missing")], "missing"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err
    assert not (site["work"] / "refused").exists()
