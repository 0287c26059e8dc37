"""Contrastive losses of the semantic prior (paper Eq. 3 and the public code's variants).

All functions take precomputed similarities or embeddings and are batched over query slices; the
multi-level loss loops over the (few) levels, whose widths differ.

* Eq. (3), multi-positive InfoNCE with the positives in the denominator::

      L(e) = −log Σ_p exp(s(e,p)/τ) / (Σ_p exp(s(e,p)/τ) + Σ_n exp(s(e,n)/τ))

  evaluated as ``logsumexp(pos ∪ neg) − logsumexp(pos)`` (stable for any τ). The public code's
  ``−log(Σpos/Σall + 1e-8)`` is the same quantity up to its 1e-8 guard.
* Image-language variant of the public code: ``τ_pos = 0.1`` for positives, ``τ_neg = 0.7`` for
  negatives, ``−(logsumexp(pos/τ_pos) − logsumexp(pos/τ_pos ∪ neg/τ_neg))``, summed over queries.
* Token-PCA similarity of the public code: a PCA per level fitted on the bank's P ∪ N tokens
  (dims 64/128/256), per-token L2 normalisation, cosine per token averaged over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_PCA_DIMS = (64, 128, 256)


def cosine_matrix(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(S, M)`` of query vectors ``(S, D)`` and bank vectors ``(M, D)``."""
    return _vector_dot(F.normalize(query, dim=-1), F.normalize(bank, dim=-1))


def token_cosine(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the per-token cosine: query ``(S, T, d)``, bank ``(M, T, d)`` → ``(S, M)``."""
    if query.shape[1:] != bank.shape[1:]:
        raise ValueError(
            f"token similarity: query tokens {tuple(query.shape[1:])} != bank tokens {tuple(bank.shape[1:])}"
        )
    return _token_dot(F.normalize(query, dim=-1), F.normalize(bank, dim=-1))


def _vector_dot(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return query @ bank.transpose(0, 1)


def _token_dot(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    # Σ_t Σ_d q[s,t,d]·b[m,t,d] / T as one matrix product over the flattened (t, d) axes.
    return (query.flatten(1) @ bank.flatten(1).transpose(0, 1)) / query.shape[1]


def info_nce(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    tau: float = 0.07,
    tau_negative: float | None = None,
) -> torch.Tensor:
    """Per-query multi-positive InfoNCE ``(S,)`` from similarities ``(S, |P|)`` and ``(S, |N|)``.

    With ``tau_negative`` the negatives use their own temperature (public code's image-language loss).
    """
    pos = positive / tau
    neg = negative / (tau if tau_negative is None else tau_negative)
    return torch.logsumexp(torch.cat([pos, neg], dim=-1), dim=-1) - torch.logsumexp(pos, dim=-1)


@dataclass
class PCA:
    """A linear projection ``(x − mean) @ components`` fitted on bank tokens (one per level)."""

    mean: torch.Tensor
    components: torch.Tensor

    @classmethod
    def fit(cls, samples: torch.Tensor, dim: int) -> PCA:
        """Principal axes of ``samples`` ``(n, D)`` (leading ``dim``; float64 covariance eigendecomposition).

        Each axis's sign is fixed so that its largest-magnitude entry is positive (deterministic).
        """
        data = samples.reshape(-1, samples.shape[-1]).double()
        if dim < 1 or dim > data.shape[1]:
            raise ValueError(f"PCA: expected 1 <= dim <= {data.shape[1]}, found {dim}")
        mean = data.mean(0)
        centred = data - mean
        covariance = centred.T @ centred / max(data.shape[0] - 1, 1)
        _, vectors = torch.linalg.eigh(covariance)
        axes = vectors[:, -dim:].flip(-1)
        signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
        axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
        return cls(mean=mean.float(), components=axes.float().contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``(..., D)`` to ``(..., dim)``."""
        return (x - self.mean) @ self.components

    def to(self, device: torch.device | str) -> PCA:
        """A copy on ``device``."""
        return PCA(self.mean.to(device), self.components.to(device))


class ContrastiveLoss:
    """Multi-level contrastive loss of query features against a bank's positives and negatives.

    Args:
        positives: per level ``(M, D)`` vectors (pooled / language) or ``(M, T, d)`` PCA tokens.
        negatives: same layout as ``positives``.
        weights: level weights (paper 0.005 / 0.5 / 1 for vision layers 1 / 13 / 24).
        similarity: ``pooled`` (cosine of token-averaged states), ``vector`` (cosine of given vectors,
            e.g. LLM states) or ``token-pca`` (per-token cosine after ``pca``).
        pca: per-level projections for ``token-pca``.
        tau: temperature (of the positives when ``tau_negative`` is set).
        tau_negative: separate temperature of the negatives (public code's image-language loss).
        reduction: ``mean`` over query slices (Eq. 3's 1/N) or ``sum`` (public code, image-language).
    """

    def __init__(
        self,
        positives: Sequence[torch.Tensor],
        negatives: Sequence[torch.Tensor],
        *,
        weights: Sequence[float],
        similarity: str = "pooled",
        pca: Sequence[PCA] | None = None,
        tau: float = 0.07,
        tau_negative: float | None = None,
        reduction: str = "mean",
    ) -> None:
        if not (len(positives) == len(negatives) == len(weights)):
            raise ValueError(
                f"contrastive loss: {len(positives)} positive levels, {len(negatives)} negative levels and "
                f"{len(weights)} weights must agree"
            )
        if similarity not in ("pooled", "vector", "token-pca"):
            raise ValueError(f"similarity: expected pooled, vector or token-pca, found {similarity!r}")
        if similarity == "token-pca" and (pca is None or len(pca) != len(positives)):
            raise ValueError("similarity 'token-pca' needs one fitted PCA per level")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected mean or sum, found {reduction!r}")
        self.similarity = similarity
        self.pca = list(pca) if pca is not None else None
        self.weights = [float(w) for w in weights]
        self.tau, self.tau_negative, self.reduction = tau, tau_negative, reduction
        # Normalise the bank once; the per-call work is then one matmul per level.
        self.positives = [F.normalize(p.float(), dim=-1) for p in positives]
        self.negatives = [F.normalize(n.float(), dim=-1) for n in negatives]

    def to(self, device: torch.device | str) -> ContrastiveLoss:
        """Move the bank (and PCA) to ``device`` in place; returns ``self``."""
        self.positives = [p.to(device) for p in self.positives]
        self.negatives = [n.to(device) for n in self.negatives]
        if self.pca is not None:
            self.pca = [p.to(device) for p in self.pca]
        return self

    def query(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder features per level → the query representation compared with the bank."""
        out = []
        for level, feature in enumerate(features):
            if self.similarity == "token-pca":
                assert self.pca is not None, "__init__ refuses token-pca without one PCA per level"
                out.append(self.pca[level](feature))
            elif self.similarity == "pooled" and feature.dim() == 3:
                out.append(feature.mean(dim=1))
            else:
                out.append(feature)
        return out

    def similarities(self, features: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level, the similarities ``(S, |P|)`` and ``(S, |N|)`` of each query slice."""
        dot = _token_dot if self.similarity == "token-pca" else _vector_dot
        out = []
        for q, p, n in zip(self.query(features), self.positives, self.negatives, strict=True):
            q = F.normalize(q, dim=-1)  # the bank was normalised once in __init__
            out.append((dot(q, p), dot(q, n)))
        return out

    def per_level(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Unweighted, reduced loss per level ``(levels,)``."""
        if len(features) != len(self.weights):
            raise ValueError(f"contrastive loss: expected {len(self.weights)} feature levels, found {len(features)}")
        values = []
        for positive, negative in self.similarities(features):
            loss = info_nce(positive, negative, tau=self.tau, tau_negative=self.tau_negative)
            values.append(loss.mean() if self.reduction == "mean" else loss.sum())
        return torch.stack(values)

    def __call__(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted sum over levels of the reduced per-slice losses (a scalar)."""
        levels = self.per_level(features)
        return (levels * torch.tensor(self.weights, device=levels.device, dtype=levels.dtype)).sum()
