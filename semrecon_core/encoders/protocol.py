"""The seam between semantic priors and the models that embed images.

A semantic encoder maps a complex image batch ``(slices, y, x)`` to one tensor per embedding level.
Image-only encoders return per-level token states ``(slices, tokens, dim)``; image-language
encoders return one level ``(slices, dim)`` (the final LLM state of the last token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class SemanticEncoder(Protocol):
    """What the semantic prior and the embedding bank need from an encoder.

    Attributes:
        label: human-readable name of the model (says "RANDOM WEIGHTS" for random checkpoints).
        is_random: True when the weights are random (tiny test checkpoints, benchmarks).
        identity: JSON-serialisable description (model id, revision fingerprint, kind, layers,
            preprocessing, instruction, prompt rendering, the dtype it computes in, ...) stored in and
            checked against embedding banks.
    """

    label: str
    is_random: bool

    @property
    def identity(self) -> dict[str, Any]:
        """The description stored in and checked against embedding banks (read-only)."""
        ...

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Embed a complex ``(slices, y, x)`` image; differentiable with respect to ``image``."""
        ...
