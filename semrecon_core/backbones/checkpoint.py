"""Warm-start checkpoints of the backbones: safetensors weights plus a JSON metadata sidecar.

``OUT.safetensors`` holds the state dict, ``OUT.json`` the metadata: format tag, backbone, architecture,
training data (paths and SHA-256 hashes), masks, epochs, losses. Both are written atomically.
:func:`load_backbone` rebuilds the network from the metadata and refuses files of another backbone, and checks
the weights file's header against the network before reading it (:mod:`semrecon_core.weights`): a damaged
file is a :class:`~semrecon_core.weights.DamagedWeightsError` naming it and the ``semrecon pretrain`` that
writes it again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semrecon_core.backbones.unet import UNet, UNetSpec
from semrecon_core.backbones.unrolled import UnrolledNet

if TYPE_CHECKING:
    from torch import nn

FORMAT = "semrecon-backbone/1"


def metadata_path(path: str | Path) -> Path:
    """The JSON sidecar of a checkpoint file."""
    return Path(path).with_suffix(".json")


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_backbone(backbone: str, architecture: dict[str, Any]) -> nn.Module:
    """A freshly initialised ``unet`` or ``unrolled`` network from its architecture dict."""
    spec = UNetSpec(
        width=int(architecture["width"]),
        depth=int(architecture["depth"]),
        residual=bool(architecture.get("residual", False)),
    )
    if backbone == "unet":
        return UNet(spec)
    if backbone == "unrolled":
        return UnrolledNet(
            spec,
            stages=int(architecture["stages"]),
            lam_init=float(architecture.get("lam_init", 0.01)),
            cg_iterations=int(architecture["cg_iterations"]),
        )
    raise ValueError(f"checkpoint: backbone must be 'unet' or 'unrolled', found {backbone!r}")


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """The architecture dict that :func:`build_backbone` understands."""
    if isinstance(model, UnrolledNet):
        return {**model.spec.to_dict(), "stages": model.stages, "cg_iterations": model.cg_iterations}
    if isinstance(model, UNet):
        return model.spec.to_dict()
    raise ValueError(f"checkpoint: cannot describe a {type(model).__name__}")


def save_checkpoint(path: str | Path, model: nn.Module, backbone: str, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and its metadata to the JSON sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint {path}: expected a file name ending in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "backbone": backbone, "architecture": architecture_of(model), **metadata}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT, "backbone": backbone}))
    sidecar = metadata_path(path)
    _atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint; errors name the missing or malformed file."""
    sidecar = metadata_path(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if not sidecar.is_file():
        raise FileNotFoundError(f"checkpoint {path}: metadata file {sidecar} is missing")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint metadata {sidecar}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint metadata {sidecar}: expected format {FORMAT!r}, found {meta.get('format')!r}")
    return meta


def load_backbone(path: str | Path, backbone: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the ``backbone`` network stored at ``path`` and load its weights.

    Raises:
        ValueError: the checkpoint was trained for another backbone.
        DamagedWeightsError: the weights file is empty, truncated, zero-filled, not safetensors, or its tensors
            do not match the architecture in its metadata (name, shape or dtype).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from semrecon_core.weights import DamagedWeightsError, check_tensors, read_header

    meta = read_metadata(path)
    if meta.get("backbone") != backbone:
        raise ValueError(f"checkpoint {path}: trained for backbone {meta.get('backbone')!r}, not {backbone!r}")
    model = build_backbone(backbone, meta["architecture"])
    what = f"{backbone} checkpoint"
    remedy = f"train it again with `semrecon pretrain {path} --backbone {backbone} --images ...`"
    header = read_header(path, what=what, remedy=remedy, dtypes=None)
    found = {name: (Path(path), entry) for name, entry in header.tensors.items()}
    check_tensors(found, model.state_dict(), path=path, what=what, remedy=remedy)
    try:
        state = load_file(str(path))
    except SafetensorError as exc:  # the header was fine: the data could not be read
        raise DamagedWeightsError(path, f"safetensors: {exc}", what=what, remedy=remedy) from None
    model.load_state_dict(state, strict=True)
    return model, meta
