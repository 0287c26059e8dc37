"""Finding and loading checkpoints without surprise downloads.

A checkpoint is a local directory or a HuggingFace id. Ids resolve from the local HuggingFace cache
(``HF_HOME``) unless the user allowed downloads (``--set allow_download=true``) and ``HF_HUB_OFFLINE``
is not set. Only safetensors weights are accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import torch

RANDOM_MARKER = "semrecon_random_weights"

ModelT_co = TypeVar("ModelT_co", bound="torch.nn.Module", covariant=True)


class PretrainedClass(Protocol[ModelT_co]):
    """A HuggingFace model class (``JanusForConditionalGeneration``, ``AutoModel``): ``from_pretrained`` loads one."""

    def from_pretrained(self, path: str | os.PathLike, /, *args: Any, **kwargs: Any) -> ModelT_co:
        """Load the model stored at ``path``."""
        ...


class EncoderUnavailable(OSError):
    """The encoder's weights cannot be found locally and downloading is not allowed."""


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` forbids any hub access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name: str, *, allow_download: bool = False) -> Path:
    """Local directory holding checkpoint ``name`` (a path or a HuggingFace id).

    Raises:
        EncoderUnavailable: naming the ways to provide the weights.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EncoderUnavailable(f"encoder '{name}': directory has no config.json (not a HuggingFace checkpoint)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise EncoderUnavailable(f"encoder '{name}': no such directory (and not a HuggingFace id 'owner/name')")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any cache miss means "not available locally"
        local_error = exc
    if allow_download and not offline():
        return Path(snapshot_download(name, allow_patterns=patterns))
    why = "HF_HUB_OFFLINE is set" if offline() else "downloads are off"
    raise EncoderUnavailable(
        f"encoder '{name}': weights are not in the local HuggingFace cache and {why} "
        f"({type(local_error).__name__}). Provide them by passing a local checkpoint directory "
        f"(--set encoder=/path/to/Janus-Pro-1B), by placing the model in the cache under HF_HOME, "
        f"or allow a download with --set allow_download=true"
    )


def fingerprint(directory: Path) -> str:
    """Cheap content fingerprint of a checkpoint: config.json plus size and edges of each weight file."""
    digest = hashlib.sha256()
    digest.update((directory / "config.json").read_bytes())
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise EncoderUnavailable(f"encoder '{directory}': no .safetensors weights (only safetensors are loaded)")
    chunk = 1 << 20
    for file in weights:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(chunk))
            if size > chunk:
                handle.seek(max(size - chunk, chunk))
                digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


def is_random_checkpoint(directory: Path) -> bool:
    """True when the checkpoint's config carries the random-weights marker of ``build_tiny_janus``."""
    config = json.loads((directory / "config.json").read_text())
    return bool(config.get(RANDOM_MARKER, False))


def load_model(model_class: PretrainedClass[ModelT_co], directory: Path, *, dtype: torch.dtype) -> ModelT_co:
    """``model_class.from_pretrained`` from a resolved local directory: offline, safetensors only, frozen."""
    try:
        model = model_class.from_pretrained(directory, local_files_only=True, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        what = getattr(model_class, "__name__", repr(model_class))
        raise EncoderUnavailable(f"encoder '{directory}': cannot load {what}: {exc}") from exc
    model.requires_grad_(False)
    return model.eval()
