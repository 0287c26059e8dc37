"""The encoder protocol for a generic HuggingFace vision transformer (SigLIP, CLIP, ViT, ...).

Loads any checkpoint whose model exposes ``hidden_states`` (``output_hidden_states=True``) — a vision
model itself (``SiglipVisionModel``) or a dual encoder with a ``vision_model`` (``SiglipModel``,
``CLIPModel``) — and returns the token states at the chosen layers, like the Janus image encoder. The
pixel mapping uses the checkpoint's ``image_mean`` / ``image_std`` when it ships a preprocessor config.
Like the Janus image-only encoder it computes in float32 unless bfloat16 is asked for (on CUDA).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from semrecon_core.encoders.common import (
    checked_layers,
    checked_precision,
    compute_dtype,
    dtype_name,
    input_size,
    precision_context,
    preprocessing_identity,
    requested_precision,
)
from semrecon_core.encoders.loading import fingerprint, is_random_checkpoint, load_model, resolve_checkpoint
from semrecon_core.encoders.preprocess import to_pixels

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class HFVisionEncoder:
    """Token states of a HuggingFace vision transformer at ``layers`` (``hidden_states[k]``).

    Args:
        vision_model: a frozen vision transformer accepting ``pixel_values``.
        name: model id or directory.
        revision: checkpoint fingerprint.
        layers: hidden-state indices.
        image_size: model input size ``(H, W)``.
        mean: pixel mean of the model's normalisation.
        std: pixel standard deviation of the model's normalisation.
        is_random: the checkpoint has random weights.
        precision: ``float32`` (default) or ``bfloat16`` (bf16 autocast on CUDA; float32 elsewhere).
    """

    kind = "image"

    def __init__(
        self,
        vision_model: PreTrainedModel,
        *,
        name: str,
        revision: str,
        layers: Sequence[int],
        image_size: tuple[int, int],
        mean: float = 0.5,
        std: float = 0.5,
        is_random: bool = False,
        precision: str = "float32",
    ) -> None:
        self.layers = checked_layers(layers, int(vision_model.config.num_hidden_layers), name)
        self.vision = vision_model.requires_grad_(False).eval()
        self.name = name
        self.revision = revision
        self.image_size = image_size
        self.mean, self.std = mean, std
        self.is_random = is_random
        self.precision = checked_precision(precision, name)
        self.label = f"{type(vision_model).__name__} encoder ({name}, layers {'/'.join(map(str, self.layers))})"
        if is_random:
            self.label += " RANDOM WEIGHTS"

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        layers: Sequence[int],
        device: str | torch.device = "cpu",
        allow_download: bool = False,
        autocast: bool = True,
        precision: str = "float32",
    ) -> HFVisionEncoder:
        """Load a vision (or dual) checkpoint from a HuggingFace id or directory, offline by default.

        ``autocast=False`` forces float32 whatever ``precision`` says.
        """
        from transformers import AutoModel

        device = torch.device(device)
        precision = requested_precision(checked_precision(precision, name), autocast)
        directory = resolve_checkpoint(name, allow_download=allow_download)
        model = load_model(AutoModel, directory, dtype=compute_dtype(device, precision)).to(device)
        vision = model.vision_model if hasattr(model, "get_image_features") else model
        mean, std = 0.5, 0.5
        processor_file = directory / "preprocessor_config.json"
        if processor_file.is_file():
            settings = json.loads(processor_file.read_text())
            mean = float(_first(settings.get("image_mean", mean)))
            std = float(_first(settings.get("image_std", std)))
        return cls(
            vision,
            name=name,
            revision=fingerprint(directory),
            layers=layers,
            image_size=input_size(vision.config.image_size),
            mean=mean,
            std=std,
            is_random=is_random_checkpoint(directory),
            precision=precision,
        )

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.vision.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes in on its device."""
        return compute_dtype(self.device, self.precision)

    @property
    def identity(self) -> dict[str, Any]:
        """Bank-relevant description of this encoder."""
        return {
            "model": self.name,
            "family": "hf-vision",
            "revision": self.revision,
            "kind": self.kind,
            "layers": list(self.layers),
            "preprocessing": (f"{preprocessing_identity(self.image_size)};mean={self.mean:g};std={self.std:g}"),
            "dtype": dtype_name(self.dtype),
            "random_weights": self.is_random,
        }

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Per-level token states ``(slices, tokens, dim)`` of a complex ``(slices, y, x)`` image."""
        pixels = to_pixels(image.to(self.device), self.image_size, mean=self.mean, std=self.std)
        with precision_context(pixels.device, self.dtype):
            dtype = next(self.vision.parameters()).dtype
            states = self.vision(pixel_values=pixels.to(dtype), output_hidden_states=True).hidden_states
        return [states[k].float() for k in self.layers]


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) else value
