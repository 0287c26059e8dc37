"""``semrecon study``: a tiny study end to end, resuming, Ray, the Wilcoxon numbers and argument errors.

The study: two 32² cases — a magnitude image (15 simulated coils) and a fully sampled fastMRI-style file —
reconstructed with sense and a tiny U-Net, priors none / TV / semantic (the session's tiny random Janus and
its bank), R = 2, two Adam iterations. Its numbers mean nothing; the tests check what the runner does with them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from semrecon_core.commands import main as cli

SETTINGS = 5  # sense: none, tv; unet: none, tv, semantic


def _image(seed: int) -> np.ndarray:
    """A 32² magnitude image: an ellipse with texture, different per seed."""
    yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
    rng = np.random.default_rng(seed)
    inside = (xx / 0.8) ** 2 + (yy / 0.65) ** 2 < 1
    return (inside * (0.6 + 0.4 * rng.random((32, 32))) + 0.3 * (np.hypot(xx - 0.2, yy) < 0.25)).astype(np.float32)


def _fastmri_file(path: Path, seed: int) -> Path:
    """A fully sampled fastMRI-style multicoil file, 32 × 32 (readout 2× oversampled along the rows)."""
    import h5py

    from semrecon_core.data.simulate import _coil_kspace

    full = _coil_kspace(_image(seed)[None], 4, np.random.default_rng(seed), oversampling=2)  # (1, 4, 32, 64)
    xml = """<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<experimentalConditions><H1resonanceFrequency_Hz>127000000</H1resonanceFrequency_Hz></experimentalConditions>
<encoding><encodedSpace><matrixSize><x>64</x><y>32</y><z>1</z></matrixSize>
<fieldOfView_mm><x>128</x><y>64</y><z>3</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>32</x><y>32</y><z>1</z></matrixSize>
<fieldOfView_mm><x>64</x><y>64</y><z>3</z></fieldOfView_mm></reconSpace>
<encodingLimits/><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""
    with h5py.File(path, "w") as file:
        file["kspace"] = np.swapaxes(full, -1, -2).astype(np.complex64)
        file["ismrmrd_header"] = xml
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("study-cases")
    np.save(folder / "case_a.npy", _image(1))
    np.save(folder / "tune.npy", _image(3))
    return {"a": folder / "case_a.npy", "b": _fastmri_file(folder / "case_b.h5", 2), "tune": folder / "tune.npy"}


@pytest.fixture(scope="module")
def study_args(cases: dict[str, Path], tiny_janus_bank: tuple[Path, Path]) -> list[str]:
    from semrecon_core.priors.bank import read_metadata

    encoder, bank = tiny_janus_bank
    similarity = read_metadata(bank)["similarity"]
    return [
        "study",
        str(cases["a"]),
        str(cases["b"]),
        "--bank",
        str(bank),
        "--encoder",
        str(encoder),
        "--set",
        f"similarity={similarity}",  # the session bank's, whatever the preset's default
        "--backbones",
        "sense,unet",
        "--priors",
        "none,tv,semantic",
        "--accelerations",
        "2",
        "--acs",
        "12",
        "--iterations",
        "2",
        "--width",
        "4",
        "--depth",
        "2",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def serial(study_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study run once serially (figures: ``test_figures_of_the_stored_items``)."""
    ray_before = "ray" in sys.modules
    out = tmp_path_factory.mktemp("study-serial") / "out"
    assert cli.main([*study_args, "--out", str(out), "--no-figures"]) == 0
    if not ray_before:
        assert "ray" not in sys.modules, "the serial path (--workers 1) imported Ray"
    return out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def test_a_tiny_study_writes_tables_and_items(serial: Path) -> None:
    for name in ("table.md", "results.csv", "results.json", "study.json"):
        assert (serial / name).is_file(), name
    rows = _rows(serial)
    assert len(rows) == 2 * SETTINGS
    assert {(r["backbone"], r["prior"]) for r in rows} == {
        ("sense", "none"),
        ("sense", "tv"),
        ("unet", "none"),
        ("unet", "tv"),
        ("unet", "semantic"),
    }
    assert all(np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 and r["tenengrad"] > 0 for r in rows)
    assert all(0 < r["haarpsi"] <= 1 and r["vif"] > 0 for r in rows)
    assert len((serial / "results.csv").read_text().splitlines()) == 1 + 2 * SETTINGS
    table = (serial / "table.md").read_text()
    assert "## Table 1 — preset `paper`" in table and "| unet | semantic |" in table
    assert "HaarPSI ↑ | VIF ↑" in table
    assert "RANDOM WEIGHTS" in table and "not independent of the semantic prior" in table
    assert all(r["perceptual"] is not None for r in rows)  # the bank's encoder gives the embedding distance
    document = json.loads((serial / "results.json").read_text())
    if document["study"]["scoring"]["lpips_reason"]:  # no weights here: a column saying so, never a number
        assert all(r["lpips"] is None for r in rows) and "LPIPS (AlexNet): unavailable" in table
    paths = sorted((serial / "items" / "test").glob("*/*.json"))
    assert len(paths) == 2 * SETTINGS and all(p.with_suffix(".npy").is_file() for p in paths)
    records = [json.loads(p.read_text()) for p in paths]
    trajectory = next(r for r in records if r["case"] == "case_a" and r["prior"] == "semantic")["trajectory"]
    assert trajectory and len(trajectory[-1]["levels"]) == 3  # the bank's three levels at every flush
    assert all(r["trajectory"] is None for r in records if r["prior"] != "semantic" or r["case"] != "case_a")


def test_case_panel_marks_the_zoom_window_where_the_reference_has_structure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'semrecon[study]')")
    from semrecon_core.study.figures import case_panel, zoom_window

    reference = np.zeros((1, 48, 48), np.float32)
    reference[0, 30:40, 6:16] = 1.0  # the only edges: bottom left
    top, left, size = zoom_window(reference[0])
    assert size == 12 and top <= 30 < top + size and left <= 6 < left + size
    record = {"backbone": "unet", "prior": "tv", "scores": {"psnr": 20.0, "ssim": 0.5}}
    path = case_panel(tmp_path / "panel.png", reference, [(record, 0.9 * reference)], title="t RANDOM WEIGHTS")
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # UMAP compiles its numba kernels on first use (10–25 s here)
def test_figures_of_the_stored_items(serial: Path, study_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("umap", reason="umap-learn is not installed (pip install 'semrecon[study]')")
    assert cli.main([*study_args, "--out", str(serial)]) == 0
    assert f"0 item(s) computed, {2 * SETTINGS} reused" in capsys.readouterr().err
    figures = sorted(p.name for p in (serial / "figures").glob("*.png"))
    assert figures == ["case_a-paper-R2.png", "case_b-paper-R2.png", "umap-paper-R2.png"]


def test_a_rerun_recomputes_nothing_and_a_lost_item_is_recomputed_alone(
    serial: Path, study_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    table = (serial / "table.md").read_text()
    items = sorted((serial / "items" / "test").glob("*/*.json"))
    stamps = [p.stat().st_mtime_ns for p in items]
    capsys.readouterr()
    assert cli.main([*study_args, "--out", str(serial), "--no-figures"]) == 0
    assert f"0 item(s) computed, {2 * SETTINGS} reused" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in items] == stamps
    assert (serial / "table.md").read_text() == table
    lost = next(p for p in items if p.name.startswith("unet-tv"))
    lost.unlink()
    assert cli.main([*study_args, "--out", str(serial), "--no-figures"]) == 0
    assert f"1 item(s) computed, {2 * SETTINGS - 1} reused" in capsys.readouterr().err
    assert lost.is_file() and (serial / "table.md").read_text() == table  # same seed, same numbers


def test_wilcoxon_numbers_are_scipys_on_the_stored_values(serial: Path) -> None:
    from scipy.stats import wilcoxon

    document = json.loads((serial / "results.json").read_text())
    rows = document["rows"]
    tests = document["wilcoxon"]
    assert {t["metric"] for t in tests} >= {"psnr", "ssim", "tenengrad"} and all(t["backbone"] == "unet" for t in tests)
    for test in tests:

        def values(prior: str, test: dict = test) -> list[float]:
            by_case = {r["case"]: r[test["metric"]] for r in rows if r["backbone"] == "unet" and r["prior"] == prior}
            return [by_case[case] for case in test["cases"]]

        semantic, tv = values("semantic"), values("tv")
        assert test["n"] == len(semantic) == 2
        if test["p"] is None:
            assert "all 2 differences are zero" in test["note"] and semantic == tv
            continue
        expected = wilcoxon(semantic, tv)
        assert test["statistic"] == float(expected.statistic) and test["p"] == float(expected.pvalue)
        assert "no p below 0.5 is possible" in test["note"]  # 2 non-zero differences: 2 / 2² = 0.5


def test_wilcoxon_without_a_test_says_why() -> None:
    from scipy.stats import wilcoxon

    from semrecon_core.study.tables import wilcoxon_pair

    one = wilcoxon_pair([1.0], [0.5])
    assert one["p"] is None and "n = 1 paired case " in one["note"]
    equal = wilcoxon_pair([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert equal["p"] is None and "all 3 differences are zero" in equal["note"]
    x = [30.1, 29.5, 31.2, 28.7, 30.0, 29.9, 31.5]
    y = [29.0, 29.6, 30.1, 28.0, 29.1, 29.9, 30.2]
    result = wilcoxon_pair(x, y)
    expected = wilcoxon(x, y)
    assert result["p"] == float(expected.pvalue) and result["statistic"] == float(expected.statistic)
    assert result["n"] == 7 and result["nonzero"] == 6 and "1 zero difference(s) dropped" in result["note"]


def test_ray_with_two_workers_gives_the_same_table(
    serial: Path, study_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'semrecon[study]')")
    out = tmp_path / "ray"
    assert cli.main([*study_args, "--out", str(out), "--workers", "2", "--no-figures"]) == 0
    assert f"{2 * SETTINGS} item(s) computed, 0 reused" in capsys.readouterr().err
    assert (out / "table.md").read_text() == (serial / "table.md").read_text()
    assert (out / "results.csv").read_text() == (serial / "results.csv").read_text()


def test_lam_is_chosen_on_the_tuning_case(cases: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    args = ["study", str(cases["a"]), "--out", str(out), "--backbones", "sense", "--priors", "tv"]
    args += ["--accelerations", "2", "--acs", "12", "--tune-on", str(cases["tune"]), "--tune-grid", "0.1,1,10"]
    assert cli.main([*args, "--no-progress", "--no-figures"]) == 0
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["case"] == "tune"
    (setting,) = tuning["settings"]
    best = max(setting["candidates"], key=lambda c: c["psnr"])
    assert setting["lam"] == best["lam"]
    assert [c["lam"] for c in setting["candidates"]] == pytest.approx([3e-4, 3e-3, 3e-2])
    (row,) = _rows(out)
    assert row["lam"] == setting["lam"] and row["lam_source"].startswith("tuned on `tune`")
    assert "tuned on `tune`" in (out / "table.md").read_text()
    assert not (out / "items" / "test" / "tune").exists()  # the tuning case is never a test case


def test_lam_tuned_for_some_priors_at_one_acceleration(
    cases: dict[str, Path], study_args: list[str], tmp_path: Path
) -> None:
    """--tune-priors semantic --tune-accelerations 2: TV keeps its default, R = 2.5 takes the λ tuned at R = 2."""
    out = tmp_path / "tuned-some"
    args = [a for a in study_args if a != "--no-progress"]
    args[args.index("--accelerations") + 1] = "2,2.5"
    args[args.index("--iterations") + 1] = "1,unet=2"
    args += ["--out", str(out), "--tune-on", str(cases["tune"]), "--tune-grid", "0.5,2"]
    args += ["--tune-priors", "semantic", "--tune-accelerations", "2", "--no-progress", "--no-figures"]
    assert cli.main(args) == 0
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["priors"] == ["semantic"] and tuning["accelerations"] == [2.0]
    (setting,) = tuning["settings"]
    assert (setting["backbone"], setting["prior"], setting["acceleration"]) == ("unet", "semantic", 2.0)
    rows = _rows(out)
    semantic = [r for r in rows if r["prior"] == "semantic"]
    assert {r["acceleration"] for r in semantic} == {2.0, 2.5}
    assert all(r["lam"] == setting["lam"] for r in semantic)
    assert all("applied at R = 2.5" in r["lam_source"] for r in semantic if r["acceleration"] == 2.5)
    assert all(r["lam_source"] == "preset default" for r in rows if r["prior"] == "tv")
    assert all(r["iterations"] == 2 for r in rows if r["backbone"] == "unet")
    assert "unet: iterations 2" in (out / "table.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backbones", "sense,foo"], "--backbones: unknown foo"),
        (["--priors", "semantic"], "--priors includes semantic: give an embedding bank"),
        (["--workers", "0"], "--workers: expected at least 1"),
        (["--lam", "tv"], "--lam: expected PRIOR=VALUE"),
        (["--accelerations", "0.5"], "--accelerations: expected R >= 1"),
        (["--accelerations", "8"], "ACS lines exceed"),
        (["--set", "prior=tv"], "--set prior: set by the study's grid"),
        (["--tune-on", "CASE_A"], "the tuning case is also a test case"),
        (["--tune-accelerations", "3"], "--tune-accelerations: 3 not among --accelerations"),
        (["--tune-priors", "none"], "--tune-priors: unknown none"),
        (["--iterations", "300,sense=2"], "--iterations sense=2: unknown deep backbone 'sense'"),
        (["--width", "unet=0"], "--width: expected a positive integer or BACKBONE=INTEGER"),
        (["--trajectory-case", "nope"], "--trajectory-case nope: not a case of this study"),
        (["--perceptual", "/nonexistent/model"], "'/nonexistent/model': no such directory"),
    ],
)
def test_bad_arguments_are_errors_with_exit_status_2(
    cases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    extra = [str(cases["a"]) if item == "CASE_A" else item for item in extra]
    args = ["study", str(cases["a"]), "--out", str(tmp_path / "out"), "--acs", "12", "--accelerations", "2"]
    args += ["--no-progress", *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("semrecon study: error:") and message in err
    assert not (tmp_path / "out" / "items").exists()


def test_missing_case_and_missing_extra_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["study", str(tmp_path / "none.npy"), "--out", str(tmp_path / "out")]) == 2
    assert "none.npy: no such case file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: CASES and --out are required
        cli.main(["study"])
    assert exit_info.value.code == 2
    from semrecon_core.study import require

    with pytest.raises(ImportError, match=r"pip install 'semrecon\[study\]'"):
        require("semrecon_no_such_package", "this test")


def test_the_trajectory_of_an_image_language_bank_carries_the_models_answers(tiny_janus: Path) -> None:
    import torch

    from semrecon_core.config import ReconConfig
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.encoders.janus import JanusLanguageEncoder
    from semrecon_core.pipeline import Pipeline
    from semrecon_core.priors.bank import bank_from_features, embed_images
    from semrecon_core.priors.semantic import SemanticPrior
    from semrecon_core.study.tasks import TrajectoryRecorder

    language = JanusLanguageEncoder.from_pretrained(str(tiny_janus))
    generator = torch.Generator().manual_seed(0)
    positives = [torch.rand(1, 32, 32, generator=generator).to(torch.complex64) for _ in range(2)]
    negatives = [p + 0.5 * torch.roll(p, 8, dims=-2) for p in positives]  # aliased copies
    bank = bank_from_features(
        embed_images(language, positives), embed_images(language, negatives), identity=language.identity,
        similarity="centred", weights=(1.0,),
    )  # fmt: skip
    prior = SemanticPrior(language, bank)
    image = (np.eye(64, dtype=np.float32) + 0.1)[None]  # one slice with structure
    kspace = simulate_kspace(image, coils=4, acceleration=2, acs_width=16, mask_kind="gaussian", seed=0)
    config = ReconConfig(
        backbone="unet", prior="semantic", preset="public-code", iterations=4, width=8, depth=2, calib_width=16,
        lam=0.1, device="cpu",
    )  # fmt: skip
    recorder = TrajectoryRecorder(prior)
    with recorder:
        Pipeline(config, prior=prior).run(kspace, callback=recorder)
    assert not prior.trace_answers  # restored: later items sharing the prior do not decode at every flush
    assert recorder.points, "no flush reached the recorder"
    for point in recorder.points:
        assert len(point["answer"]) == 1 and set(point["answer"][0]) >= {"answer", "choice", "p_high", "p_low"}


def test_a_bank_calibrated_to_lam_0_runs_its_semantic_rows_with_the_prior_off(
    study_args: list[str], tiny_janus_bank: tuple[Path, Path], tmp_path: Path
) -> None:
    """A bank whose calibration switched the prior off: the semantic rows say so, the trajectory case has none."""
    from semrecon_core.priors.calibrate import write_calibrated_bank

    _, bank = tiny_janus_bank
    record = {"key": "paper/unet", "lam": 0.0, "images": 2, "summary": [], "cases": []}
    calibrated = write_calibrated_bank(bank, tmp_path / "calibrated.safetensors", record)
    argv = [str(calibrated) if word == str(bank) else word for word in study_args]
    argv = [*argv[: argv.index("--backbones")], "--backbones", "unet", "--priors", "semantic", "--accelerations", "2"]
    argv += ["--acs", "12", "--iterations", "2", "--width", "4", "--depth", "2", "--no-progress"]
    out = tmp_path / "out"
    assert cli.main([*argv, "--out", str(out), "--no-figures", "--trajectory-case", "case_a"]) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["prior"] == "semantic" for r in rows)
    records = [json.loads(p.read_text()) for p in sorted((out / "items" / "test").glob("*/*.json"))]
    assert all("semantic prior off (calibrated λ 0 on 2 held-out images" in r["label"] for r in records), records
    assert all(r["trajectory"] is None for r in records)
