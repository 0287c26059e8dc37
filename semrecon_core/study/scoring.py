"""Scores of one reconstruction against its reference, and embeddings in a bank's space.

Metrics (all on magnitudes, the reconstruction cropped to the recon matrix, :mod:`semrecon_core.metrics`):
PSNR, SSIM, HaarPSI and VIF-p (reference max = 1; no learned weights), Tenengrad of the reconstruction, LPIPS
(AlexNet) when its weights are
present — otherwise the value is ``None`` and the reason is recorded, never a stand-in number — and an
embedding distance from a second network: ``1 − cos`` of the token-mean embeddings of reference and
reconstruction at the network's last level, mean over slices. Its label says which network it is and, when it
is the semantic prior's own encoder, that it is not independent of that prior (the prior pulls exactly these
embeddings towards its positives).

:func:`bank_space` maps encoder features to the space the bank's P and N live in (token means, PCA-projected
token means, Figure-5 embeddings or LLM vectors), so reconstructions, trajectories and the bank can share one
UMAP (:mod:`semrecon_core.study.figures`).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from semrecon_core.config import ReconConfig
    from semrecon_core.priors.semantic import SemanticPrior

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "haarpsi", "vif", "lpips", "tenengrad", "perceptual")
"""Score names, in table order."""
HIGHER_IS_BETTER = {
    "psnr": True,
    "ssim": True,
    "haarpsi": True,
    "vif": True,
    "lpips": False,
    "tenengrad": None,
    "perceptual": False,
}
"""Direction of each score (``None``: a property of the image, not a quality judgement: Tenengrad sharpness)."""

_NETWORKS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ScoringSpec:
    """What to score with (picklable: it travels to workers).

    Attributes:
        lpips_weights: torch hub directory with torchvision's AlexNet weights (``None``: the default hub dir).
        lpips_reason: why LPIPS is unavailable (checked once by the driver), ``None`` when it is available.
        perceptual: ``auto`` (the semantic prior's encoder when there is a bank), ``none``, or a model (HF id
            or directory) loaded as an image encoder.
        semantic: the semantic configuration whose encoder ``auto`` uses and whose bank defines
            :func:`bank_space` (``None`` without a bank).
        device: where networks run.
    """

    lpips_weights: str | None = None
    lpips_reason: str | None = "not checked"
    perceptual: str = "auto"
    semantic: ReconConfig | None = None
    device: str = "cpu"

    def key(self) -> dict[str, Any]:
        """What in this spec changes the scores (part of every result's key)."""
        return {
            "metrics": list(METRICS),  # a stored item scored without a metric is computed again with it
            "lpips": "unavailable" if self.lpips_reason else f"alexnet {self.lpips_weights or 'hub'}",
            "perceptual": self.perceptual,
            "perceptual_encoder": None if self.semantic is None else self.semantic.encoder,
        }


def lpips_unavailable(weights: str | None) -> str | None:
    """Why LPIPS cannot run here (weights, package or torchvision missing), or ``None`` when it can."""
    from semrecon_core import metrics

    probe = np.zeros((64, 64), np.float32)
    probe[16:48, 16:48] = 1.0
    try:
        metrics.lpips(probe, probe, weights=weights)
    except metrics.LPIPSUnavailable as exc:
        return str(exc)
    return None


class Scorer:
    """Scores reconstructions of one task; the networks are loaded once per process (cached)."""

    def __init__(self, spec: ScoringSpec) -> None:
        self.spec = spec
        self._network: Any = None
        self._network_label: str | None = None
        self._network_reason: str | None = None
        self._prior: SemanticPrior | None = None
        self._resolved = False

    # ------------------------------------------------------------------------------------------- networks
    @property
    def prior(self) -> SemanticPrior | None:
        """The semantic prior (encoder + bank) of ``spec.semantic``, or ``None`` without a bank."""
        if self.spec.semantic is None:
            return None
        if self._prior is None:
            from semrecon_core.pipeline import resolve_device
            from semrecon_core.priors.factory import build_prior

            prior = build_prior(self.spec.semantic, resolve_device(self.spec.device))
            self._prior = prior  # type: ignore[assignment]  # a semantic config builds a SemanticPrior
        return self._prior

    def _resolve_network(self) -> None:
        if self._resolved:
            return
        self._resolved = True
        choice = self.spec.perceptual
        if choice == "none":
            self._network_reason = "not computed (--perceptual none)"
            return
        if choice == "auto":
            if self.prior is None:
                self._network_reason = (
                    "not computed: no second network (no --bank whose encoder could be used, no --perceptual MODEL)"
                )
                return
            encoder = self.prior.encoder
            self._network = encoder
            self._network_label = (
                f"1 − cosine of token-mean embeddings, last level, of {encoder.label}: the semantic prior's own "
                "encoder, not independent of the semantic prior"
            )
            return
        encoder = load_network(choice, self.spec.device)
        same = self.prior is not None and self.prior.encoder.identity.get("revision") == encoder.identity.get(
            "revision"
        )
        self._network = encoder
        self._network_label = f"1 − cosine of token-mean embeddings, last level, of {encoder.label}" + (
            ": the semantic prior's own encoder, not independent of the semantic prior" if same else ""
        )

    @property
    def perceptual_label(self) -> str:
        """What the ``perceptual`` score is, or why it is absent."""
        self._resolve_network()
        return self._network_label or self._network_reason or "not computed"

    # ------------------------------------------------------------------------------------------- scores
    def score(self, reference: np.ndarray, image: np.ndarray) -> dict[str, float | None]:
        """PSNR, SSIM, HaarPSI, VIF, Tenengrad, LPIPS (``None``: unavailable), the embedding distance (or ``None``)."""
        from semrecon_core import metrics

        scores: dict[str, float | None] = {
            "psnr": metrics.psnr(reference, image),
            "ssim": metrics.ssim(reference, image),
            "haarpsi": metrics.haarpsi(reference, image),
            "vif": metrics.vif(reference, image),
            "tenengrad": metrics.tenengrad(image),
            "lpips": None,
            "perceptual": None,
        }
        if self.spec.lpips_reason is None:
            try:
                scores["lpips"] = metrics.lpips(reference, image, weights=self.spec.lpips_weights)
            except metrics.LPIPSUnavailable as exc:
                log.warning("LPIPS unavailable in this worker: %s", exc)
        self._resolve_network()
        if self._network is not None:
            scores["perceptual"] = embedding_distance(self._network, reference, image)
        return scores

    def embeddings(self, image: np.ndarray | torch.Tensor) -> list[list[list[float]]] | None:
        """Per level, the ``(slices, D)`` embeddings of ``image`` in the bank's space (``None`` without a bank)."""
        prior = self.prior
        if prior is None:
            return None
        import torch

        with torch.no_grad():
            features = prior.encoder.encode(torch.as_tensor(image).to(torch.complex64))
        return [level.tolist() for level in bank_space(prior, features)]


def embedding_distance(encoder: Any, reference: np.ndarray, image: np.ndarray) -> float:
    """``1 − cos`` of the last level's token-mean embeddings of ``reference`` and ``image``, mean over slices."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        pair = torch.as_tensor(np.stack([np.abs(reference), np.abs(image)]).astype(np.float32))
        slices = pair.shape[1]
        features = encoder.encode(pair.reshape(-1, *pair.shape[-2:]).to(torch.complex64))[-1].float()
        pooled = features.mean(dim=1) if features.dim() == 3 else features
        ref, img = pooled[:slices], pooled[slices:]
        return float((1 - F.cosine_similarity(ref, img, dim=-1)).mean())


def load_network(name: str, device: str) -> Any:
    """An image encoder for the embedding distance: a Janus vision tower or any HF vision model, last layer.

    Cached per process. Raises the loader's error (``EncoderUnavailable`` naming how to provide it) when absent.
    """
    from semrecon_core.encoders.loading import resolve_checkpoint
    from semrecon_core.pipeline import resolve_device

    key = (name, device)
    with _LOCK:
        if key in _NETWORKS:
            return _NETWORKS[key]
    directory = resolve_checkpoint(name)
    config = json.loads((Path(directory) / "config.json").read_text())
    vision = config.get("vision_config") or config
    depth = int(vision.get("num_hidden_layers") or 0)
    if depth < 1:
        raise ValueError(f"--perceptual {name}: its config.json gives no num_hidden_layers (not a vision transformer?)")
    where = resolve_device(device)
    encoder: Any
    if config.get("model_type") == "janus":
        from semrecon_core.encoders.janus import JanusImageEncoder

        encoder = JanusImageEncoder.from_pretrained(name, layers=(depth,), device=where)
    else:
        from semrecon_core.encoders.hf_vision import HFVisionEncoder

        encoder = HFVisionEncoder.from_pretrained(name, layers=(depth,), device=where)
    with _LOCK:
        _NETWORKS[key] = encoder
    return encoder


def bank_space(prior: SemanticPrior, features: list[torch.Tensor]) -> list[np.ndarray]:
    """Encoder features → per level ``(slices, D)`` float64 arrays in the space of the bank's P and N."""
    from semrecon_core.priors.contrastive import figure5_embedding

    bank = prior.bank
    out = []
    for level, feature in enumerate(features):
        feature = feature.detach().float()
        if bank.similarity == "token-pca" and bank.pca is not None and feature.dim() == 3:
            vector = bank.pca[level].to(feature.device)(feature).mean(dim=1)
        elif bank.similarity == "centred":
            vector = figure5_embedding(feature)
        else:
            vector = feature.mean(dim=1) if feature.dim() == 3 else feature
        out.append(vector.double().cpu().numpy())
    return out
