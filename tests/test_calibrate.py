"""λ calibrated on held-out images (``semrecon bank calibrate``): λ 0 for a prior that does not help, λ > 0 for one
that does, the calibrated bank end to end through ``bank info`` and ``recon --explain``, and a λ of 0 that really
switches the prior off (no encoder) and says so.

The encoder is a tiny random SigLIP vision tower whose input is the simulated grid (72², the 64² images inside the
simulator's field-of-view margin), 8 × 8 patches, 64 channels, used at hidden state 0: the patch embedding plus the
position embedding, a linear map of each patch's normalised pixels that is invertible (64 pixels → 64 channels with
random weights). With the ``token-pca`` similarity the loss compares these tokens one by one.

How the informative prior is built (honestly: nothing in it knows the scan, only the fully sampled images): its
positives are the embeddings of the held-out images themselves as a perfect reconstruction shows them (inside the
simulator's margin), its negatives those of four zero-filled undersampled versions of each. The contrastive loss
is then lowest where every token points as the truth's token does, so its minimum is near the truth and its
gradient points toward it: it is the prior a site would wish for. The **swapped** bank (positives and negatives
exchanged) pulls toward the aliased images, and the **random** bank (P and N embeddings of uniform noise images)
toward nothing in particular: the calibration must switch both off.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semrecon_core.config import ReconConfig
from semrecon_core.data.simulate import builtin_anatomy, place_in_fov, simulate_kspace
from semrecon_core.priors.calibrate import CalibrationSettings, run_calibration, write_calibrated_bank
from tests.helpers import save_tiny_siglip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64
GRID = SIZE + 2 * (SIZE // 16)  # the simulator's field-of-view margin
LAMS = (0.0, 1e-3, 1e-2, 1e-1)
# 30 iterations: at 10 a bank of noise images "helped" too (held-out HaarPSI 0.504 at λ 0, 0.551 at 1e-3): early in a
# fit any added gradient enlarges Adam's per-parameter second moments and so shortens the data term's steps, which
# here kept the image nearer the preview. At 30 the λ-0 fit has settled and the noise bank loses (0.571 vs 0.548).
FIT = {"iterations": 30, "width": 8, "depth": 2, "start": "preview", "device": "cpu"}
SIMULATION = CalibrationSettings(lams=LAMS, coils=4, acs_width=12)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny encoder, two held-out images and the informative and swapped banks (module docstring)."""
    pytest.importorskip("transformers")
    from semrecon_core.encoders.hf_vision import HFVisionEncoder
    from semrecon_core.priors.bank import bank_from_features, embed_images
    from semrecon_core.priors.bank_sources import Source, undersampled_versions

    work = tmp_path_factory.mktemp("calibrate")
    save_tiny_siglip(work / "vit", width=64, layers=1, image_size=GRID)
    encoder = HFVisionEncoder.from_pretrained(str(work / "vit"), layers=(0,))
    images = builtin_anatomy((SIZE, SIZE), 2).astype(np.float32)
    np.save(work / "held_out.npy", images)
    truths = [torch.from_numpy(place_in_fov(image[None])[0]).to(torch.complex64)[None] for image in images]
    rng = np.random.default_rng(0)
    aliased = [
        image
        for truth in truths
        for _ in range(4)
        for image, _ in undersampled_versions(Source(Path("truth"), truth, None, ""), rng, acs_width=8)
    ]
    good, bad = embed_images(encoder, truths), embed_images(encoder, aliased)
    paths = {"encoder": work / "vit", "images": work / "held_out.npy"}
    # random: P and N the embeddings of uniform noise images (nothing in it knows any anatomy)
    noise = np.random.default_rng(1).uniform(size=(8, SIZE, SIZE)).astype(np.float32)
    noisy = [torch.from_numpy(place_in_fov(image[None])[0]).to(torch.complex64)[None] for image in noise]
    random = (embed_images(encoder, noisy[:4]), embed_images(encoder, noisy[4:]))
    banks = {"informative": (good, bad), "swapped": (bad, good), "random": random}
    for name, (positives, negatives) in banks.items():
        bank = bank_from_features(
            positives, negatives, identity=encoder.identity, similarity="token-pca", weights=(1.0,), pca_dims=(16,)
        )
        paths[name] = bank.save(work / f"{name}.safetensors")
    return paths


def _calibrate(setup: dict[str, Path], bank: str) -> dict:
    return run_calibration(setup[bank], [setup["images"]], ReconConfig(backbone="unet", **FIT), SIMULATION)


def test_an_informative_prior_gets_a_positive_lam(setup: dict[str, Path]) -> None:
    record = _calibrate(setup, "informative")
    assert record["lam"] > 0 and record["key"] == "paper/unet" and record["images"] == 2
    haarpsi = {row["lam"]: row["haarpsi"]["mean"] for row in record["summary"]}
    assert record["grid"] == list(LAMS) and haarpsi[record["lam"]] > haarpsi[0.0]
    assert [case["name"] for case in record["cases"]] == ["held_out[0]", "held_out[1]"]
    assert all(
        len(case["sha256"]) == 64 and set(case["scores"]) == {"0", "0.001", "0.01", "0.1"} for case in record["cases"]
    )
    for row in record["summary"]:
        assert {"haarpsi", "psnr", "vif"} <= set(row) and row["psnr"]["sd"] >= 0
    assert record["settings"]["layers"] == [0] and record["settings"]["encoder"] == str(setup["encoder"])
    labels = record["cases"][0]["scores"]
    assert "semantic prior off (λ 0, explicit)" in labels["0"]["label"]
    assert "+ semantic image-only prior" in labels["0.01"]["label"]


def test_a_swapped_prior_is_switched_off_and_says_so(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semrecon_core.pipeline import Pipeline
    from semrecon_core.priors import factory
    from semrecon_core.priors.bank import file_sha256, load_bank

    record = _calibrate(setup, "swapped")
    assert record["lam"] == 0.0
    before = file_sha256(setup["swapped"])
    out = write_calibrated_bank(setup["swapped"], tmp_path / "calibrated.safetensors", record)
    assert file_sha256(setup["swapped"]) == before  # the input bank is never modified
    with pytest.raises(ValueError, match="is the input bank"):
        write_calibrated_bank(setup["swapped"], setup["swapped"], record)
    calibrated = load_bank(out)
    assert calibrated.metadata["recommended"] == {"lam": {"paper/unet": 0.0}}
    assert "the prior does not help on these images: λ 0" in calibrated.describe()
    # recon with this bank and no λ: λ 0 from the calibration, and the prior is neither built nor run
    monkeypatch.setattr(factory, "build_prior", lambda *a, **k: pytest.fail("the prior was built at λ 0"))
    config = ReconConfig(backbone="unet", prior="semantic", bank=str(out), encoder=str(setup["encoder"]), **FIT)
    config = config.replace(layers=(0,), similarity="token-pca", level_weights=(1.0,))
    pipeline = Pipeline(config)
    source = f"calibrated on 2 held-out images (bank {out})"
    assert (pipeline.config.lam, pipeline.config.source("lam")) == (0.0, source)
    kspace = simulate_kspace(builtin_anatomy((SIZE, SIZE), 1)[0], coils=4, acs_width=12, seed=5)
    done = pipeline.run(kspace)
    assert done.label.endswith(f"+ semantic prior off (calibrated λ 0 on 2 held-out images (bank {out}))")
    image = done.images()[0]
    assert "semantic prior off (calibrated lambda 0 on 2 held-out images" in image.meta["GADGETRON_ImageComment"]
    assert image.meta["GADGETRON_SeqDescription"] == "_semrecon_unet_semantic-off"
    assert image.meta["SEMRECON_Lambda"] == "0"


def test_a_random_prior_is_switched_off(setup: dict[str, Path]) -> None:
    record = _calibrate(setup, "random")
    haarpsi = {row["lam"]: row["haarpsi"]["mean"] for row in record["summary"]}
    assert record["lam"] == 0.0, haarpsi


def test_calibrate_info_and_recon_explain_on_the_command_line(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    from semrecon_core.commands.main import main
    from semrecon_core.priors.bank import read_metadata

    out = tmp_path / "site" / "calibrated.safetensors"
    fit = [item for name, value in FIT.items() for item in ("--set", f"{name}={value}")]
    base = ["bank", "calibrate", str(setup["informative"]), "--images", str(setup["images"])]
    simulation = ["--coils", "4", "--acs", "12", "--lams", "0.001,0.01,0.1"]  # 0 is added
    assert main([*base, "--out", str(out), *fit, *simulation]) == 0
    printed = capsys.readouterr().out
    assert "# λ calibration (paper/unet)" in printed and f"wrote {out}: recommended λ 0.001 for paper/unet" in printed
    assert main(["bank", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "calibration paper/unet: λ 0.001 on 2 held-out images (held_out[0], held_out[1])" in info
    assert '"paper/unet": 0.001' in info and "← chosen" in info and "made by: semrecon bank calibrate" in info
    explain = ["recon", "--explain", "--backbone", "unet", "--prior", "semantic", "--bank", str(out)]
    bank_settings = ["--set", "layers=0", "--set", "level_weights=1", "--set", "similarity=token-pca"]
    assert main([*explain, "--encoder", str(setup["encoder"]), *bank_settings]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.strip().startswith("lam (λ)"))
    assert "0.001" in row and f"calibrated on 2 held-out images (bank {out})" in row
    metadata = read_metadata(out)
    assert (
        metadata["calibration"]["paper/unet"]["command"]
        == json.loads(json.dumps(metadata))["calibration"]["paper/unet"]["command"]
    )
    assert metadata["calibration"]["paper/unet"]["command"].startswith(
        f"semrecon bank calibrate {setup['informative']}"
    )
    # bad input: a named error, exit 2
    (tmp_path / "foreign.safetensors").write_bytes(b"not a bank")
    cases = [
        ([*base, "--out", str(setup["informative"])], "is the input bank"),
        ([*base, "--out", str(out), "--set", "lam=0.1"], "--set lam"),
        ([*base, "--out", str(out), "--lams", "0,-1"], "--lams"),
        ([*base, "--out", str(out), "--lams", "a,b"], "--lams"),
        ([*base[:4], str(tmp_path / "missing.npy"), "--out", str(out)], "--images: "),
        (["bank", "calibrate", str(tmp_path / "foreign.safetensors"), *base[3:], "--out", str(out)], "foreign"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("semrecon bank: error: ") and named in err and "Traceback" not in err
