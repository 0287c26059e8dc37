"""Contrastive losses: Eq. (3) against a slow direct implementation, the public-code variants, and
ranking of real Janus-Pro LLM embeddings (../shared/data)."""

from __future__ import annotations

import math

import pytest
import torch

from semrecon_core.priors.contrastive import PCA, ContrastiveLoss, cosine_matrix, info_nce, token_cosine


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


@pytest.mark.parametrize("variant", ["paper", "public-code"])
def test_real_janus_embeddings_held_out_positives_score_lower(shared_data, variant: str) -> None:
    h5py = pytest.importorskip("h5py")
    path = shared_data / "janus_llm_embeddings" / "high_vs_low_quality.h5"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with h5py.File(path, "r") as file:
        positives = torch.from_numpy(file["pos_features"][:])
        negatives = torch.from_numpy(file["neg_features"][:])
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
