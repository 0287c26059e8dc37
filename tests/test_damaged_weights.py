"""Damaged weights files are named errors, whichever file it is: a tiny Janus encoder, a tiny HF vision encoder, a
U-Net and an unrolled warm-start checkpoint, an embedding bank, each cut short, emptied, zero-filled, replaced
by text, stored as integers or shaped for another model. The command line exits 2 with one line naming the
file, what is wrong and the command that writes a good copy (no traceback, no output, inputs unchanged); the
gadget and ``semrecon serve`` send the labelled fallback image and go on."""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from semrecon_core.weights import DamagedWeightsError, check_tensors, read_header  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:A builtin ctypes object gave a PEP3118 format string")

KINDS = ("janus", "hf-vision", "unet", "unrolled", "bank")
DAMAGES = ("truncated", "empty", "zero-filled", "not safetensors", "wrong dtype", "shape mismatch")
# What the message says for each damage, and the command it names for a good copy of each kind.
SAYS = {
    "truncated": "truncated",
    "empty": "empty file",
    "zero-filled": "zero-filled",
    "not safetensors": "not a safetensors file",
    "wrong dtype": "wrong dtype",
    "shape mismatch": "shape",
}
REMEDY = {
    "janus": "semrecon encoder tiny",
    "hf-vision": "copy the checkpoint directory again",
    "unet": "semrecon pretrain",
    "unrolled": "semrecon pretrain",
    "bank": "semrecon bank build",
}
NETWORK = {"width": 4, "depth": 2, "stages": 2, "cg_iterations": 2}


# ------------------------------------------------------------------------------------------- good files
@pytest.fixture(scope="module")
def good(tiny_janus_bank: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One good file or directory of each kind, plus the banks the encoders are used with (read-only)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from semrecon_core.backbones.checkpoint import build_backbone, save_checkpoint
    from semrecon_core.priors.bank import bank_from_features

    folder = tmp_path_factory.mktemp("good-weights")
    janus, janus_bank = tiny_janus_bank
    vision = SiglipVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16
    )
    torch.manual_seed(0)
    SiglipVisionModel(vision).save_pretrained(folder / "siglip")
    generator = torch.Generator().manual_seed(0)
    features = ([torch.randn(4, 4, 32, generator=generator)], [torch.randn(4, 4, 32, generator=generator)])
    identity = {"family": "hf-vision", "kind": "image", "revision": "x", "layers": [1]}
    hf_bank = bank_from_features(*features, identity=identity, similarity="centred", weights=(1.0,))
    paths = {
        "janus": janus,
        "janus-bank": janus_bank,
        "hf-vision": folder / "siglip",
        "hf-vision-bank": hf_bank.save(folder / "hf_bank.safetensors"),
        "bank": janus_bank,
    }
    for backbone in ("unet", "unrolled"):
        network = build_backbone(backbone, NETWORK)
        paths[backbone] = save_checkpoint(folder / f"{backbone}.safetensors", network, backbone, {"epochs": 1})
    return paths


def _weights_file(kind: str, target: Path) -> Path:
    """The safetensors file of ``target`` (an encoder directory's ``model.safetensors``)."""
    return target / "model.safetensors" if kind in ("janus", "hf-vision") else target


def _place(kind: str, good: dict[str, Path], folder: Path) -> Path:
    """A copy of the good ``kind`` in ``folder`` (a checkpoint with its JSON sidecar)."""
    source = good[kind]
    if source.is_dir():
        return Path(shutil.copytree(source, folder / source.name))
    target = folder / source.name
    shutil.copyfile(source, target)
    if kind in ("unet", "unrolled"):
        shutil.copyfile(source.with_suffix(".json"), target.with_suffix(".json"))
    return target


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _to_integers(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            tensors[name] = (tensor * 100).to(torch.int32)


def _cut_one(kind: str) -> Callable[[dict[str, torch.Tensor]], None]:
    """Drop the last column of one tensor the loader reads (a vision-tower weight, a bank's negatives)."""

    def change(tensors: dict[str, torch.Tensor]) -> None:
        wanted = {"janus": "model.vision_model.", "bank": "negatives/"}.get(kind, "")
        name = next(
            n for n in sorted(tensors) if n.startswith(wanted) and tensors[n].dim() >= 1 and tensors[n].shape[-1] > 1
        )
        tensors[name] = tensors[name][..., :-1].contiguous()

    return change


def _damage(kind: str, damage: str, file: Path) -> None:
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "zero-filled":
        file.write_bytes(bytes(len(data)))
    elif damage == "not safetensors":
        file.write_text("<html>this is a download error page, not weights</html>\n")
    elif damage == "wrong dtype":
        _rewrite(file, _to_integers)
    else:
        _rewrite(file, _cut_one(kind))


def _damaged(kind: str, damage: str, good: dict[str, Path], folder: Path) -> Path:
    target = _place(kind, good, folder)
    _damage(kind, damage, _weights_file(kind, target))
    return target


def _properties(kind: str, target: Path, good: dict[str, Path]) -> dict[str, str]:
    """Reconstruction settings that read the damaged ``target``."""
    if kind in ("unet", "unrolled"):
        return {"backbone": kind, "prior": "tv", "checkpoint": str(target), "iterations": "1", "device": "cpu"}
    encoder = str(target) if kind != "bank" else str(good["janus"])
    bank = str(target) if kind == "bank" else str(good[f"{kind}-bank"])
    return {"backbone": "unet", "prior": "semantic", "encoder": encoder, "bank": bank, "iterations": "1"} | {
        "width": "4",
        "depth": "2",
        "device": "cpu",
    }


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated ISMRMRD raw file: 32², 4 coils, R = 2, 12 ACS lines."""
    from semrecon_core.data.simulate import write_ismrmrd_raw

    return write_ismrmrd_raw(
        tmp_path_factory.mktemp("raw") / "scan.h5", matrix=(32, 32), coils=4, acceleration=2, acs_width=12, seed=3
    )


# ------------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_recon_names_the_damaged_file_and_exits_2(
    kind: str, damage: str, good: dict[str, Path], raw_scan: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from semrecon_core.commands.main import main
    from semrecon_core.priors import factory

    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    target = _damaged(kind, damage, good, inputs)
    scan = Path(shutil.copyfile(raw_scan, inputs / "scan.h5"))
    before = _digest(inputs)
    argv = ["recon", str(scan), str(outputs / "out.h5")]
    for name, value in _properties(kind, target, good).items():
        argv += ["--set", f"{name}={value}"]
    factory.clear_cache()
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, f"exit status {status}\n{captured.out}\n{captured.err}"
    message = captured.err.strip().splitlines()[-1]
    assert message.startswith("semrecon recon: error: "), captured.err
    for words in (str(target), "not a readable", SAYS[damage], REMEDY[kind]):
        assert words in message, f"{words!r} not in: {message}"
    assert "Traceback" not in captured.err + captured.out
    assert _digest(inputs) == before, "an input was modified"
    assert list(outputs.rglob("*")) == [], f"outputs left behind: {list(outputs.rglob('*'))}"


# ------------------------------------------------------------------------------------- the loaders alone
def _load(kind: str, target: Path) -> object:
    if kind == "janus":
        from semrecon_core.encoders.janus import JanusImageEncoder

        return JanusImageEncoder.from_pretrained(str(target), layers=(1,))
    if kind == "hf-vision":
        from semrecon_core.encoders.hf_vision import HFVisionEncoder

        return HFVisionEncoder.from_pretrained(str(target), layers=(1,))
    if kind == "bank":
        from semrecon_core.priors.bank import load_bank

        return load_bank(target)
    from semrecon_core.backbones.checkpoint import load_backbone

    return load_backbone(target, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_good_files_load_and_shape_errors_say_expected_and_found(
    kind: str, good: dict[str, Path], tmp_path: Path
) -> None:
    assert _load(kind, good[kind]) is not None
    target = _damaged(kind, "shape mismatch", good, tmp_path)
    with pytest.raises(DamagedWeightsError) as caught:
        _load(kind, target)
    error = caught.value
    assert str(target) in str(error.path) and error.remedy and REMEDY[kind] in error.remedy
    if kind == "bank":  # positives and negatives no longer agree
        assert "positives" in error.problem and "negatives" in error.problem
    else:
        assert "has shape" in error.problem and "expects" in error.problem, error.problem
    if kind == "janus":  # the language encoder loads the whole model through transformers
        from semrecon_core.encoders.janus import JanusLanguageEncoder

        with pytest.raises(DamagedWeightsError, match=r"shape mismatch: tensor .* has shape .* expects"):
            JanusLanguageEncoder.from_pretrained(str(target))


def test_the_header_check_refuses_gaps_trailing_bytes_and_unknown_dtypes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2)}, str(path))
    header = read_header(path)
    assert header.tensors["b"].shape == (2, 2) and header.tensors["a"].dtype == "F32"
    data = path.read_bytes()
    (tmp_path / "longer.safetensors").write_bytes(data + b"\0" * 5)
    with pytest.raises(DamagedWeightsError, match="5 bytes follow the last tensor"):
        read_header(tmp_path / "longer.safetensors")
    (tmp_path / "odd.safetensors").write_bytes(data.replace(b'"F32"', b'"Q32"', 1))
    with pytest.raises(DamagedWeightsError, match="unknown dtype 'Q32'"):
        read_header(tmp_path / "odd.safetensors")
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(DamagedWeightsError, match="truncated: 5 bytes"):
        read_header(tmp_path / "short.safetensors")
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        read_header(tmp_path / "absent.safetensors")
    found = {name: (path, entry) for name, entry in header.tensors.items()}
    model = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    check_tensors(found, model, path=path, what="x", remedy="")
    with pytest.raises(DamagedWeightsError, match=r"tensor 'c' is missing \(1 of the 3"):
        check_tensors(found, {**model, "c": torch.zeros(1)}, path=path, what="x", remedy="")
    with pytest.raises(DamagedWeightsError, match="tensor 'b' has no place in the model"):
        check_tensors(found, {"a": torch.zeros(3)}, path=path, what="x", remedy="")
    with pytest.raises(DamagedWeightsError, match="tensor 'a' is stored as F32, the model expects I64"):
        check_tensors(found, {**model, "a": torch.zeros(3, dtype=torch.int64)}, path=path, what="x", remedy="")


# ----------------------------------------------------------------------------------- gadget and serve


def _configuration(properties: dict[str, str]) -> str:
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in {"preview": "false", **properties}.items())
    return f"<configuration>{body}</configuration>"


def _assert_fallbacks(images: list, count: int) -> None:
    assert len(images) == count, images
    for image in images:
        comment = image.meta["GADGETRON_ImageComment"]
        assert image.meta["GADGETRON_DataRole"] == "Fallback" and comment.startswith("FALLBACK"), comment
        assert "Damaged" in comment, comment


@pytest.mark.parametrize(
    ("kind", "damage"), [*zip(KINDS, DAMAGES, strict=False), ("janus", "shape mismatch"), ("bank", "shape mismatch")]
)
def test_the_gadget_sends_a_labelled_fallback_and_goes_on(
    kind: str, damage: str, good: dict[str, Path], raw_scan: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from semrecon_core.emulation.chain import InProcessConnection
    from semrecon_core.gadgetron.gadget import reconstruct
    from semrecon_core.priors import factory
    from tests.helpers import read_ismrmrd_scan

    header, buffers = read_ismrmrd_scan(raw_scan)
    target = _damaged(kind, damage, good, tmp_path)
    factory.clear_cache()
    sent: list = []
    with caplog.at_level(logging.ERROR):
        reconstruct(InProcessConnection(buffers, header, _configuration(_properties(kind, target, good)), sent.append))
    _assert_fallbacks(sent, len(buffers))
    assert str(target) in caplog.text and SAYS[damage] in caplog.text and REMEDY[kind] in caplog.text, caplog.text


@pytest.mark.parametrize("kind", ["janus", "bank", "unet"])
def test_serve_sends_a_labelled_fallback_and_serves_the_next_scan(
    kind: str, good: dict[str, Path], raw_scan: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from semrecon_core.emulation import emulator
    from semrecon_core.gadgetron import serve
    from semrecon_core.priors import factory
    from tests.helpers import read_ismrmrd_scan

    header, buffers = read_ismrmrd_scan(raw_scan)
    target = _damaged(kind, "truncated", good, tmp_path)
    factory.clear_cache()
    server = serve.GadgetServer(properties={"preview": "false"}, idle_timeout=30.0)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.ERROR):
            configuration = _configuration(_properties(kind, target, good))
            run = emulator.run_connect(configuration, header, buffers[:1], port=server.address[1], timeout=60)
        assert run.errors == [], run.errors
        _assert_fallbacks(run.images, 1)
        assert str(target) in caplog.text and "truncated" in caplog.text, caplog.text
        start = time.monotonic()
        run = emulator.run_connect("<configuration/>", header, buffers[:1], port=server.address[1], timeout=60)
        assert run.errors == [] and len(run.images) == 1 and time.monotonic() - start < 30
        assert run.images[0].meta["GADGETRON_DataRole"] == "Image"
    finally:
        stop.set()
        thread.join(10)
        server.close()
    assert not thread.is_alive(), "the server did not stop"
