"""ReconConfig: presets, property parsing and validation errors that name the problem."""

from __future__ import annotations

import pytest

from semrecon_core.config import ConfigError, ReconConfig


def test_paper_preset_is_default_and_fills_unset_fields() -> None:
    config = ReconConfig(backbone="unet", prior="semantic").resolved()
    assert config.preset == "paper"
    assert config.level_weights == (0.005, 0.5, 1.0)
    assert config.similarity == "centred"  # the Figure-5 recipe: benchmarks/results/similarity.md
    assert config.sigma == 0.03


def test_public_code_preset_and_per_backbone_defaults() -> None:
    config = ReconConfig(backbone="inr", prior="semantic", preset="public-code").resolved()
    assert config.level_weights == (0.01, 0.5, 1.0)
    assert config.lr == 1e-4
    assert config.lam == 5.0
    assert config.iterations == 1600
    assert config.final_dc == 0.05  # the authors' soft data-consistency step


@pytest.mark.parametrize(
    ("preset", "backbone", "prior", "kind", "expected"),
    [
        # public-code: the authors' λ on the authors' losses; TV keeps the INR phase-1 TV/data gradient ratio
        ("public-code", "unet", "semantic", "image", {"lam": 0.1, "iterations": 1500, "final_dc": 0.5}),
        ("public-code", "unrolled", "semantic", "image", {"lam": 1.0, "stages": 4, "dc_init": 0.01}),
        ("public-code", "unrolled", "semantic", "language", {"lam": 500.0, "iterations": 200, "stages": 8}),
        ("public-code", "unrolled", "semantic", "language", {"dc_init": 0.001, "final_dc": 0.5}),
        ("public-code", "unet", "tv", None, {"lam": 0.75}),
        ("public-code", "unrolled", "tv", None, {"lam": 6.75}),
        ("public-code", "inr", "tv", None, {"lam": 3.0}),
        # paper: TV at CS-TV's λ, semantic λ calibrated (benchmarks/results/calibration.md)
        ("paper", "unet", "tv", None, {"lam": 0.003, "final_dc": 0.0}),
        ("paper", "inr", "tv", None, {"lam": 0.003, "lr": 1e-4}),
        ("paper", "unet", "semantic", "image", {"lam": 0.0016}),
        ("paper", "unrolled", "semantic", "image", {"lam": 0.0018}),
        ("paper", "inr", "semantic", "image", {"lam": 0.02}),
        ("paper", "unet", "semantic", "language", {"lam": 0.47, "iterations": 200, "stages": 8}),
        ("paper", "unet", "none", None, {"lam": 0.0}),
    ],
)
def test_defaults_per_preset_backbone_prior_and_bank_kind(
    preset: str, backbone: str, prior: str, kind: str | None, expected: dict[str, float]
) -> None:
    config = ReconConfig(backbone=backbone, prior=prior, preset=preset).resolved(kind)  # type: ignore[arg-type]
    assert {name: getattr(config, name) for name in expected} == expected


def test_explicit_values_win_over_the_preset() -> None:
    config = ReconConfig(backbone="unet", prior="tv", lam=0.3, iterations=7).resolved()
    assert (config.lam, config.iterations) == (0.3, 7)


def test_classical_defaults_ignore_network_settings() -> None:
    assert ReconConfig(backbone="sense", prior="tv").resolved().lam == 0.003
    assert ReconConfig(backbone="sense").resolved().lam == 0.003
    assert ReconConfig(backbone="sense").resolved().iterations == 30


def test_from_properties_parses_types_and_dashes() -> None:
    config = ReconConfig.from_properties(
        {
            "backbone": "unrolled",
            "level-weights": "0.1, 0.2, 1",
            "final_dc": "0.5",
            "lam": "2.5",
            "seed": "3",
        }
    )
    assert config.backbone == "unrolled"
    assert config.level_weights == (0.1, 0.2, 1.0)
    assert config.final_dc == 0.5
    assert config.lam == 2.5 and config.seed == 3


def test_properties_round_trip() -> None:
    config = ReconConfig(backbone="unet", prior="tv", lam=0.2, layers=(1, 24), level_weights=(0.5, 1.0))
    assert ReconConfig.from_properties(config.to_properties()) == config


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({"lamda": "1"}, "unknown configuration properties: lamda"),
        ({"iterations": "many"}, "property 'iterations': cannot parse 'many'"),
        ({"backbone": "resnet"}, "property 'backbone': expected one of"),
        ({"final_dc": "perhaps"}, "property 'final_dc'"),
        ({"stages": "0"}, "property 'stages': expected a positive integer"),
        ({"lam": "-1"}, "property 'lam': expected a non-negative number"),
        ({"tau": "0"}, "property 'tau'"),
        ({"level_weights": "1,2"}, "property 'level_weights': expected 3 weights"),
        ({"device": "tpu"}, "property 'device'"),
        ({"prior": "semantic"}, "'semantic' needs a deep backbone"),
    ],
)
def test_bad_properties_are_named(properties: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ReconConfig.from_properties(properties)
