"""Offline replay of whole ISMRMRD raw files through the chains (in-process and over the wire protocol)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from semrecon_core.commands.main import main  # noqa: E402
from semrecon_core.emulation.replay import replay  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "config"


def _psnr_fitted(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR (peak = reference max) after the least-squares intensity scale of ``image`` to ``reference``."""
    reference, image = reference.astype(np.float64), image.astype(np.float64)
    scale = (reference * image).sum() / (image * image).sum()
    return float(10 * np.log10(reference.max() ** 2 / ((scale * image - reference) ** 2).mean()))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shepp_logan(shepp_logan_raw: Callable[..., Path]) -> Path:
    """ismrmrd-tools phantom: noise scan, 2× readout oversampling, R = 2 with 24 ACS lines, 4 repetitions."""
    return shepp_logan_raw(matrix=128, coils=8, acs=24, repetitions=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`semrecon simulate`: 3 slices, 4 coils, 64×64, R = 2, 16 embedded ACS lines, noise scan, 2× RO."""
    path = tmp_path_factory.mktemp("small") / "small.h5"
    assert (
        main(
            [
                "simulate",
                str(path),
                "--matrix",
                "64",
                "--slices",
                "3",
                "--coils",
                "4",
                "--acceleration",
                "2",
                "--acs",
                "16",
            ]
        )
        == 0
    )
    return path


def test_shepp_logan_replay_gives_one_image_per_repetition(shepp_logan: Path) -> None:
    import h5py

    before = _digest(shepp_logan)
    result = replay(shepp_logan, overrides={"iterations": "10"})
    assert _digest(shepp_logan) == before  # the input is opened read-only
    images = result.images
    assert len(images) == 4
    with h5py.File(shepp_logan, "r") as file:
        stored = file["dataset/phantom"][0]
    phantom = np.abs(stored["real"] + 1j * stored["imag"])
    for number, image in enumerate(images):
        assert image.data.shape == (1, 1, 128, 128)  # recon matrix: oversampling removed
        assert tuple(image.matrix_size) == (128, 128, 1)
        assert tuple(image.field_of_view) == pytest.approx((300.0, 300.0, 6.0))
        assert (image.image_index, image.repetition, image.slice) == (number + 1, number, 0)
        assert image.meta["GADGETRON_ImageComment"].startswith("semrecon CG-SENSE")
        # Measured: 26.5-26.6 dB per repetition (CG-SENSE, 10 iterations, noise 0.05); zero-filled: 17-19 dB.
        assert _psnr_fitted(phantom, image.data[0, 0]) > 24.0


def test_simulated_slices_match_ground_truth(small: Path) -> None:
    import h5py

    images = replay(small, overrides={"iterations": "15"}).images
    assert [image.slice for image in images] == [0, 1, 2]
    assert [image.image_index for image in images] == [1, 2, 3]
    positions = [image.position[2] for image in images]
    assert np.diff(positions) == pytest.approx([6.0, 6.0])  # 5 mm slices + 1 mm gap
    with h5py.File(small, "r") as file:
        truth = file["dataset/ground_truth"][()]
    for image, reference in zip(images, truth, strict=True):
        assert image.data.shape[-2:] == reference.shape
        # Measured: 25.2-25.8 dB per slice (CG-SENSE, 15 iterations; zero-filled: 21.5-22.3 dB).
        assert _psnr_fitted(reference, image.data[0, 0]) > 24.0


def test_cli_display_chain_writes_series_groups_and_pngs(small: Path, tmp_path: Path) -> None:
    out, pngs = tmp_path / "images.h5", tmp_path / "png"
    code = main(
        [
            "replay",
            str(small),
            str(out),
            "--config",
            str(CONFIG / "semrecon_cgsense.xml"),
            "--set",
            "iterations=5",
            "--set",
            "series_index=3",
            "--png",
            str(pngs),
        ]
    )
    assert code == 0
    dataset = ismrmrd.Dataset(str(out), "dataset", mode="r")
    try:
        assert dataset.number_of_images("image_3") == 3
        image = dataset.read_image("image_3", 0)
        header = dataset.read_xml_header()
    finally:
        dataset.close()
    assert b"ismrmrdHeader" in header
    assert image.data.dtype == np.uint16 and 1000 < int(image.data.max()) <= 4095  # AutoScale → FloatToUShort
    assert image.image_series_index == 3
    assert len(list(pngs.glob("*.png"))) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_protocol_replay_gives_the_same_images(small: Path) -> None:
    """The gadget launched as ``python -m gadgetron`` over the wire gives what the in-process run gives."""
    overrides = {"iterations": "3", "device": "cpu"}
    local = replay(small, overrides=overrides).images
    remote = replay(small, overrides=overrides, protocol=True).images
    assert len(remote) == len(local) == 3
    for a, b in zip(local, remote, strict=True):
        assert bytes(a.getHead()) == bytes(b.getHead())
        timings = ("SEMRECON_Seconds", "SEMRECON_FitSeconds")  # wall times differ from run to run
        assert {k: v for k, v in a.meta.items() if k not in timings} == {
            k: v for k, v in b.meta.items() if k not in timings
        }
        assert np.array_equal(a.data, b.data), "pixels differ between in-process and protocol replay"


def test_replay_errors_name_the_problem(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.h5"
    assert main(["replay", str(tmp_path / "missing.h5"), str(out)]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert main(["replay", str(small), str(out), "--set", "iteratons=3"]) == 2
    assert "iteratons" in capsys.readouterr().err
    chain = tmp_path / "chain.xml"
    chain.write_text(
        "<configuration><version>2</version><stream><gadget><name>x</name><dll>y</dll>"
        "<classname>GrappaGadget</classname></gadget></stream></configuration>"
    )
    assert main(["replay", str(small), str(out), "--config", str(chain)]) == 2
    err = capsys.readouterr().err
    assert "GrappaGadget" in err and "chain.xml" in err
    assert not out.exists()


def test_replay_refuses_to_overwrite_its_input(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    scan = tmp_path / "scan.h5"
    shutil.copyfile(small, scan)
    before = _digest(scan)
    (tmp_path / "link.h5").symlink_to(scan)
    (tmp_path / "hard.h5").hardlink_to(scan)
    for output in (scan, tmp_path / "link.h5", tmp_path / "hard.h5", tmp_path / "." / "scan.h5"):
        assert main(["replay", str(scan), str(output)]) == 2
        err = capsys.readouterr().err
        assert f"OUT {output}: would overwrite the input file {scan}" in err
    assert main(["replay", str(scan), str(tmp_path / "out.h5"), "--png", str(scan)]) == 2
    assert f"--png {scan}: would overwrite the input file" in capsys.readouterr().err
    assert _digest(scan) == before
    assert not (tmp_path / "out.h5").exists()


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small U-Net checkpoint from ``semrecon pretrain`` on a few simulated anatomy images."""
    from semrecon_core.data.simulate import builtin_anatomy

    folder = tmp_path_factory.mktemp("pretrain")
    for number, image in enumerate(builtin_anatomy((48, 48), slices=4)):
        np.save(folder / f"image_{number}.npy", image)
    checkpoint = folder / "unet.safetensors"
    command = ["pretrain", str(checkpoint), "--images", str(folder), "--width", "4", "--depth", "2", "--epochs", "1"]
    command += ["--coils", "4", "--acceleration", "2", "--acs-width", "12"]
    assert main(command) == 0
    return checkpoint


def test_semantic_chain_refuses_a_missing_checkpoint_and_says_how_to_make_one(
    tiny_janus_bank: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped semantic chain never starts a U-Net from random weights: no checkpoint, no run."""
    tiny, bank = tiny_janus_bank
    scan = tmp_path / "scan.h5"
    assert main(["simulate", str(scan), "--matrix", "48", "--coils", "4", "--acceleration", "2", "--acs", "12"]) == 0
    capsys.readouterr()
    chain = CONFIG / "semrecon_semantic.xml"
    sets = ["--set", f"encoder={tiny}", "--set", f"bank={bank}", "--set", "device=cpu"]
    assert main(["replay", str(scan), str(tmp_path / "out.h5"), "--config", str(chain), *sets]) == 2
    err = capsys.readouterr().err
    assert "property 'checkpoint': /opt/semrecon/checkpoints/unet.safetensors does not exist" in err
    assert "semrecon pretrain" in err and "Traceback" not in err
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("budget", [pytest.param(4.0, id="4 s"), pytest.param(20.0, id="20 s", marks=pytest.mark.slow)])
def test_semantic_chain_sends_a_preview_then_the_semantic_volume_within_the_time_budget(
    tiny_janus_bank: tuple[Path, Path], unet_checkpoint: Path, tmp_path: Path, budget: float
) -> None:
    """config/semrecon_semantic.xml end to end on a 3-slice scan: preview series, then the semantic series.

    Far more iterations than the budget allows: the fit stops at the budget and the replay ends within the
    budget plus the fixed costs the images report (coil maps, preview, prior loading), plus reading the file.
    """
    tiny, bank = tiny_janus_bank
    overrides = {
        "encoder": str(tiny),
        "bank": str(bank),
        "checkpoint": str(unet_checkpoint),
        "iterations": "1000000",
        "time_budget_s": str(budget),
        "device": "cpu",
    }
    scan = tmp_path / "three_slices.h5"
    simulate = ["simulate", str(scan), "--matrix", "48", "--slices", "3", "--coils", "4", "--acceleration", "2"]
    assert main([*simulate, "--acs", "12"]) == 0
    result = replay(scan, chain=CONFIG / "semrecon_semantic.xml", overrides=overrides)
    series = [(image.image_series_index, image.image_index, image.slice) for image in result.images]
    assert series == [(2, 1, 0), (2, 2, 1), (2, 3, 2), (1, 1, 0), (1, 2, 1), (1, 3, 2)]  # preview first
    previews, semantic = result.images[:3], result.images[3:]
    for image in previews:
        assert image.meta["GADGETRON_ImageComment"].startswith("semrecon preview CG-SENSE")
    for image in semantic:
        comment = image.meta["GADGETRON_ImageComment"]
        assert image.meta["GADGETRON_DataRole"] == "Image", comment
        assert image.meta["GADGETRON_SeqDescription"] == "_semrecon_unet_semantic"
        assert "warm start, LoRA rank 4" in comment and "random" in comment.lower()  # tiny weights say so
        assert comment.endswith("(time budget)"), comment
        assert image.data.dtype == np.uint16 and image.data.max() > 0
    fit = float(semantic[0].meta["SEMRECON_FitSeconds"])
    fixed = float(semantic[0].meta["SEMRECON_Seconds"]) - fit + float(previews[0].meta["SEMRECON_Seconds"])
    assert budget - 0.5 <= fit <= budget + 3.0, f"fit {fit:.1f} s for a {budget:g} s budget"  # + one iteration
    assert result.seconds <= budget + fixed + 3.0, f"replay {result.seconds:.1f} s, fixed costs {fixed:.1f} s"
