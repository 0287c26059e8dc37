"""The ``Prior`` protocol: what the engines need of a regulariser.

A prior has a ``label`` (for image comments and logs) and a differentiable ``loss(image)`` of a complex
``(slices, y, x)`` image. ``status(image)`` returns what a trace should keep at a flush (the semantic prior's
embedding and, for image-language banks, the model's answer; nothing for TV). Priors that can answer a
question about an image (image-language banks) also implement :class:`AnsweringPrior`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Prior(Protocol):
    """A regulariser ``R(image)``; the engine multiplies it by λ."""

    @property
    def label(self) -> str:
        """Human-readable name for image comments and logs."""
        ...

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        """Differentiable scalar of a complex ``(slices, y, x)`` image."""
        ...

    def status(self, image: torch.Tensor) -> dict[str, Any]:
        """Trace extras for ``image`` (computed without gradients); ``{}`` when there is nothing to add."""
        ...


@runtime_checkable
class AnsweringPrior(Prior, Protocol):
    """A prior whose encoder can answer the quality question about an image."""

    def answer(self, image: torch.Tensor) -> list[dict[str, Any]] | None:
        """The model's answer per slice, or ``None`` when this prior's bank cannot answer."""
        ...
