"""``semrecon readers``: the blinded kit, the scoring server's access rules and the analysis against a hand computation.

The kit holds two methods (``unet/semantic``, ``unet/tv``) × three cases of small ``.npy`` images whose file names
carry a patient name; the server is exercised through Flask's test client (no socket). The browser end to end is in
``test_readers_browser.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from semrecon_core.commands import main as cli
from tests.helpers import READER_METHODS, check_reader_analysis, planned_score, reader_study_inputs

pytest.importorskip("flask")

LEAKS = ("unet", "semantic", "patient", "doe_", ".npy", "case 1", "case1", "smith")
"""Looked for, in any case, in what a reader may see; in binary files (PNG, DICOM) exact and at least 5 bytes long,
so that compressed or random bytes cannot match by chance."""
BINARY_LEAKS = (
    b"unet/",
    b"semantic",
    b"patient_doe",
    b".npy",
    b"Smith",
    b"SMITH",
    b"Smith-4711",
    b"19700101",
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return reader_study_inputs(tmp_path_factory.mktemp("reader-inputs"))


def _export(inputs: dict[str, list[Path]], out: Path, *extra: str) -> int:
    methods = [f"--method={m}={','.join(map(str, files))}" for m, files in inputs.items()]
    return cli.main(["readers", "export", *methods, "--out", str(out), "--seed", "7", *extra])


@pytest.fixture(scope="module")
def kit(inputs: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reader-kit") / "kit"
    assert _export(inputs, out) == 0
    return out


def _leaks(data: bytes, *, binary: bool = False) -> list[str]:
    if binary:
        return [word.decode() for word in BINARY_LEAKS if word in data]
    lowered = data.lower()
    return [word for word in LEAKS if word.encode() in lowered]


def test_the_kit_is_blinded_and_the_key_maps_every_image(kit: Path, inputs: dict[str, list[Path]]) -> None:
    from semrecon_core.readers.kit import load_key, load_kit

    public = [p for p in kit.rglob("*") if p.is_file() and p.name != "key.json"]
    assert {p.parent.name for p in public} == {"images", "kit"}
    for path in public:
        binary = path.suffix == ".png"
        assert not _leaks(path.read_bytes(), binary=binary), (path, _leaks(path.read_bytes(), binary=binary))
    loaded, key = load_kit(kit), load_key(kit)
    assert len(loaded.screens) == 6 and all(len(s) == 1 for s in loaded.screens)
    assert set(key["images"]) == loaded.ids and all(re.fullmatch("[0-9a-f]{16}", i) for i in loaded.ids)
    assert sorted((e["method"], e["case"]) for e in key["images"].values()) == sorted(
        (m, f"case {c}") for m in READER_METHODS for c in (1, 2, 3)
    )
    assert (kit / "key.json").stat().st_mode & 0o077 == 0
    assert not list(kit.parent.glob(".*.tmp"))


def test_both_methods_of_a_case_share_one_window(kit: Path, inputs: dict[str, list[Path]]) -> None:
    from PIL import Image

    from semrecon_core.readers.kit import load_key

    key = load_key(kit)
    case = 2
    pooled = np.concatenate([np.load(inputs[m][case - 1]).ravel() for m in READER_METHODS])
    high = float(np.percentile(pooled, 99.5))
    for image_id, entry in key["images"].items():
        if entry["case"] != f"case {case}":
            continue
        assert entry["window"] == [0.0, pytest.approx(high)]
        source = np.load(inputs[entry["method"]][case - 1])
        with Image.open(kit / "images" / f"{image_id}.png") as picture:
            assert picture.mode == "L" and not picture.info  # no text chunk, nothing but pixels
            pixels = np.asarray(picture)
        np.testing.assert_array_equal(pixels, np.round(np.clip(source / high, 0, 1) * 255).astype(np.uint8))


def test_dicom_inputs_give_blinded_dicom(inputs: dict[str, list[Path]], tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    series = tmp_path / "Smith_series"
    series.mkdir()
    for case, source in enumerate(inputs["unet/tv"]):
        pixels = np.round(np.load(source) * 1000).astype(np.uint16)
        data = Dataset()
        data.file_meta = FileMetaDataset()
        data.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        data.file_meta.MediaStorageSOPClassUID = MRImageStorage
        data.SOPClassUID, data.SOPInstanceUID = MRImageStorage, generate_uid()
        data.PatientName, data.PatientID, data.PatientBirthDate = "Smith^John", "Smith-4711", "19700101"
        data.InstanceNumber, data.PixelSpacing = case + 1, [0.5, 0.5]
        data.Rows, data.Columns = pixels.shape
        data.SamplesPerPixel, data.PhotometricInterpretation = 1, "MONOCHROME2"
        data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 0
        data.PixelData = pixels.tobytes()
        data.save_as(series / f"Smith_{case}.dcm", enforce_file_format=True)
    # one DICOM series folder per case: three folders of one file each
    folders = []
    for case in range(3):
        folder = tmp_path / f"Smith_case{case}"
        folder.mkdir()
        (series / f"Smith_{case}.dcm").rename(folder / "image.dcm")
        folders.append(folder)
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    npys = []
    for case, source in enumerate(inputs["unet/semantic"]):
        npys.append(scaled / f"patient_doe_{case}.npy")
        np.save(npys[-1], np.load(source) * 1000)
    out = tmp_path / "kit"
    args = ["readers", "export", "--method", "unet/tv=" + ",".join(map(str, folders))]
    assert cli.main([*args, "--method", "unet/semantic=" + ",".join(map(str, npys)), "--out", str(out)]) == 0
    dicoms = sorted((out / "dicom").glob("*.dcm"))
    assert len(dicoms) == 6  # every image, not only the DICOM method's: presence must not tell methods apart
    for path in dicoms:
        raw = path.read_bytes()
        assert not _leaks(raw, binary=True)
        data = pydicom.dcmread(path)
        assert str(data.PatientName) == "Blinded" and data.PatientID == path.stem
        assert "PatientBirthDate" not in data


def test_a_study_folder_exports_its_listed_items(tmp_path: Path) -> None:
    from semrecon_core.readers.kit import load_key

    study = tmp_path / "study"
    rows = []
    for case in ("knee_a", "knee_b"):
        folder = study / "items" / "test" / case
        folder.mkdir(parents=True)
        for prior, lam in (("tv", 0.01), ("semantic", 0.002), ("none", 0.0)):
            rows.append(
                {
                    "case": case,
                    "backbone": "unet",
                    "prior": prior,
                    "preset": "paper",
                    "acceleration": 4.0,
                    "lam": lam,
                    "iterations": 300,
                }
            )
            for key, stored_lam, value in (("aaaa", lam, 1.0), ("bbbb", lam * 3 + 1, 9.0)):  # bbbb: an older run
                slug = f"unet-{prior}-paper-R4-{key}"
                (folder / f"{slug}.json").write_text(json.dumps({"key": key, "lam": stored_lam, "iterations": 300}))
                np.save(folder / f"{slug}.npy", np.full((2, 16, 16), value, np.float32))
    (study / "results.json").write_text(json.dumps({"rows": rows}))
    out = tmp_path / "kit"
    args = ["readers", "export", str(study), "--out", str(out), "--priors", "tv,semantic", "--layout", "side-by-side"]
    assert cli.main(args) == 0
    key = load_key(out)
    assert sorted({e["method"] for e in key["images"].values()}) == ["unet/semantic", "unet/tv"]
    assert {e["source"].rsplit("-", 1)[1] for e in key["images"].values()} == {"aaaa.npy"}
    screens = json.loads((out / "kit.json").read_text())["screens"]
    assert len(screens) == 4 and all(len(s) == 2 for s in screens)  # 2 cases × 2 slices, both methods side by side
    for screen in screens:
        assert len({(key["images"][i]["case"], key["images"][i]["slice"]) for i in screen}) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("count", "same number of files"),
        ("shape", "different shapes"),
        ("nan", "NaN"),
        ("missing", "no such file"),
        ("exists", "already exists"),
        ("one-method", "at least two methods"),
    ],
)
def test_bad_export_input_is_a_named_error_with_exit_status_2(
    inputs: dict[str, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, message: str
) -> None:
    given = {m: list(files) for m, files in inputs.items()}
    out = tmp_path / "kit"
    if change == "count":
        given["unet/tv"] = given["unet/tv"][:2]
    elif change == "shape":
        np.save(tmp_path / "small.npy", np.ones((8, 8), np.float32))
        given["unet/tv"][1] = tmp_path / "small.npy"
    elif change == "nan":
        np.save(tmp_path / "nan.npy", np.full((40, 48), np.nan, np.float32))
        given["unet/tv"][0] = tmp_path / "nan.npy"
    elif change == "missing":
        given["unet/tv"][0] = tmp_path / "absent.npy"
    elif change == "exists":
        out.mkdir()
    elif change == "one-method":
        del given["unet/tv"]
    before = {p: p.read_bytes() for files in inputs.values() for p in files}
    assert _export(given, out) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if change in ("nan", "shape"):
        assert str(given["unet/tv"][0 if change == "nan" else 1]) in err
    assert not out.exists() or change == "exists"
    assert not list(tmp_path.glob(".kit.*"))
    assert before == {p: p.read_bytes() for p in before}  # inputs untouched


def test_each_reader_has_a_reproducible_order_of_their_own(kit: Path) -> None:
    from semrecon_core.readers.kit import load_kit

    loaded = load_kit(kit)
    seed_a, order_a = loaded.reader_order("A")
    assert loaded.reader_order("A") == (seed_a, order_a)
    _, order_b = loaded.reader_order("B")
    assert sorted(map(tuple, order_a)) == sorted(map(tuple, order_b)) == sorted(loaded.screens)
    assert order_a != order_b


# --------------------------------------------------------------------------------------------- the server
@pytest.fixture
def served(kit: Path, tmp_path: Path):  # a fresh score database per test, the kit shared
    import shutil

    from semrecon_core.readers.app import create_app
    from semrecon_core.readers.kit import load_kit
    from semrecon_core.readers.store import ScoreStore

    copy = tmp_path / "kit"
    shutil.copytree(kit, copy)
    loaded = load_kit(copy)
    store = ScoreStore(copy / "scores.sqlite")
    tokens = {name: store.add_reader(name, loaded.reader_order(name)[0]) for name in ("A", "B")}
    return copy, create_app(loaded, store, ["A", "B"]).test_client(), tokens


def _full_scores(screen: list[str], key: dict, reader: str) -> dict:
    return {
        i: {
            c: planned_score(reader, key[i]["method"], key[i]["case"], c)
            for c in ("artifacts", "sharpness", "confidence", "quality")
        }
        for i in screen
    }


def test_tokens_ids_and_paths_outside_the_kit_are_refused(served) -> None:
    _, client, tokens = served
    token = tokens["A"]
    image = client.get(f"/r/{token}/api/state").get_json()["screen"][0]
    assert client.get(f"/r/{token}/image/{image}.png").status_code == 200
    assert client.get(f"/r/{token}/").status_code == 200
    altered = token[:-1] + ("A" if token[-1] != "A" else "B")
    for path in ("/r/not-a-token/", f"/r/{altered}/api/state", f"/r/x{token}/image/{image}.png", "/r//"):
        assert client.get(path).status_code in (403, 404), path
    assert client.get("/r/wrong/api/state").status_code == 403
    assert client.post("/r/wrong/api/scores", json={}).status_code == 403
    for path in (
        f"/r/{token}/image/0123456789abcdef.png",
        f"/r/{token}/image/..%2Fkey.json",
        f"/r/{token}/image/..%2F..%2Fkit%2Fkey.json.png",
        f"/r/{token}/image/%2e%2e%2fkey.png",
        f"/r/{token}/image/{image}.png/../../../key.json",
        f"/r/{token}/../../key.json",
        f"/r/{token}/key.json",
        f"/r/{token}/scores.sqlite",
        "/key.json",
        "/kit.json",
        "/images/" + image + ".png",
        "/",
    ):
        response = client.get(path)
        assert response.status_code == 404, (path, response.status_code)
        assert b"format" not in response.data and b"unet" not in response.data


def test_every_response_a_reader_gets_is_blinded(served) -> None:
    folder, client, tokens = served
    key = json.loads((folder / "key.json").read_text())["images"]
    token = tokens["A"]
    bodies = [client.get(f"/r/{token}/").data]
    for _ in range(3):
        state = client.get(f"/r/{token}/api/state")
        bodies += [state.data, *(str(v).encode() for v in state.headers.values())]
        screen = state.get_json()["screen"]
        for image in screen:
            png = client.get(f"/r/{token}/image/{image}.png")
            assert png.mimetype == "image/png" and not _leaks(png.data, binary=True)
        answer = client.post(
            f"/r/{token}/api/scores",
            json={"position": state.get_json()["position"], "scores": _full_scores(screen, key, "A")},
        )
        assert answer.status_code == 200
        bodies.append(answer.data)
    bodies.append(client.get("/r/nope/").data)
    for body in bodies:
        assert not _leaks(body), _leaks(body)


def test_scores_are_committed_and_a_second_reader_cannot_touch_the_first_ones(served) -> None:
    import sqlite3

    folder, client, tokens = served
    key = json.loads((folder / "key.json").read_text())["images"]
    state_a = client.get(f"/r/{tokens['A']}/api/state").get_json()
    assert (state_a["position"], state_a["total"]) == (0, 6)
    first = _full_scores(state_a["screen"], key, "A")
    assert client.post(f"/r/{tokens['A']}/api/scores", json={"position": 0, "scores": first}).status_code == 200
    with sqlite3.connect(folder / "scores.sqlite") as db:  # committed: another connection sees it
        rows_a = db.execute("SELECT * FROM scores WHERE reader = 'A'").fetchall()
    assert len(rows_a) == 4
    # B cannot rescore A's screen (it is not B's current one, or B's rows are B's) nor see A's scores
    state_b = client.get(f"/r/{tokens['B']}/api/state").get_json()
    assert state_b["position"] == 0 and "scores" not in state_b
    other = {i: dict.fromkeys(v, 1) for i, v in first.items()}
    answer = client.post(f"/r/{tokens['B']}/api/scores", json={"position": 0, "scores": other})
    if set(other) != set(state_b["screen"]):
        assert answer.status_code == 409
    with sqlite3.connect(folder / "scores.sqlite") as db:
        assert db.execute("SELECT * FROM scores WHERE reader = 'A'").fetchall() == rows_a
    # A cannot rewrite the finished screen either: only the current one is accepted
    answer = client.post(f"/r/{tokens['A']}/api/scores", json={"position": 0, "scores": other})
    assert answer.status_code == 409
    # malformed scores
    state = client.get(f"/r/{tokens['A']}/api/state").get_json()
    for bad in (
        {i: {"artifacts": 6, "sharpness": 1, "confidence": 1, "quality": 1} for i in state["screen"]},
        {i: {"artifacts": True, "sharpness": 1, "confidence": 1, "quality": 1} for i in state["screen"]},
        {i: {"artifacts": 3} for i in state["screen"]},
    ):
        assert client.post(f"/r/{tokens['A']}/api/scores", json={"position": 1, "scores": bad}).status_code == 400
    assert client.post(f"/r/{tokens['A']}/api/scores", data="x", content_type="text/plain").status_code == 400
    with sqlite3.connect(folder / "scores.sqlite") as db:
        assert db.execute("SELECT * FROM scores WHERE reader = 'A'").fetchall() == rows_a


def test_a_restarted_server_resumes_each_reader_where_they_stopped(served) -> None:
    from semrecon_core.readers.app import create_app
    from semrecon_core.readers.kit import load_kit
    from semrecon_core.readers.store import ScoreStore

    folder, client, tokens = served
    key = json.loads((folder / "key.json").read_text())["images"]
    for _ in range(2):
        state = client.get(f"/r/{tokens['A']}/api/state").get_json()
        client.post(
            f"/r/{tokens['A']}/api/scores",
            json={"position": state["position"], "scores": _full_scores(state["screen"], key, "A")},
        )
    store = ScoreStore(folder / "scores.sqlite")
    assert store.add_reader("A", 0) == tokens["A"]  # same token after a restart
    again = create_app(load_kit(folder), store, ["A", "B"]).test_client()
    state = again.get(f"/r/{tokens['A']}/api/state").get_json()
    assert state["position"] == 2 and state["screen"] == load_kit(folder).reader_order("A")[1][2]
    assert again.get(f"/r/{tokens['B']}/api/state").get_json()["position"] == 0
    only_a = create_app(load_kit(folder), store, ["A"]).test_client()  # B not served this time
    assert only_a.get(f"/r/{tokens['B']}/api/state").status_code == 403


# --------------------------------------------------------------------------------------------- analysis
def _score_everything(folder: Path, readers: dict[str, int]) -> list[tuple[str, str, str, str, int]]:
    """Store planned scores of each reader's first N screens directly; returns the rows."""
    from semrecon_core.readers.kit import load_key, load_kit
    from semrecon_core.readers.store import ScoreStore

    kit, key = load_kit(folder), load_key(folder)["images"]
    store = ScoreStore(folder / "scores.sqlite")
    rows = []
    for reader, screens in readers.items():
        store.add_reader(reader, kit.reader_order(reader)[0])
        for screen in kit.reader_order(reader)[1][:screens]:
            scores = _full_scores(screen, key, reader)
            store.save(reader, scores)
            rows += [(reader, key[i]["method"], key[i]["case"], c, s) for i, v in scores.items() for c, s in v.items()]
    return rows


def test_the_analysis_equals_a_hand_computation(kit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    folder = tmp_path / "kit"
    shutil.copytree(kit, folder)
    rows = _score_everything(folder, {"A": 6, "B": 6})
    assert cli.main(["readers", "analyze", str(folder)]) == 0
    assert "finished reading" in capsys.readouterr().out
    out = folder / "analysis"
    document = json.loads((out / "readers.json").read_text())
    check_reader_analysis(document, rows)
    assert (out / "figure4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "summary.csv" in {p.name for p in out.iterdir()}
    assert "UNFINISHED" not in (out / "readers.md").read_text()


def test_an_unfinished_reading_is_analysed_as_far_as_it_goes(kit: Path, tmp_path: Path) -> None:
    import shutil

    from semrecon_core.readers.analysis import analyse, write_analysis

    folder = tmp_path / "kit"
    shutil.copytree(kit, folder)
    _score_everything(folder, {"A": 6, "B": 2})
    analysis = analyse(folder)
    assert not analysis.finished
    assert analysis.progress["B"] == {"screens_done": 2, "screens": 6, "images_done": 2, "images": 6}
    write_analysis(analysis, tmp_path / "out", plot=False)
    text = (tmp_path / "out" / "readers.md").read_text()
    assert "UNFINISHED" in text and "B: 2 of 6 screens (unfinished)" in text
    kappas = {row["criterion"]: row for row in analysis.kappa}
    assert kappas["all"]["n"] == 8  # B's two images × four criteria
    assert all(row["n"] > 0 for row in analysis.summary)


def test_kappa_is_undefined_without_variation_and_matches_its_definition() -> None:
    from semrecon_core.readers.analysis import quadratic_kappa

    assert quadratic_kappa([3, 3, 3], [3, 3, 3]) is None
    assert quadratic_kappa([1], [2]) is None
    a, b = [1, 2, 3, 4, 5, 3, 2], [1, 3, 3, 5, 4, 2, 2]
    # by hand: observed/expected with weights (i - j)^2
    observed = np.zeros((5, 5))
    for x, y in zip(a, b, strict=True):
        observed[x - 1, y - 1] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(a)
    weights = np.subtract.outer(np.arange(5), np.arange(5)) ** 2
    value = quadratic_kappa(a, b)
    assert value is not None and math.isclose(value, 1 - (weights * observed).sum() / (weights * expected).sum())


def test_analyze_without_scores_or_key_is_a_named_error(kit: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["readers", "analyze", str(kit)]) == 2
    assert "no scores yet" in capsys.readouterr().err
    assert cli.main(["readers", "analyze", str(tmp_path)]) == 2
    assert "not a reader kit" in capsys.readouterr().err


def test_readers_help_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from semrecon_core.commands import main; "
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main.main(['readers', '--help'])\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'flask', 'sklearn', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_ismrmrd_image_files_are_read_per_slice(inputs: dict[str, list[Path]], tmp_path: Path) -> None:
    import ismrmrd

    from semrecon_core.readers.kit import load_key

    files = []
    for case, source in enumerate(inputs["unet/tv"]):
        path = tmp_path / f"patient_doe_tv_{case}.h5"
        dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
        for scale in (1.0, 0.5):  # two slices
            dataset.append_image("images", ismrmrd.Image.from_array((np.load(source) * scale)[None, None]))
        dataset.close()
        files.append(path)
    stacks = [np.stack([np.load(s), np.load(s) * 0.5]) for s in inputs["unet/semantic"]]
    npys = []
    for case, stack in enumerate(stacks):
        npys.append(tmp_path / f"sem_{case}.npy")
        np.save(npys[-1], stack)
    out = tmp_path / "kit"
    args = ["readers", "export", "--method", "unet/tv=" + ",".join(map(str, files)), "--out", str(out)]
    assert cli.main([*args, "--method", "unet/semantic=" + ",".join(map(str, npys))]) == 0
    key = load_key(out)["images"]
    assert len(key) == 12 and {e["slice"] for e in key.values()} == {0, 1}
