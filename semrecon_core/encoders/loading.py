"""Finding and loading checkpoints without surprise downloads.

A checkpoint is a local directory or a HuggingFace id. Ids resolve from the local HuggingFace cache
(``HF_HOME``) unless the user allowed downloads (``--set allow_download=true``) and ``HF_HUB_OFFLINE``
is not set. Only safetensors weights are accepted, and every weights file's header is checked
(:func:`check_encoder_weights`, :mod:`semrecon_core.weights`) before transformers or safetensors reads it: a
damaged file raises :class:`~semrecon_core.weights.DamagedWeightsError` naming it and how to get a good copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from semrecon_core.weights import DamagedWeightsError, TensorEntry, read_headers

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
    return bool(read_config(directory).get(RANDOM_MARKER, False))


def read_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``; one that does not parse is a named error."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedWeightsError(
            path, f"not JSON ({exc})", what="encoder config", remedy=encoder_remedy(directory)
        ) from None
    if not isinstance(config, dict):
        raise DamagedWeightsError(path, "not a JSON object", what="encoder config", remedy=encoder_remedy(directory))
    return config


def encoder_remedy(directory: Path) -> str:
    """How to get a good copy of the encoder in ``directory``: the command that wrote it, run again."""
    marker = directory / "semrecon_install.json"
    if marker.is_file():
        from semrecon_core.encoders.install import NAME, default_directory

        where = "" if directory.absolute() == default_directory().absolute() else f" {directory}"
        return f"install it again with `semrecon encoder install {NAME}{where} --force`"
    try:
        random = bool(json.loads((directory / "config.json").read_text()).get(RANDOM_MARKER, False))
    except (OSError, ValueError, AttributeError):
        random = False
    if random:
        return f"write it again with `semrecon encoder tiny {directory} --overwrite`"
    if "models--" in str(directory):
        return (
            "delete this snapshot from the HuggingFace cache and download it again (--set allow_download=true, "
            "or `hf download OWNER/NAME`)"
        )
    return "copy the checkpoint directory again from where it came from"


def check_encoder_weights(directory: Path) -> dict[str, tuple[Path, TensorEntry]]:
    """Every tensor of the checkpoint's ``*.safetensors`` files, after checking each file's header.

    Raises:
        EncoderUnavailable: no ``.safetensors`` file.
        DamagedWeightsError: a file is empty, truncated, zero-filled, not safetensors, or holds a tensor that
            is not floating point (naming the file and how to get a good copy).
    """
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise EncoderUnavailable(f"encoder '{directory}': no .safetensors weights (only safetensors are loaded)")
    return read_headers(files, what="encoder weights file", remedy=encoder_remedy(directory))


def load_model(model_class: PretrainedClass[ModelT_co], directory: Path, *, dtype: torch.dtype) -> ModelT_co:
    """``model_class.from_pretrained`` from a resolved local directory: offline, safetensors only, frozen.

    The weights files are checked first (:func:`check_encoder_weights`); a tensor shaped for another model is
    a :class:`~semrecon_core.weights.DamagedWeightsError` naming it with the expected and the stored shape.
    """
    from safetensors import SafetensorError

    check_encoder_weights(directory)
    what = getattr(model_class, "__name__", repr(model_class))
    try:
        loaded: Any = model_class.from_pretrained(
            directory,
            local_files_only=True,
            use_safetensors=True,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, naming the tensor, instead of a bare RuntimeError
        )
    except SafetensorError as exc:  # the headers were fine: the data could not be read
        raise DamagedWeightsError(
            directory, f"safetensors: {exc}", what="encoder checkpoint", remedy=encoder_remedy(directory)
        ) from None
    except (OSError, ValueError) as exc:
        raise EncoderUnavailable(f"encoder '{directory}': cannot load {what}: {exc}") from exc
    model: ModelT_co = loaded[0]
    info: dict[str, Any] = loaded[1]
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, stored, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise DamagedWeightsError(
            directory,
            f"shape mismatch: tensor {name!r} has shape {tuple(stored)}, {what} of this config.json expects "
            f"{tuple(wanted)}{more}",
            what="encoder checkpoint",
            remedy=encoder_remedy(directory),
        )
    model.requires_grad_(False)
    return model.eval()
