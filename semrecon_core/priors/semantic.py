"""The semantic prior: contrastive loss of a reconstruction's embedding against an embedding bank.

The encoder computes in its own precision (float32 image-only, bf16 on CUDA for the LLM path); the bank must
have been embedded in the same dtype (checked with the rest of the encoder identity). The contrastive loss
itself always runs in float32 with autocast off: Janus similarities differ in the third decimal, which
bfloat16's 8-bit mantissa would erase.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from semrecon_core.encoders.common import precision_context
from semrecon_core.priors.bank import EmbeddingBank, check_compatible
from semrecon_core.priors.contrastive import ContrastiveLoss, leave_one_out
from semrecon_core.priors.views import random_views

# Public code's image-language temperatures (REFERENCE.md §1).
PUBLIC_CODE_TAU_POSITIVE = 0.1
PUBLIC_CODE_TAU_NEGATIVE = 0.7


class SemanticPrior:
    """``loss(image)`` = contrastive loss (Eq. 3) of ``encoder(image)`` against ``bank``'s P and N.

    Args:
        encoder: a :class:`~semrecon_core.encoders.protocol.SemanticEncoder` (frozen).
        bank: an embedding bank built with the same encoder identity (checked).
        weights: level weights (image-only banks; one per level); ``None`` uses the bank's.
        tau: temperature of Eq. (3).
        variant: ``paper`` (Eq. 3) or ``public-code`` (image-language banks: τ_pos 0.1, τ_neg 0.7; image-only
            banks: Eq. 3 as in the paper). Always a mean over slices, so λ means the same for any slice batch;
            the authors' sum over the unrolled network's stage queries is added up by the engine.
        hinge: ``none`` (Eq. 3 as in the paper) or ``bank``: each slice's loss counts only above the level of
            the bank's own positives (their mean leave-one-out loss under this prior's τ and level weights, each
            positive held out with the negatives simulated from it when the bank records them:
            :attr:`margin`), so the fit stops pulling once an image scores as real positives do instead of
            driving the encoder's score past them (a departure from the paper).
        views: encoder views averaged per loss evaluation: 1 (the paper) or more, the image and ``views − 1``
            random shifted / flipped / rescaled copies (:func:`~semrecon_core.priors.views.random_views`,
            drawn anew at every call from a generator seeded with ``seed``; a departure from the paper).
        seed: seed of the views' generator.

    Attributes:
        last_embedding: detached ``(slices, D)`` embedding of the last :meth:`loss` call (for trajectories
            without a second encoder pass).
        trace_answers: whether :meth:`status` (called at every flush of the fitting loop) also runs the
            image-language model's :meth:`answer` (a prompt pass and a greedy decode per slice). Off by default:
            the pipeline asks for the answer of the final image only; a trajectory that shows the answer along
            the fit turns it on.
    """

    def __init__(
        self,
        encoder: Any,
        bank: EmbeddingBank,
        *,
        weights: Sequence[float] | None = None,
        tau: float = 0.07,
        variant: str = "paper",
        hinge: str = "none",
        views: int = 1,
        seed: int = 0,
    ) -> None:
        if variant not in ("paper", "public-code"):
            raise ValueError(f"semantic prior variant: expected paper or public-code, found {variant!r}")
        check_compatible(bank.metadata, encoder.identity, source=f"bank {bank.path or '(in memory)'}")
        self.encoder = encoder
        self.bank = bank
        levels = len(bank.positives)
        weights = list(bank.metadata.get("weights") or [1.0] * levels) if weights is None else list(weights)
        if bank.kind == "language":
            weights = [1.0]
        if len(weights) != levels:
            raise ValueError(f"property 'level_weights': expected {levels} weights for this bank, found {len(weights)}")
        options: dict[str, Any] = {"tau": tau}
        if variant == "public-code" and bank.kind == "language":
            options = {"tau": PUBLIC_CODE_TAU_POSITIVE, "tau_negative": PUBLIC_CODE_TAU_NEGATIVE}
        self.variant = variant
        self.contrastive = ContrastiveLoss(
            bank.positives,
            bank.negatives,
            weights=weights,
            similarity=bank.similarity,
            pca=bank.pca,
            **options,
        ).to(encoder.device)
        if hinge not in ("none", "bank"):
            raise ValueError(f"semantic prior hinge: expected none or bank, found {hinge!r}")
        if views < 1:
            raise ValueError(f"semantic prior views: expected at least 1, found {views}")
        self.hinge, self.views = hinge, int(views)
        self.margin: float | None = None
        if hinge == "bank":
            language = bank.kind == "language"
            self.margin = leave_one_out(
                bank.positives,
                bank.negatives,
                similarity=bank.similarity,
                weights=self.contrastive.weights,
                tau=self.contrastive.tau,
                tau_negative=self.contrastive.tau_negative,
                group=int(bank.metadata.get("perturbations") or 1) if language else 1,
                negative_parents=bank.metadata.get("negative_parents"),
            ).positive_loss
        self.generator = torch.Generator().manual_seed(seed)
        self.last_embedding: torch.Tensor | None = None
        self.trace_answers = False

    @property
    def label(self) -> str:
        """Names the prior and its encoder; random-weight encoders say "RANDOM WEIGHTS"."""
        kind = "image-language" if self.bank.kind == "language" else "image-only"
        text = f"semantic {kind} prior ({self.bank.similarity}, {self.variant}) with {self.encoder.label}"
        departures = [f"hinge at the bank's positives, {self.margin:.3f}"] if self.margin is not None else []
        departures += [f"{self.views} views"] if self.views > 1 else []
        if departures:
            text += f" [{'; '.join(departures)}]"
        if self.encoder.is_random and "RANDOM WEIGHTS" not in text:
            text += " RANDOM WEIGHTS"
        return text

    def _summary(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        return (top.mean(dim=1) if top.dim() == 3 else top).detach()

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        """Differentiable scalar loss of a complex ``(slices, y, x)`` image (max |zero-filled| ≈ 1)."""
        slices = image.shape[0]
        batch = random_views(image, self.views, self.generator) if self.views > 1 else image
        features = self.encoder.encode(batch)
        self.last_embedding = self._summary([f[:slices] for f in features])
        with precision_context(features[0].device, torch.float32):
            features = [f.float() for f in features]
            if self.margin is None and self.views == 1:
                return self.contrastive(features)  # Eq. (3) as the paper writes it
            per_slice = self.contrastive.per_slice(features).view(self.views, slices).mean(0)
            if self.margin is not None:
                per_slice = torch.relu(per_slice - self.margin)
            return per_slice.mean()

    def terms(self, image: torch.Tensor) -> dict[str, float]:
        """Unweighted loss per level, for logging (no gradient)."""
        with torch.no_grad():
            features = self.encoder.encode(image)
            with precision_context(features[0].device, torch.float32):
                values = self.contrastive.per_level([f.float() for f in features])
        return {f"semantic_level{k}": float(v) for k, v in enumerate(values)}

    @torch.no_grad()
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``(slices, D)`` embedding for trajectories: token-mean of the top level, or the LLM state."""
        return self._summary(self.encoder.encode(image))

    @torch.no_grad()
    def status(self, image: torch.Tensor) -> dict[str, Any]:
        """Trace extras: the ``embedding`` ``(slices, D)``, and the model's ``answer`` when :attr:`trace_answers`.

        The embedding of the last loss evaluation is reused when it is of this batch, sparing a second
        encoder pass; without :attr:`trace_answers` no other model call runs here.
        """
        cached = self.last_embedding
        embedding = cached if cached is not None and cached.shape[0] == image.shape[0] else self.embed(image)
        status: dict[str, Any] = {"embedding": embedding.float().cpu().tolist()}
        reply = self.answer(image) if self.trace_answers else None
        if reply is not None:
            status["answer"] = reply
        return status

    def answer(self, image: torch.Tensor) -> list[dict[str, Any]] | None:
        """The model's answer per slice (image-language banks), else ``None``."""
        if self.bank.kind != "language" or not hasattr(self.encoder, "answer"):
            return None
        return self.encoder.answer(image)
