"""The prior factory: a configuration in, a :class:`~semrecon_core.priors.base.Prior` out.

:func:`build_prior` turns a :class:`~semrecon_core.config.ReconConfig` into a prior object with
``label`` and ``loss(image)``. Semantic priors load their encoder and bank once; both are cached so a
long-running process (``semrecon serve``) reuses them across scans.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from semrecon_core.config import ConfigError, ReconConfig, ResolvedConfig

if TYPE_CHECKING:
    from semrecon_core.encoders.protocol import SemanticEncoder
    from semrecon_core.priors.base import Prior

_ENCODERS: dict[tuple, Any] = {}
_PRIORS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def build_prior(config: ReconConfig, device: torch.device | str) -> Prior | None:
    """The prior ``config`` asks for: ``None`` (``none``), a TVPrior (``tv``) or a SemanticPrior.

    λ is applied by the engine, so TV gets weight 1. A semantic prior needs ``config.bank``; the
    encoder is ``config.encoder`` loaded for the bank's kind (image-only Janus / generic HF vision /
    image-language Janus) and refused if its identity differs from the bank's. ``config`` is resolved by
    :func:`semrecon_core.settings.resolve` unless it is already; the bank metadata read then are used here.
    """
    from semrecon_core.settings import resolve

    config = resolve(config)
    if config.prior == "none":
        return None
    if config.prior == "tv":
        from semrecon_core.priors.tv import DEEP_TV_SCALING, TVPrior

        return TVPrior(weight=1.0, scaling=DEEP_TV_SCALING[config.preset])
    return _semantic_prior(config, torch.device(device))


def clear_cache() -> None:
    """Forget every cached encoder and prior (frees their memory)."""
    with _LOCK:
        _ENCODERS.clear()
        _PRIORS.clear()


def _semantic_prior(config: ResolvedConfig, device: torch.device) -> Prior:
    from semrecon_core.priors.bank import load_bank, read_metadata
    from semrecon_core.priors.semantic import SemanticPrior

    if not config.bank:
        raise ConfigError(
            "property 'bank': the semantic prior needs an embedding bank "
            "(build one with `semrecon bank build`, then --set bank=PATH)"
        )
    bank_path = Path(config.bank).expanduser().resolve()
    stat = bank_path.stat() if bank_path.is_file() else None
    if stat is None:
        raise FileNotFoundError(f"property 'bank': {bank_path}: embedding bank not found")
    key = (
        config.encoder,
        str(bank_path),
        stat.st_mtime_ns,
        stat.st_size,
        str(device),
        config.autocast,
        config.similarity,
        config.level_weights,
        config.tau,
        config.hinge,
        config.views,
        config.seed,
        config.preset,
        config.layers,
        config.encoder_checkpointing,
    )
    with _LOCK:
        if key in _PRIORS:
            return _PRIORS[key]
    # read once, by the resolution (settings.resolve); again only if that could not read them
    metadata = config.bank_metadata if config.bank_metadata is not None else read_metadata(bank_path)
    encoder = _encoder_for(config, metadata, device)
    similarity = metadata["similarity"]
    if metadata["encoder"].get("kind") == "image" and similarity != config.similarity:
        raise ConfigError(
            f"property 'similarity': the configuration asks for {config.similarity!r} but bank {bank_path} "
            f"was built for {similarity!r} (rebuild it with --similarity {config.similarity})"
        )
    bank = load_bank(bank_path, encoder, device=device, metadata=metadata)
    prior = SemanticPrior(
        encoder,
        bank,
        weights=config.level_weights,
        tau=config.tau,
        variant=config.preset,
        hinge=config.hinge,
        views=config.views,
        seed=config.seed,
    )
    with _LOCK:
        _PRIORS[key] = prior
    return prior


def _encoder_for(config: ReconConfig, metadata: dict[str, Any], device: torch.device) -> SemanticEncoder:
    identity = metadata["encoder"]
    family = identity.get("family", "janus")
    kind = identity.get("kind")
    autocast = config.autocast == "bfloat16"
    checkpointing = config.encoder_checkpointing
    key = (
        config.encoder,
        family,
        kind,
        config.layers,
        identity.get("instruction"),
        str(device),
        autocast,
        checkpointing,
    )
    with _LOCK:
        if key in _ENCODERS:
            return _ENCODERS[key]
    encoder: SemanticEncoder
    if family == "hf-vision":
        from semrecon_core.encoders.adapter import load_hf_vision

        encoder = load_hf_vision(
            config.encoder,
            layers=config.layers,
            device=device,
            allow_download=config.allow_download,
            autocast=autocast,
        )
    elif kind == "language":
        from semrecon_core.encoders.janus import JanusLanguageEncoder

        encoder = JanusLanguageEncoder.from_pretrained(
            config.encoder,
            instruction=identity.get("instruction") or "paper",
            device=device,
            allow_download=config.allow_download,
            autocast=autocast,
            gradient_checkpointing=checkpointing,
        )
    else:
        from semrecon_core.encoders.janus import JanusImageEncoder

        encoder = JanusImageEncoder.from_pretrained(
            config.encoder,
            layers=config.layers,
            device=device,
            allow_download=config.allow_download,
            autocast=autocast,
            gradient_checkpointing=checkpointing,
        )
    with _LOCK:
        _ENCODERS[key] = encoder
    return encoder
