"""Embedding banks and the semantic prior: save/load round trip, refusal of mismatched or corrupt banks,
gradients through the prior, build_prior and its cache, and the ``semrecon bank`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from semrecon_core.config import ConfigError, ReconConfig
from semrecon_core.encoders.janus import JanusImageEncoder, JanusLanguageEncoder
from semrecon_core.encoders.tiny import build_tiny_janus
from semrecon_core.priors.bank import BankError, bank_from_features, embed_images, load_bank
from semrecon_core.priors.factory import build_prior, clear_cache
from semrecon_core.priors.semantic import SemanticPrior

WEIGHTS = (0.005, 0.5, 1.0)


def _phantom(seed: int, size: int = 48) -> torch.Tensor:
    """A smooth random blob image ``(1, y, x)``, complex64."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.zeros(size, size)
    for _ in range(4):
        cy, cx, r = torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.4]) - torch.tensor([0.5, 0.5, -0.2])
        image += ((y - cy) ** 2 + (x - cx) ** 2 < r**2).float()
    return image[None].to(torch.complex64)


def _aliased(image: torch.Tensor) -> torch.Tensor:
    from semrecon_core.physics.fft import fft2c, ifft2c

    kspace = fft2c(image)
    kspace[..., 1::3, :] = 0
    kspace[..., 2::3, :] = 0
    return ifft2c(kspace)


@pytest.fixture(scope="module")
def encoder(tiny_janus: Path) -> JanusImageEncoder:
    return JanusImageEncoder.from_pretrained(str(tiny_janus))


@pytest.fixture(scope="module")
def features(encoder: JanusImageEncoder) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    positives = [_phantom(seed) for seed in range(3)]
    negatives = [_aliased(p) for p in positives]
    return embed_images(encoder, positives), embed_images(encoder, negatives)


@pytest.mark.parametrize("similarity", ["pooled", "token-pca", "centred"])
def test_saved_and_loaded_bank_reproduces_the_loss(encoder, features, tmp_path: Path, similarity: str) -> None:
    bank = bank_from_features(
        *features, identity=encoder.identity, similarity=similarity, weights=WEIGHTS, pca_dims=(8, 16, 16)
    )
    query = _phantom(7)
    before = SemanticPrior(encoder, bank, weights=WEIGHTS).loss(query)
    path = bank.save(tmp_path / "bank.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temporary left behind
    loaded = load_bank(path, encoder)
    assert loaded.metadata["similarity"] == similarity and loaded.metadata["encoder"] == encoder.identity
    after = SemanticPrior(encoder, loaded, weights=WEIGHTS).loss(query)
    assert torch.isfinite(before) and after.item() == pytest.approx(before.item(), rel=1e-6)
    if similarity == "token-pca":
        assert [p.components.shape[1] for p in loaded.pca] == [8, 16, 16]
        assert loaded.positives[0].shape == (3, 144, 8)
    if similarity == "centred":  # Figure-5 embeddings: the mean of per-token unit vectors
        tokens = torch.nn.functional.normalize(features[0][2], dim=-1).mean(1)
        assert torch.allclose(loaded.positives[2], tokens, atol=1e-6)
    assert loaded.metadata["separability"]["auc"] == pytest.approx(loaded.separability().auc)


def test_semantic_prior_gradients_reach_the_image_and_encoder_stays_frozen(encoder, features) -> None:
    bank = bank_from_features(*features, identity=encoder.identity, similarity="pooled", weights=WEIGHTS)
    prior = SemanticPrior(encoder, bank)
    image = _aliased(_phantom(11)).requires_grad_(True)
    loss = prior.loss(image)
    loss.backward()
    grad = torch.view_as_real(image.grad)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.vision.parameters())
    assert prior.last_embedding.shape == (1, 32) and prior.embed(image).shape == (1, 32)
    assert prior.answer(image) is None
    assert "RANDOM WEIGHTS" in prior.label


def test_descending_the_semantic_loss_lowers_it(encoder, features) -> None:
    bank = bank_from_features(*features, identity=encoder.identity, similarity="pooled", weights=WEIGHTS)
    prior = SemanticPrior(encoder, bank)
    image = _aliased(_phantom(11)).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([image], lr=0.02)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        loss = prior.loss(image)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bank_built_with_another_encoder_is_refused(tiny_janus, encoder, features, tmp_path: Path) -> None:
    bank = bank_from_features(*features, identity=encoder.identity, similarity="pooled", weights=WEIGHTS)
    path = bank.save(tmp_path / "bank.safetensors")
    other_layers = JanusImageEncoder.from_pretrained(str(tiny_janus), layers=(1, 12, 24))
    with pytest.raises(BankError, match="layers"):
        load_bank(path, other_layers)
    other_weights = build_tiny_janus(tmp_path / "other", seed=1)
    with pytest.raises(BankError, match="revision"):
        load_bank(path, JanusImageEncoder.from_pretrained(str(other_weights)))


def _rewrite_identity(path: Path, **changes: object) -> Path:
    """Rewrite a saved bank's encoder identity (``None`` removes a field), as an older or other build would have."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        metadata = json.loads(handle.metadata()["semrecon_bank"])
    for name, value in changes.items():
        if value is None:
            metadata["encoder"].pop(name, None)
        else:
            metadata["encoder"][name] = value
    save_file(tensors, str(path), metadata={"semrecon_bank": json.dumps(metadata)})
    return path


def test_bank_embedded_in_another_dtype_is_refused_naming_the_field(encoder, features, tmp_path: Path) -> None:
    bank = bank_from_features(*features, identity=encoder.identity, similarity="pooled", weights=WEIGHTS)
    assert bank.metadata["encoder"]["dtype"] == "float32"  # the image-only encoder's default precision
    path = _rewrite_identity(bank.save(tmp_path / "bf16.safetensors"), dtype="bfloat16")  # as built under bf16
    with pytest.raises(BankError, match=r"'dtype'.*expected 'float32'.*found 'bfloat16'"):
        load_bank(path, encoder)
    with pytest.raises(BankError, match="'dtype'"):
        SemanticPrior(encoder, load_bank(path), weights=WEIGHTS)
    assert "dtype: bfloat16" in load_bank(path).describe()
    # a bank written before the field existed is read as float32 and accepted
    legacy = _rewrite_identity(bank.save(tmp_path / "legacy.safetensors"), dtype=None)
    assert "dtype: float32 (not recorded)" in load_bank(legacy, encoder).describe()


def test_language_bank_records_its_prompt_rendering_and_old_banks_mean_janus_pro(tiny_janus, tmp_path: Path) -> None:
    public = JanusLanguageEncoder.from_pretrained(str(tiny_janus), instruction="public-code")
    embedded = embed_images(public, [_phantom(0), _phantom(1)])
    aliased = embed_images(public, [_aliased(_phantom(0)), _aliased(_phantom(1))])
    bank = bank_from_features(embedded, aliased, identity=public.identity, similarity="vector", weights=(1.0,))
    path = bank.save(tmp_path / "public.safetensors")
    assert load_bank(path, public).metadata["encoder"]["prompt"] == "public-code"
    # the same instruction rendered with Janus-Pro's roles (all a bank without the field can have been)
    _rewrite_identity(path, prompt=None)
    with pytest.raises(BankError, match=r"'prompt'.*expected 'public-code'.*found 'janus-pro'"):
        load_bank(path, public)


def test_corrupt_or_foreign_bank_files_give_clear_errors(encoder, features, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = bank_from_features(*features, identity=encoder.identity, similarity="pooled", weights=WEIGHTS).save(
        tmp_path / "bank.safetensors"
    )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BankError, match=r"truncated\.safetensors"):
        load_bank(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BankError, match="not a readable embedding bank"):
        load_bank(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(BankError, match="not a semrecon embedding bank"):
        load_bank(foreign)
    with pytest.raises(FileNotFoundError):
        load_bank(tmp_path / "absent.safetensors")


def _info_nce_by_hand(
    query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau_pos: float, tau_neg: float
) -> torch.Tensor:
    """Per-query ``−log Σ_p exp(s_p/τ_pos) / (Σ_p exp(s_p/τ_pos) + Σ_n exp(s_n/τ_neg))``, cosine ``s``."""
    unit = torch.nn.functional.normalize
    s_pos = unit(query.double(), dim=-1) @ unit(positives.double(), dim=-1).T
    s_neg = unit(query.double(), dim=-1) @ unit(negatives.double(), dim=-1).T
    numerator = torch.exp(s_pos / tau_pos).sum(-1)
    return -torch.log(numerator / (numerator + torch.exp(s_neg / tau_neg).sum(-1)))


def test_language_bank_and_prior(tiny_janus, tmp_path: Path) -> None:
    language = JanusLanguageEncoder.from_pretrained(str(tiny_janus))
    positives = [_phantom(seed) for seed in range(2)]
    pos = embed_images(language, positives, perturbations=2, sigma=0.03)
    neg = embed_images(language, [_aliased(p) for p in positives], perturbations=2, sigma=0.03, seed=1)
    assert pos[0].shape == (4, 64)
    bank = bank_from_features(pos, neg, identity=language.identity, similarity="vector", weights=(1.0,))
    loaded = load_bank(bank.save(tmp_path / "lang.safetensors"), language)
    image = torch.cat([_phantom(5), _aliased(_phantom(6))]).requires_grad_(True)  # two slices
    with torch.no_grad():
        query = language.encode(image)[0]
    bank_pos, bank_neg = loaded.positives[0], loaded.negatives[0]
    # paper: Eq. (3) with one temperature τ = 0.07 for positives and negatives, mean over slices
    expected = {"paper": _info_nce_by_hand(query, bank_pos, bank_neg, 0.07, 0.07).mean()}
    # public code (image-language): τ_pos = 0.1 for the positives, τ_neg = 0.7 for the negatives; a mean over slices
    # (the authors' sum runs over the unrolled network's stage queries, which the engine adds up)
    expected["public-code"] = _info_nce_by_hand(query, bank_pos, bank_neg, 0.1, 0.7).mean()
    swapped = _info_nce_by_hand(query, bank_pos, bank_neg, 0.7, 0.1).mean()
    assert abs(swapped - expected["public-code"]) > 0.01 * abs(expected["public-code"])  # the check can tell
    for variant in ("paper", "public-code"):
        prior = SemanticPrior(language, loaded, variant=variant)
        image.grad = None
        loss = prior.loss(image)
        loss.backward()
        assert loss.item() == pytest.approx(expected[variant].item(), rel=1e-4), variant
        assert torch.isfinite(torch.view_as_real(image.grad)).all()
    answers = prior.answer(image.detach())
    assert len(answers) == 2 and all(set(answer) >= {"answer", "choice", "p_high", "p_low"} for answer in answers)
    with pytest.raises(BankError, match="instruction"):
        SemanticPrior(JanusLanguageEncoder.from_pretrained(str(tiny_janus), instruction="table-s1-3"), loaded)
    # centred: the cosine after subtracting the bank's P ∪ N mean of the unit-normalised LLM states
    centred = bank_from_features(pos, neg, identity=language.identity, similarity="centred", weights=(1.0,))
    unit = torch.nn.functional.normalize
    centre = torch.cat([unit(pos[0], dim=-1), unit(neg[0], dim=-1)]).mean(0)
    expected_centred = _info_nce_by_hand(
        unit(query, dim=-1) - centre, unit(pos[0], dim=-1) - centre, unit(neg[0], dim=-1) - centre, 0.07, 0.07
    ).mean()
    value = SemanticPrior(language, centred).loss(image.detach())
    assert value.item() == pytest.approx(expected_centred.item(), rel=1e-4)
    # K = 2 perturbed embeddings per image are held out together
    assert (
        bank_from_features(
            pos, neg, identity=language.identity, similarity="centred", weights=(1.0,), extra={"perturbations": 2}
        )
        .separability()
        .group
        == 2
    )


def test_build_prior_none_tv_semantic_and_cache(tiny_janus, encoder, features, tmp_path: Path) -> None:
    assert build_prior(ReconConfig(prior="none"), "cpu") is None
    assert build_prior(ReconConfig(prior="tv"), "cpu").label.startswith("TV")
    with pytest.raises(ConfigError, match="bank"):
        build_prior(ReconConfig(backbone="unet", prior="semantic", encoder=str(tiny_janus)), "cpu")
    config = ReconConfig(backbone="unet", prior="semantic", encoder=str(tiny_janus))
    similarity = config.resolved().similarity  # the paper preset's
    bank = bank_from_features(*features, identity=encoder.identity, similarity=similarity, weights=WEIGHTS)
    config = config.replace(bank=str(bank.save(tmp_path / "bank.safetensors")))
    clear_cache()
    prior = build_prior(config, "cpu")
    assert isinstance(prior, SemanticPrior) and build_prior(config, "cpu") is prior
    assert torch.isfinite(prior.loss(_phantom(3)))
    with pytest.raises(ConfigError, match="similarity"):
        build_prior(config.replace(preset="public-code"), "cpu")
    clear_cache()


def test_bank_cli_builds_from_images_and_kspace_and_refuses_undersampled_positives(
    tiny_janus, tmp_path: Path, capsys
) -> None:
    from semrecon_core.commands.main import main
    from semrecon_core.physics.fft import fft2c

    images = torch.cat([_phantom(s, 200).abs() for s in range(2)]).numpy().astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    coils = torch.stack([_phantom(4, 200), _phantom(4, 200) * 0.5j])[:, 0]  # (coils, y, x)
    np.save(tmp_path / "kspace.npy", fft2c(coils).numpy().astype(np.complex64))
    out = tmp_path / "bank.safetensors"
    argv = [
        "bank",
        "build",
        str(out),
        "--positives",
        str(tmp_path / "images.npy"),
        str(tmp_path / "kspace.npy"),
        "--encoder",
        str(tiny_janus),
        "--device",
        "cpu",
        "--similarity",
        "token-pca",
        "--pca-dims",
        "4,4,4",
    ]
    assert main(argv) == 0
    bank = load_bank(out)
    assert bank.positives[0].shape == (3, 144, 4)
    assert bank.negatives[0].shape == (12, 144, 4)  # four simulated negatives per positive slice by default
    records = bank.metadata["sources"]
    assert [r["slices"] for r in records] == [2, 1] and all(len(r["sha256"]) == 64 for r in records)
    assert [len(r["simulated_negatives_R"]) for r in records] == [8, 4]
    assert all(3 <= R <= 8 for r in records for R in r["simulated_negatives_R"])
    assert "separability (leave-one-out" in capsys.readouterr().out  # build reports it
    assert main(["bank", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed and "AUC" in printed and "dtype: float32" in printed
    undersampled = fft2c(coils).numpy().astype(np.complex64)
    undersampled[:, ::2] = 0
    np.save(tmp_path / "under.npy", undersampled)
    assert (
        main(
            [
                "bank",
                "build",
                str(tmp_path / "b2.safetensors"),
                "--positives",
                str(tmp_path / "under.npy"),
                "--encoder",
                str(tiny_janus),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "fully sampled" in capsys.readouterr().err
    assert not (tmp_path / "b2.safetensors").exists()


def test_bank_info_measures_separability_of_banks_that_lack_it(encoder, features, tmp_path: Path, capsys) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from semrecon_core.commands.main import main

    bank = bank_from_features(*features, identity=encoder.identity, similarity="centred", weights=WEIGHTS)
    expected = bank.separability()
    path = bank.save(tmp_path / "old.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        metadata = json.loads(handle.metadata()["semrecon_bank"])
    del metadata["separability"]
    save_file(tensors, str(path), metadata={"semrecon_bank": json.dumps(metadata)})
    assert main(["bank", "info", str(path)]) == 0
    assert f"AUC {expected.auc:.3f}" in capsys.readouterr().out


def test_cli_builds_language_banks_with_the_presets_rendering_and_similarity(
    tiny_janus, tmp_path: Path, capsys
) -> None:
    from semrecon_core.commands.main import main

    images = torch.cat([_phantom(s, 200).abs() for s in range(2)]).numpy().astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    common = ["--positives", str(tmp_path / "images.npy"), "--encoder", str(tiny_janus), "--device", "cpu"]
    language = ["--kind", "language", "--perturbations", "2"]
    built = {}
    for preset in ("public-code", "paper"):
        out = tmp_path / f"{preset}.safetensors"
        assert main(["bank", "build", str(out), *common, *language, "--preset", preset]) == 0
        assert "one image's 2 embeddings held out" in capsys.readouterr().out
        built[preset] = load_bank(out)
    public = built["public-code"]
    assert public.metadata["encoder"]["prompt"] == "public-code"
    assert public.metadata["encoder"]["instruction"].endswith("Respond with single word.")
    assert public.similarity == "vector" and public.positives[0].shape == (4, 64)  # 2 images × K = 2
    assert public.metadata["separability"]["group"] == 2
    paper = built["paper"]
    assert paper.metadata["encoder"]["prompt"] == "janus-pro"
    expected = "centred" if ReconConfig(backbone="unet").resolved().similarity == "centred" else "vector"
    assert paper.similarity == expected
    wrong = ["bank", "build", str(tmp_path / "x.safetensors"), *common, *language, "--similarity", "pooled"]
    assert main(wrong) == 2
    assert "vector, centred" in capsys.readouterr().err
