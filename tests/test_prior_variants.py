"""Departures of the semantic prior from the paper, each a setting: random views (``views``) and the hinge at the
bank's positives (``hinge=bank``); and the near-Nyquist energy the demo reports.

The prior runs on the session's tiny random Janus and its bank (``conftest.py``): the numbers it gives mean nothing
about a pretrained encoder, but the arithmetic of the loss is the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semrecon_core.config import ConfigError, ReconConfig
from semrecon_core.metrics import near_nyquist_energy
from semrecon_core.priors.views import random_views, rescale

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(slices: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(slices, size, size, generator=generator, dtype=torch.complex64)


def test_random_views_keep_the_image_first_and_vary_the_others() -> None:
    image = _image()
    views = random_views(image, 4, torch.Generator().manual_seed(0))
    assert views.shape == (8, 32, 32) and views.dtype == image.dtype
    assert torch.equal(views[:2], image)
    for k in range(1, 4):
        assert not torch.allclose(views[2 * k : 2 * k + 2], image)
    again = random_views(image, 4, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)  # the generator decides
    with pytest.raises(ValueError, match="views: expected at least 1"):
        random_views(image, 0, torch.Generator())


def test_rescale_is_the_identity_at_one_and_differentiable() -> None:
    image = _image().requires_grad_(True)
    assert rescale(image, 1.0) is image
    bigger = rescale(image, 1.1)
    assert bigger.shape == image.shape
    bigger.abs().sum().backward()
    assert image.grad is not None and torch.isfinite(torch.view_as_real(image.grad)).all()
    # a centred disc grows: more of it inside the same grid
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 64).to(torch.complex64)[None]
    assert rescale(disc, 1.1).abs().sum() > disc.abs().sum() > rescale(disc, 0.9).abs().sum()


def _prior(tiny_janus_bank: tuple[Path, Path], **settings: object):
    from semrecon_core.priors.factory import build_prior

    encoder, bank = tiny_janus_bank
    config = ReconConfig(backbone="unet", prior="semantic", bank=str(bank), encoder=str(encoder), device="cpu")
    return build_prior(config.replace(**settings).resolved(), torch.device("cpu"))


def test_views_average_the_per_slice_losses(tiny_janus_bank: tuple[Path, Path]) -> None:
    plain = _prior(tiny_janus_bank)
    viewed = _prior(tiny_janus_bank, views=3, seed=7)
    assert plain.views == 1 and viewed.views == 3 and "3 views" in viewed.label
    image = _image(size=64)
    with torch.no_grad():
        loss = float(viewed.loss(image))
        batch = random_views(image, 3, torch.Generator().manual_seed(7))
        per_view = plain.contrastive.per_slice(plain.encoder.encode(batch)).view(3, 2)
        first = float(plain.loss(image))
    assert loss == pytest.approx(float(per_view.mean()), rel=1e-5)
    assert first == pytest.approx(float(per_view[0].mean()), rel=1e-5)  # view 0 is the image
    assert viewed.last_embedding is not None and viewed.last_embedding.shape[0] == 2


def test_the_hinge_stops_at_the_bank_positives_level(tiny_janus_bank: tuple[Path, Path]) -> None:
    from semrecon_core.priors.contrastive import leave_one_out

    plain = _prior(tiny_janus_bank)
    hinged = _prior(tiny_janus_bank, hinge="bank")
    bank = hinged.bank
    expected = leave_one_out(
        bank.positives,
        bank.negatives,
        similarity=bank.similarity,
        weights=hinged.contrastive.weights,
        tau=hinged.contrastive.tau,
    ).positive_loss
    assert hinged.margin == pytest.approx(expected) and "hinge at the bank's positives" in hinged.label
    image = _image(size=64)
    with torch.no_grad():
        per_slice = plain.contrastive.per_slice(plain.encoder.encode(image))
        assert float(hinged.loss(image)) == pytest.approx(float(torch.relu(per_slice - expected).mean()), rel=1e-5)
    # above every slice's loss the hinge is flat: no loss, no gradient
    hinged.margin = float(per_slice.max()) + 1.0
    point = image.clone().requires_grad_(True)
    loss = hinged.loss(point)
    loss.backward()
    assert float(loss.detach()) == 0.0 and point.grad is not None and float(point.grad.abs().max()) == 0.0
    # below every slice's loss it is Eq. (3) shifted by the margin
    hinged.margin = float(per_slice.min()) - 1.0
    with torch.no_grad():
        assert float(hinged.loss(image)) == pytest.approx(float(per_slice.mean()) - hinged.margin, rel=1e-5)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="property 'hinge'"):
        ReconConfig(hinge="always")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="property 'views'"):
        ReconConfig(views=0)
    config = ReconConfig.from_properties({"hinge": "bank", "views": "4"})
    assert (config.hinge, config.views) == ("bank", 4)


def test_near_nyquist_energy_sees_a_checkerboard() -> None:
    size = 64
    yy, xx = np.mgrid[:size, :size]
    smooth = np.exp(-((yy - 32.0) ** 2 + (xx - 32.0) ** 2) / 50.0)
    checker = smooth * (1 + 0.05 * (-1.0) ** (yy + xx))
    lines = smooth * (1 + 0.05 * (-1.0) ** yy)
    base = near_nyquist_energy(smooth)
    assert base < -10  # a smooth Gaussian has (almost) nothing there
    assert near_nyquist_energy(checker) > base + 5 and near_nyquist_energy(lines) > base + 5
    # the band: on a flat image, a cosine of 22 cycles per 64 px (0.69 × Nyquist) is outside, 26 (0.81 ×) inside
    below = 1 + 0.05 * np.cos(2 * np.pi * 22 * xx / size)
    above = 1 + 0.05 * np.cos(2 * np.pi * 26 * xx / size)
    assert near_nyquist_energy(below) < -10 < near_nyquist_energy(above)
    assert near_nyquist_energy(np.stack([smooth, smooth])) == pytest.approx(base)
    assert near_nyquist_energy(3.0 * smooth) == pytest.approx(base)  # scaled to max 1 first
    with pytest.raises(ValueError, match="all zero"):
        near_nyquist_energy(np.zeros((8, 8)))


def test_leave_one_out_holds_a_positive_out_with_its_own_negatives() -> None:
    from semrecon_core.priors.contrastive import leave_one_out

    generator = torch.Generator().manual_seed(0)
    positives = torch.randn(6, 16, generator=generator)
    # each negative a near twin of its positive: left in the bank, it outscores the other positives
    negatives = torch.cat([positives + 0.05 * torch.randn(6, 16, generator=generator) for _ in range(2)])
    parents = list(range(6)) * 2
    options = {"similarity": "pooled", "weights": (1.0,), "tau": 0.07}
    plain = leave_one_out([positives], [negatives], **options)
    grouped = leave_one_out([positives], [negatives], negative_parents=parents, **options)
    assert grouped.positive_loss < plain.positive_loss - 1.0
    # by hand: each positive scored without itself and its own twins, counts corrected to the full bank
    unit = torch.nn.functional.normalize(torch.cat([positives, negatives]).double(), dim=-1)
    by_hand = np.mean([float(_loss_of(k, unit, parents)) for k in range(6)])
    assert grouped.positive_loss == pytest.approx(by_hand, rel=1e-9)
    with pytest.raises(ValueError, match="negative_parents"):
        leave_one_out([positives], [negatives], negative_parents=[0] * 5, **options)


def _loss_of(index: int, unit: torch.Tensor, parents: list[int]) -> torch.Tensor:
    """Eq. (3) of positive ``index`` with itself and its own negatives left out, counts corrected."""
    logits = unit[index] @ unit.T / 0.07
    others = [k for k in range(6) if k != index]
    kept = [6 + j for j, parent in enumerate(parents) if parent != index]
    pos = torch.logsumexp(logits[others] + np.log(6 / 5), 0)
    every = torch.logsumexp(torch.cat([logits[others] + np.log(6 / 5), logits[kept] + np.log(12 / len(kept))]), 0)
    return every - pos
