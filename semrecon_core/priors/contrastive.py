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
* Centred similarity, the embedding of the authors' Figure 5 used as a loss: the mean over tokens of the
  per-token L2-normalised states (a vector is just normalised), minus the mean of the bank's P ∪ N
  embeddings, then the cosine. Janus states are anisotropic (on the authors' real LLM embeddings every
  pairwise cosine is above 0.99), so without centring all similarities sit near 1 and Eq. (3) barely
  tells P from N; centring removes the shared direction (``benchmarks/results/similarity.md``).

:func:`leave_one_out` measures how well a bank separates its own positives from its negatives: each
embedding (or each image's group of perturbed embeddings) is held out in turn and scored with Eq. (3)
against the rest; the AUC says how often a held-out positive scores lower than a held-out negative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_PCA_DIMS = (64, 128, 256)
# pooled: cosine of token means (paper text); vector: cosine of given vectors (LLM states); token-pca: public
# code's image-only similarity; centred: the Figure-5 embedding centred on the bank.
SIMILARITIES = ("pooled", "vector", "token-pca", "centred")


def check_similarity(similarity: str) -> str:
    """``similarity`` after checking it is one of :data:`SIMILARITIES`."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {', '.join(SIMILARITIES)}, found {similarity!r}")
    return similarity


def figure5_embedding(features: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of per-token L2-normalised states: ``(S, T, D)`` → ``(S, D)``; vectors ``(S, D)`` normalised."""
    unit = F.normalize(features.float(), dim=-1)
    return unit.mean(dim=1) if unit.dim() == 3 else unit


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
            e.g. LLM states), ``token-pca`` (per-token cosine after ``pca``) or ``centred`` (cosine of
            Figure-5 embeddings after subtracting the mean of the bank's P ∪ N embeddings; the bank holds
            Figure-5 embeddings ``(M, D)``).
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
        check_similarity(similarity)
        if similarity == "token-pca" and (pca is None or len(pca) != len(positives)):
            raise ValueError("similarity 'token-pca' needs one fitted PCA per level")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected mean or sum, found {reduction!r}")
        self.similarity = similarity
        self.pca = list(pca) if pca is not None else None
        self.weights = [float(w) for w in weights]
        self.tau, self.tau_negative, self.reduction = tau, tau_negative, reduction
        # Centre (centred similarity) and normalise the bank once; the per-call work is one matmul per level.
        self.centres: list[torch.Tensor] | None = None
        if similarity == "centred":
            pairs = zip(positives, negatives, strict=True)
            self.centres = [torch.cat([p.float(), n.float()]).mean(0) for p, n in pairs]
            positives = [p.float() - c for p, c in zip(positives, self.centres, strict=True)]
            negatives = [n.float() - c for n, c in zip(negatives, self.centres, strict=True)]
        self.positives = [F.normalize(p.float(), dim=-1) for p in positives]
        self.negatives = [F.normalize(n.float(), dim=-1) for n in negatives]
        # The level weights as a tensor beside the bank: no host→device copy inside the fitting loop.
        self.weight_tensor = torch.tensor(self.weights, dtype=torch.float32, device=self.positives[0].device)

    def to(self, device: torch.device | str) -> ContrastiveLoss:
        """Move the bank (and PCA) to ``device`` in place; returns ``self``."""
        self.positives = [p.to(device) for p in self.positives]
        self.negatives = [n.to(device) for n in self.negatives]
        if self.pca is not None:
            self.pca = [p.to(device) for p in self.pca]
        if self.centres is not None:
            self.centres = [c.to(device) for c in self.centres]
        self.weight_tensor = self.weight_tensor.to(device)
        return self

    def query(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder features per level → the query representation compared with the bank."""
        out = []
        for level, feature in enumerate(features):
            if self.similarity == "token-pca":
                assert self.pca is not None, "__init__ refuses token-pca without one PCA per level"
                out.append(self.pca[level](feature))
            elif self.similarity == "centred":
                assert self.centres is not None, "__init__ computes the centres of a centred bank"
                out.append(figure5_embedding(feature) - self.centres[level])
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

    def per_slice(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted sum over levels of each query slice's loss ``(S,)`` (before the reduction over slices)."""
        if len(features) != len(self.weights):
            raise ValueError(f"contrastive loss: expected {len(self.weights)} feature levels, found {len(features)}")
        total = None
        for (positive, negative), weight in zip(self.similarities(features), self.weights, strict=True):
            loss = weight * info_nce(positive, negative, tau=self.tau, tau_negative=self.tau_negative)
            total = loss if total is None else total + loss
        assert total is not None, "a bank has at least one level"
        return total

    def __call__(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted sum over levels of the reduced per-slice losses (a scalar)."""
        levels = self.per_level(features)
        weights = self.weight_tensor
        if weights.device != levels.device or weights.dtype != levels.dtype:  # features off the bank's device
            weights = self.weight_tensor = weights.to(levels.device, levels.dtype)
        return (levels * weights).sum()


@dataclass
class Separability:
    """How well a bank's embeddings separate P from N, held out one at a time (:func:`leave_one_out`).

    Attributes:
        auc: probability that a held-out positive has a lower loss than a held-out negative (ties count
            half); 0.5 = no separation, 1 = perfect ranking.
        positive_loss: mean Eq. (3) loss of the held-out positives (weighted over levels).
        negative_loss: mean loss of the held-out negatives.
        d_prime: loss gap over the pooled standard deviation of the two groups' losses (infinite when
            the losses do not spread and the gap is positive).
        level_auc: the AUC of each level's loss alone.
        tau: temperature of the positives (and of the negatives unless ``tau_negative``).
        tau_negative: separate temperature of the negatives, if any.
        group: consecutive embeddings held out together (an image's perturbed embeddings).
    """

    auc: float
    positive_loss: float
    negative_loss: float
    d_prime: float
    level_auc: list[float]
    tau: float
    tau_negative: float | None
    group: int

    @property
    def gap(self) -> float:
        """Mean negative loss minus mean positive loss (positive: the loss prefers P)."""
        return self.negative_loss - self.positive_loss

    def as_dict(self) -> dict[str, float | int | list[float] | None]:
        """JSON-serialisable fields (stored in bank metadata)."""
        return {
            "auc": self.auc,
            "positive_loss": self.positive_loss,
            "negative_loss": self.negative_loss,
            "gap": self.gap,
            "d_prime": self.d_prime if math.isfinite(self.d_prime) else None,  # None: no spread, perfect
            "level_auc": self.level_auc,
            "tau": self.tau,
            "tau_negative": self.tau_negative,
            "group": self.group,
        }


def auc(lower: torch.Tensor, higher: torch.Tensor) -> float:
    """P(a value of ``lower`` < a value of ``higher``), ties counting half (Mann–Whitney)."""
    a, b = lower.double().flatten(), higher.double().flatten()
    below = torch.zeros((), dtype=torch.float64)
    for chunk in a.split(1024):
        below += (chunk[:, None] < b[None, :]).sum() + 0.5 * (chunk[:, None] == b[None, :]).sum()
    return float(below / (a.numel() * b.numel()))


def leave_one_out(
    positives: Sequence[torch.Tensor],
    negatives: Sequence[torch.Tensor],
    *,
    similarity: str,
    weights: Sequence[float],
    tau: float = 0.07,
    tau_negative: float | None = None,
    group: int = 1,
    negative_parents: Sequence[int] | None = None,
    full_counts: bool = True,
    block: int = 256,
) -> Separability:
    """Leave-one-out P/N separability of bank embeddings under Eq. (3).

    Each embedding is held out in turn (with ``group > 1``, the ``group`` consecutive embeddings of one
    image: its perturbed copies) and its loss is Eq. (3) against the remaining positives and negatives,
    weighted over levels. The centred similarity centres on the mean of the remaining embeddings.

    With ``full_counts`` (default) the held-out role's sum over the rest is scaled by ``M / (M − held)``, so
    every held-out embedding is scored against the bank's own P:N composition, as a reconstruction is.
    Without it, holding out a positive leaves one positive fewer and raises its loss by about
    ``log(M / (M − 1))``: 0.027 at M = 37, more than the whole P/N gap of plain cosines of Janus states.

    Args:
        positives: per level, the bank's stored positives: ``(M, D)`` vectors (pooled, vector, centred) or
            ``(M, T, d)`` projected tokens (token-pca).
        negatives: same layout.
        similarity: how the bank compares embeddings (:data:`SIMILARITIES`).
        weights: level weights.
        tau: temperature (of the positives when ``tau_negative`` is set).
        tau_negative: separate temperature of the negatives.
        group: consecutive embeddings that come from one image and are held out together.
        negative_parents: per negative image (``group`` embeddings each), the index of the positive image it was
            simulated from (−1: none); a positive is then held out together with its own negatives, so that it
            is scored as an image the bank has never seen is (its undersampled copies, near twins of it, would
            otherwise sit in N).
        full_counts: correct the held-out role's count (see above); ``False``: the literal rest.
        block: rows scored at a time (memory).

    Raises:
        ValueError: fewer than two held-out groups of positives or of negatives.
    """
    check_similarity(similarity)
    if len(positives) != len(negatives) or len(weights) != len(positives):
        raise ValueError(f"{len(positives)} positive levels, {len(negatives)} negative levels, {len(weights)} weights")
    count_p, count_n = positives[0].shape[0], negatives[0].shape[0]
    group = max(int(group), 1)
    groups_p, groups_n = -(-count_p // group), -(-count_n // group)
    if min(groups_p, groups_n) < 2:
        raise ValueError(
            f"leave-one-out needs at least two held-out groups of positives and of negatives, found "
            f"{groups_p} / {groups_n} (group size {group})"
        )
    is_positive = torch.cat([torch.ones(count_p, dtype=torch.bool), torch.zeros(count_n, dtype=torch.bool)])
    negative_ids = groups_p + torch.arange(count_n) // group
    if negative_parents is not None:
        parents = torch.as_tensor(list(negative_parents), dtype=torch.long)
        if parents.shape != (groups_n,) or int(parents.max()) >= groups_p:
            raise ValueError(f"negative_parents: expected {groups_n} image indices below {groups_p} (or −1)")
        parents = parents[torch.arange(count_n) // group]
        negative_ids = torch.where(parents >= 0, parents, negative_ids)
    ids = torch.cat([torch.arange(count_p) // group, negative_ids])
    scale = torch.where(is_positive, 1.0 / tau, 1.0 / (tau if tau_negative is None else tau_negative)).double()
    # log(M / (M − held)) on each role's columns, held = that role's embeddings held out with the row: the
    # rest's sums stand for the full bank's
    groups = int(ids.max()) + 1
    held_p = torch.bincount(ids[is_positive], minlength=groups)[ids].double()
    held_n = torch.bincount(ids[~is_positive], minlength=groups)[ids].double()
    if bool((held_p >= count_p).any() or (held_n >= count_n).any()):
        raise ValueError("leave-one-out: a held-out group holds every positive or every negative of the bank")
    if full_counts:
        offset_p, offset_n = torch.log(count_p / (count_p - held_p)), torch.log(count_n / (count_n - held_n))
    else:
        offset_p = offset_n = torch.zeros(count_p + count_n, dtype=torch.float64)
    total = torch.zeros(count_p + count_n, dtype=torch.float64)
    level_auc = []
    for p, n, weight in zip(positives, negatives, weights, strict=True):
        rows = torch.cat([p.detach().cpu(), n.detach().cpu()])
        losses = torch.empty(rows.shape[0], dtype=torch.float64)
        similarities = _loo_similarities(rows, ids, similarity)
        for start in range(0, rows.shape[0], block):
            index = torch.arange(start, min(start + block, rows.shape[0]))
            logits = similarities(index) * scale
            offset = torch.where(is_positive[None, :], offset_p[index][:, None], offset_n[index][:, None])
            logits = logits + offset
            logits = logits.masked_fill(ids[index][:, None] == ids[None, :], float("-inf"))
            every = torch.logsumexp(logits, dim=-1)
            pos = torch.logsumexp(logits.masked_fill(~is_positive[None, :], float("-inf")), dim=-1)
            losses[index] = every - pos
        level_auc.append(auc(losses[is_positive], losses[~is_positive]))
        total += float(weight) * losses
    loss_p, loss_n = total[is_positive], total[~is_positive]
    spread = float(((loss_p.var() + loss_n.var()) / 2).sqrt()) if min(count_p, count_n) > 1 else 0.0
    gap = float(loss_n.mean() - loss_p.mean())
    return Separability(
        auc=auc(loss_p, loss_n),
        positive_loss=float(loss_p.mean()),
        negative_loss=float(loss_n.mean()),
        d_prime=gap / spread if spread > 0 else float("inf") if gap > 0 else 0.0,
        level_auc=level_auc,
        tau=tau,
        tau_negative=tau_negative,
        group=group,
    )


def _loo_similarities(rows: torch.Tensor, ids: torch.Tensor, similarity: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``similarities(index) -> (len(index), n)``: each held-out row against every row (float64)."""
    if similarity == "token-pca":
        unit = F.normalize(rows.float(), dim=-1).flatten(1)
        tokens = rows.shape[1]
        return lambda index: (unit[index] @ unit.T).double() / tokens
    if similarity != "centred":
        vectors = rows.mean(1) if rows.dim() == 3 else rows
        unit64 = F.normalize(vectors.double(), dim=-1)
        return lambda index: unit64[index] @ unit64.T
    # Centred: cos(x_j − c_i, x_i − c_i) with c_i the mean of the rows outside row i's group, expanded so
    # that no (rows × rows × D) tensor is formed.
    x = (figure5_embedding(rows) if rows.dim() == 3 else rows).double()
    group_sums = torch.zeros(int(ids.max()) + 1, x.shape[1], dtype=torch.float64).index_add_(0, ids, x)
    group_sizes = torch.bincount(ids).double()
    norms = (x * x).sum(-1)

    def centred(index: torch.Tensor) -> torch.Tensor:
        g = ids[index]
        c = (x.sum(0) - group_sums[g]) / (x.shape[0] - group_sizes[g])[:, None]
        cx = c @ x.T  # c_i · x_j
        own = (c * x[index]).sum(-1)  # c_i · x_i
        cc = (c * c).sum(-1)
        dot = x[index] @ x.T - cx - own[:, None] + cc[:, None]
        norm_j = (norms[None, :] - 2 * cx + cc[:, None]).clamp_min(1e-30).sqrt()
        norm_i = (norms[index] - 2 * own + cc).clamp_min(1e-30).sqrt()
        return dot / (norm_j * norm_i[:, None])

    return centred
