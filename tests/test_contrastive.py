"""Contrastive losses: Eq. (3) against a slow direct implementation, the public-code variants, the centred
(Figure-5) similarity, leave-one-out separability, and ranking of real Janus-Pro LLM embeddings (../shared/data)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from semrecon_core.priors.contrastive import (
    PCA,
    ContrastiveLoss,
    auc,
    cosine_matrix,
    figure5_embedding,
    info_nce,
    leave_one_out,
    token_cosine,
)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _eq3_direct(query, positives, negatives, tau: float) -> float:
    """Eq. (3) written out literally with Python floats: −(1/N) Σ_i log(Σ_p e^{s/τ} / (Σ_p + Σ_n))."""
    total = 0.0
    for e in query.tolist():
        pos = sum(math.exp(_cos(e, p) / tau) for p in positives.tolist())
        neg = sum(math.exp(_cos(e, n) / tau) for n in negatives.tolist())
        total += -math.log(pos / (pos + neg))
    return total / len(query)


def test_multi_level_loss_equals_direct_eq3_on_random_data() -> None:
    g = torch.Generator().manual_seed(1)
    dims = (8, 16, 12)
    weights = (0.005, 0.5, 1.0)
    tokens = [torch.randn(3, 5, d, generator=g) for d in dims]  # query: 3 slices, 5 tokens
    positives = [torch.randn(4, 5, d, generator=g) for d in dims]
    negatives = [torch.randn(6, 5, d, generator=g) for d in dims]
    pooled_p = [p.mean(1) for p in positives]
    pooled_n = [n.mean(1) for n in negatives]
    loss = ContrastiveLoss(pooled_p, pooled_n, weights=weights, similarity="pooled", tau=0.07)(tokens)
    expected = sum(
        w * _eq3_direct(q.mean(1), p, n, 0.07) for w, q, p, n in zip(weights, tokens, pooled_p, pooled_n, strict=True)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_public_code_language_variant_equals_direct_formula() -> None:
    g = torch.Generator().manual_seed(2)
    query, positives, negatives = (
        torch.randn(3, 10, generator=g),
        torch.randn(5, 10, generator=g),
        torch.randn(7, 10, generator=g),
    )
    loss = ContrastiveLoss(
        [positives],
        [negatives],
        weights=[1.0],
        similarity="vector",
        tau=0.1,
        tau_negative=0.7,
        reduction="sum",
    )([query])
    expected = 0.0
    for e in query.tolist():
        pos = [_cos(e, p) / 0.1 for p in positives.tolist()]
        neg = [_cos(e, n) / 0.7 for n in negatives.tolist()]
        lse_pos = math.log(sum(math.exp(v) for v in pos))
        lse_all = math.log(sum(math.exp(v) for v in pos + neg))
        expected += -(lse_pos - lse_all)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_token_pca_similarity_is_mean_per_token_cosine() -> None:
    g = torch.Generator().manual_seed(3)
    bank_tokens = torch.randn(6, 7, 9, generator=g)
    pca = PCA.fit(bank_tokens.reshape(-1, 9), 4)
    components = pca.components
    assert torch.allclose(components.T @ components, torch.eye(4), atol=1e-5)
    query = torch.randn(2, 7, 9, generator=g)
    projected_q, projected_b = pca(query), pca(bank_tokens)
    sims = token_cosine(projected_q, projected_b)
    for s in range(2):
        for m in range(6):
            direct = sum(_cos(projected_q[s, t].tolist(), projected_b[m, t].tolist()) for t in range(7)) / 7
            assert sims[s, m].item() == pytest.approx(direct, abs=1e-5)
    loss = ContrastiveLoss([projected_b[:3]], [projected_b[3:]], weights=[1.0], similarity="token-pca", pca=[pca])
    expected = info_nce(sims[:, :3], sims[:, 3:], tau=0.07).mean()
    assert loss([query]).item() == pytest.approx(expected.item(), rel=1e-5)


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _figure5(tokens: list[list[float]]) -> list[float]:
    """Mean over tokens of the per-token unit vectors, written out."""
    units = [_unit(t) for t in tokens]
    return [sum(u[d] for u in units) / len(units) for d in range(len(units[0]))]


def test_centred_similarity_is_the_cosine_of_figure5_embeddings_minus_the_bank_mean() -> None:
    g = torch.Generator().manual_seed(7)
    shared = 5 * torch.randn(6, generator=g)  # a common direction, as in Janus states
    query = shared + torch.randn(2, 4, 6, generator=g)  # 2 slices, 4 tokens
    positives = [_figure5(t) for t in (shared + torch.randn(3, 4, 6, generator=g)).tolist()]
    negatives = [_figure5(t) for t in (shared + torch.randn(5, 4, 6, generator=g)).tolist()]
    bank = positives + negatives
    centre = [sum(e[d] for e in bank) / len(bank) for d in range(6)]

    def centred(v: list[float]) -> list[float]:
        return [a - b for a, b in zip(v, centre, strict=True)]

    expected = 0.0
    for tokens in query.tolist():
        e = centred(_figure5(tokens))
        pos = sum(math.exp(_cos(e, centred(p)) / 0.07) for p in positives)
        neg = sum(math.exp(_cos(e, centred(n)) / 0.07) for n in negatives)
        expected += -math.log(pos / (pos + neg)) / 2
    loss = ContrastiveLoss([torch.tensor(positives)], [torch.tensor(negatives)], weights=[1.0], similarity="centred")
    assert loss([query]).item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(figure5_embedding(query)[0], torch.tensor(_figure5(query[0].tolist())), atol=1e-6)


def _loo_direct(positives, negatives, similarity: str, group: int, full: bool, tau: float = 0.07) -> tuple[list, list]:
    """Leave-one-out Eq. (3) losses written out: each held-out group against the remaining rows.

    ``full``: the held-out role's sum over the rest is scaled up to that role's count in the whole bank.
    """
    rows = [(r, True, i // group) for i, r in enumerate(positives.tolist())]
    offset = -(-len(positives) // group)
    rows += [(r, False, offset + i // group) for i, r in enumerate(negatives.tolist())]

    def similarity_of(a, b, centre) -> float:
        if similarity == "token-pca":
            return sum(_cos(x, y) for x, y in zip(a, b, strict=True)) / len(a)
        if similarity == "centred":
            return _cos(
                [x - c for x, c in zip(a, centre, strict=True)], [y - c for y, c in zip(b, centre, strict=True)]
            )
        return _cos(a, b)

    out: tuple[list, list] = ([], [])
    for row, positive, held in rows:
        rest = [(r, p) for r, p, g in rows if g != held]
        centre = [sum(r[d] for r, _ in rest) / len(rest) for d in range(len(row))] if similarity == "centred" else None
        pos = sum(math.exp(similarity_of(row, r, centre) / tau) for r, p in rest if p)
        neg = sum(math.exp(similarity_of(row, r, centre) / tau) for r, p in rest if not p)
        if full:
            role = [p for _, p, _ in rows].count(positive)
            scale = role / (role - sum(1 for _, p, g in rows if g == held))
            pos, neg = (pos * scale, neg) if positive else (pos, neg * scale)
        out[0 if positive else 1].append(-math.log(pos / (pos + neg)))
    return out


@pytest.mark.parametrize(
    ("similarity", "group", "full"),
    [("vector", 1, True), ("vector", 1, False), ("centred", 1, True), ("centred", 2, True), ("token-pca", 1, False)],
)
def test_leave_one_out_equals_a_direct_computation(similarity: str, group: int, full: bool) -> None:
    g = torch.Generator().manual_seed(8)
    shape = (3, 4) if similarity == "token-pca" else (4,)
    positives = 2 + torch.randn(6, *shape, generator=g)
    negatives = 2 + 0.5 * torch.randn(4, *shape, generator=g) + 0.7
    if similarity == "centred":  # a centred bank stores Figure-5 embeddings; for vectors: unit vectors
        positives, negatives = figure5_embedding(positives), figure5_embedding(negatives)
    result = leave_one_out(
        [positives], [negatives], similarity=similarity, weights=[2.0], group=group, full_counts=full, block=3
    )
    loss_p, loss_n = _loo_direct(positives, negatives, similarity, group, full)
    expected_auc = sum((a < b) + 0.5 * (a == b) for a in loss_p for b in loss_n) / (len(loss_p) * len(loss_n))
    assert result.auc == pytest.approx(expected_auc) and result.level_auc == [pytest.approx(expected_auc)]
    assert result.positive_loss == pytest.approx(2 * sum(loss_p) / len(loss_p), rel=1e-6)
    assert result.negative_loss == pytest.approx(2 * sum(loss_n) / len(loss_n), rel=1e-6)
    assert result.group == group and result.gap == pytest.approx(result.negative_loss - result.positive_loss)


def test_auc_counts_ties_half_and_leave_one_out_needs_two_groups_per_role() -> None:
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="two held-out groups"):
        leave_one_out([torch.randn(2, 3)], [torch.randn(4, 3)], similarity="pooled", weights=[1.0], group=2)


def test_pca_captures_the_dominant_direction() -> None:
    g = torch.Generator().manual_seed(4)
    direction = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    samples = torch.randn(500, 1, generator=g) * 5 * direction + 0.1 * torch.randn(500, 6, generator=g)
    axis = PCA.fit(samples, 1).components[:, 0]
    assert abs(float(axis @ direction)) > 0.99


def test_loss_is_stable_at_tiny_temperature_and_gradients_are_finite() -> None:
    g = torch.Generator().manual_seed(5)
    query = torch.randn(2, 8, generator=g, requires_grad=True)
    loss = ContrastiveLoss([torch.randn(3, 8, generator=g)], [torch.randn(3, 8, generator=g)], weights=[1.0], tau=1e-4)
    value = loss([query])
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(query.grad).all()


def test_loss_prefers_queries_near_the_positives() -> None:
    g = torch.Generator().manual_seed(6)
    centre_p, centre_n = torch.randn(16, generator=g), torch.randn(16, generator=g)
    positives = centre_p + 0.1 * torch.randn(5, 16, generator=g)
    negatives = centre_n + 0.1 * torch.randn(5, 16, generator=g)
    loss = ContrastiveLoss([positives], [negatives], weights=[1.0], similarity="vector")
    assert loss([centre_p[None]]) < 0.05 < loss([centre_n[None]])


def test_mismatched_levels_are_rejected() -> None:
    with pytest.raises(ValueError, match="weights"):
        ContrastiveLoss([torch.randn(2, 3)], [torch.randn(2, 3)], weights=[1.0, 2.0])
    loss = ContrastiveLoss([torch.randn(2, 3)], [torch.randn(2, 3)], weights=[1.0])
    with pytest.raises(ValueError, match="feature levels"):
        loss([torch.randn(1, 3), torch.randn(1, 3)])


def _real_janus_embeddings(shared_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' Janus LLM states of high- and low-quality images, ``(positives, negatives)``; skip if absent."""
    h5py = pytest.importorskip("h5py")
    path = shared_data / "janus_llm_embeddings" / "high_vs_low_quality.h5"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with h5py.File(path, "r") as file:
        return torch.from_numpy(file["pos_features"][:]), torch.from_numpy(file["neg_features"][:])


@pytest.mark.parametrize("variant", ["paper", "public-code"])
def test_real_janus_embeddings_held_out_positives_score_lower(shared_data, variant: str) -> None:
    positives, negatives = _real_janus_embeddings(shared_data)
    assert positives.shape == negatives.shape == (37, 2048)
    g = torch.Generator().manual_seed(0)
    order_p, order_n = torch.randperm(37, generator=g), torch.randperm(37, generator=g)
    bank_p, held_p = positives[order_p[:25]], positives[order_p[25:]]
    bank_n, held_n = negatives[order_n[:25]], negatives[order_n[25:]]
    options = {"tau": 0.07} if variant == "paper" else {"tau": 0.1, "tau_negative": 0.7}
    loss_p = info_nce(cosine_matrix(held_p, bank_p), cosine_matrix(held_p, bank_n), **options)
    loss_n = info_nce(cosine_matrix(held_n, bank_p), cosine_matrix(held_n, bank_n), **options)
    assert loss_p.mean() < loss_n.mean()
    # Pairwise ranking (AUC) of held-out positives vs negatives, despite cosines all above 0.99.
    assert (loss_p[:, None] < loss_n[None, :]).float().mean() > 0.9


def test_real_janus_embeddings_centring_separates_p_from_n(shared_data) -> None:
    """The authors' Figure-5 recipe on their real LLM states: held out one at a time, centring ranks P/N perfectly."""
    positives, negatives = _real_janus_embeddings(shared_data)
    plain = leave_one_out([positives], [negatives], similarity="vector", weights=[1.0])
    centred = leave_one_out(
        [figure5_embedding(positives)], [figure5_embedding(negatives)], similarity="centred", weights=[1.0]
    )
    # REFERENCE.md §7: both rank perfectly; centring raises the gap from 0.035 to about 10
    assert plain.auc == centred.auc == 1.0
    assert plain.positive_loss == pytest.approx(0.672, abs=1e-3) and plain.negative_loss == pytest.approx(
        0.707, abs=1e-3
    )
    assert centred.gap > 9.0 and centred.d_prime > plain.d_prime
    # scored against the literal rest, one positive fewer outweighs the plain cosines' signal
    literal = leave_one_out([positives], [negatives], similarity="vector", weights=[1.0], full_counts=False)
    assert literal.auc < 0.9
