"""ReconConfig: presets, property parsing and validation errors that name the problem."""

from __future__ import annotations

import pytest

from semrecon_core.config import ConfigError, ReconConfig


def test_paper_preset_is_default_and_fills_unset_fields() -> None:
    config = ReconConfig(backbone="unet", prior="semantic").resolved()
    assert config.preset == "paper"
    assert config.data_term == "l2"
    assert config.level_weights == (0.005, 0.5, 1.0)
    assert config.similarity == "pooled"
    assert config.sigma == 0.03


def test_public_code_preset_and_per_backbone_defaults() -> None:
    config = ReconConfig(backbone="inr", prior="semantic", preset="public-code").resolved()
    assert config.data_term == "l1"
    assert config.level_weights == (0.01, 0.5, 1.0)
    assert config.lr == 1e-4
    assert config.lam == 5.0
    assert config.iterations == 1600


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
            "final_dc": "true",
            "lam": "2.5",
            "seed": "3",
        }
    )
    assert config.backbone == "unrolled"
    assert config.level_weights == (0.1, 0.2, 1.0)
    assert config.final_dc is True
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
