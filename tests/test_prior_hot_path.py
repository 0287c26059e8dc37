"""The semantic prior's per-iteration path: no host→device tensor built per loss call, and no image-language
answer (prompt pass + greedy decode) at the fitting loop's trace flushes unless asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from semrecon_core.priors.contrastive import ContrastiveLoss


def _bank(levels: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pos = [torch.randn(5, 8, generator=g) for _ in range(levels)]
    neg = [torch.randn(6, 8, generator=g) for _ in range(levels)]
    return pos, neg


def test_weighted_loss_uses_the_weights_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    pos, neg = _bank(3)
    weights = (0.005, 0.5, 1.0)
    loss = ContrastiveLoss(pos, neg, weights=weights, similarity="pooled")
    features = [torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1)) for _ in range(3)]
    expected = sum(w * v for w, v in zip(weights, loss.per_level(features).tolist(), strict=True))

    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("torch.tensor called inside the loss")

    monkeypatch.setattr(torch, "tensor", refuse)
    assert float(loss(features)) == pytest.approx(expected, rel=1e-6)
    assert loss.weight_tensor.dtype == torch.float32 and loss.to("cpu").weight_tensor.device.type == "cpu"


def test_language_status_does_not_answer_unless_asked(tiny_janus: Path) -> None:
    pytest.importorskip("transformers")
    from semrecon_core.encoders.janus import JanusLanguageEncoder
    from semrecon_core.priors.bank import bank_from_features, embed_images
    from semrecon_core.priors.semantic import SemanticPrior

    language = JanusLanguageEncoder.from_pretrained(str(tiny_janus))
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 32, 32, generator=g).to(torch.complex64) for _ in range(4)]
    pos = embed_images(language, images[:2], perturbations=2, sigma=0.03)
    neg = embed_images(language, images[2:], perturbations=2, sigma=0.03, seed=1)
    bank = bank_from_features(pos, neg, identity=language.identity, similarity="vector", weights=(1.0,))
    prior = SemanticPrior(language, bank)
    calls: list[int] = []
    answer = language.answer

    def counting(image: torch.Tensor, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append(image.shape[0])
        return answer(image, **kwargs)

    language.answer = counting  # type: ignore[method-assign]
    image = images[0].requires_grad_(True)
    prior.loss(image)
    status = prior.status(image.detach())
    assert "answer" not in status and calls == [] and len(status["embedding"]) == 1
    assert prior.answer(image.detach()) is not None and calls == [1]  # the final image's answer
    prior.trace_answers = True
    assert "answer" in prior.status(image.detach()) and calls == [1, 1]
