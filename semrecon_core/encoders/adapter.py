"""An encoder adapted to MR image quality: a frozen vision encoder with a trained projection head per level.

A foundation encoder never saw MR images, and its embedding barely changes between a fully sampled image and its
aliased or blurred reconstruction, so the semantic prior's gradient carries little about aliasing
(``benchmarks/results/probe_dinov2_knee.md``). ``semrecon encoder adapt`` trains a light head on top of the frozen
encoder to separate a site's fully sampled images from their undersampled reconstructions:

* data: the positives (anything ``bank build --positives`` reads), their simulated zero-filled reconstructions
  (:func:`~semrecon_core.priors.bank_sources.undersampled_versions`: Gaussian 1-D masks, R ~ U[3, 8]) as negatives,
  each image seen in ``views`` random shifted / flipped / rescaled copies
  (:func:`~semrecon_core.priors.views.random_views`); the encoder runs once, without gradients;
* head: per level, a linear map of the level's Figure-5 embedding (token mean of the normalised states) to
  ``dim`` features; the adapted encoder returns these ``(slices, dim)`` vectors, one per level, so banks, level
  weights and the centred similarity work unchanged;
* objective: the semantic prior's own loss. For each training embedding, Eq. (3) against the other training
  images' embeddings (centred cosine, τ, level weights) gives ``L``; positives minimise ``L`` and negatives
  ``−log(1 − e^(−L))`` (cross-entropy of the probability ``e^(−L)`` that the image is a positive);
* validation: the source images listed last (``held_out`` of them, with their negatives) are never trained on;
  their AUC against the training embeddings is recorded for the head and for the frozen encoder alone.

The adapter is a directory: ``adapter.json`` (base encoder, layers, dims, the training record) and
``head.safetensors``. ``--set encoder=DIR`` and ``bank build --encoder DIR --family hf-vision`` load it with its
base through :func:`load_hf_vision`; its identity names the head's sha256, so banks of the frozen encoder and of
the adapted one never mix. Whether a head helps is measured, not assumed: the probe of a bank built with it
(``benchmarks/results/encoder_adapt.md``) decides whether a site should use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from semrecon_core.encoders.hf_vision import HFVisionEncoder
from semrecon_core.priors.contrastive import auc, figure5_embedding
from semrecon_core.priors.views import random_views

ADAPTER_FILE = "adapter.json"
HEAD_FILE = "head.safetensors"
FORMAT = "semrecon-encoder-adapter-1"


def is_adapter(name: str | os.PathLike) -> bool:
    """Whether ``name`` is an adapter directory (holds ``adapter.json``)."""
    return (Path(name) / ADAPTER_FILE).is_file()


class ProjectionHead(torch.nn.Module):
    """Per level, a linear map of the Figure-5 embedding ``(S, D_l)`` to ``(S, dim)``."""

    def __init__(self, widths: Sequence[int], dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.levels = torch.nn.ModuleList(torch.nn.Linear(int(width), dim) for width in widths)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Token states (or embeddings) per level → projected vectors per level."""
        return [level(figure5_embedding(f)) for level, f in zip(self.levels, features, strict=True)]


class AdaptedEncoder:
    """A frozen :class:`HFVisionEncoder` followed by a trained :class:`ProjectionHead` (the encoder protocol)."""

    kind = "image"

    def __init__(self, base: HFVisionEncoder, head: ProjectionHead, *, directory: Path, sha256: str) -> None:
        self.base = base
        self.head = head.requires_grad_(False).eval().to(base.device)
        self.directory = directory
        self.sha256 = sha256
        self.layers = base.layers
        self.is_random = base.is_random
        self.label = f"{base.label} + MR-quality head ({directory.name}, sha256 {sha256[:12]})"

    @classmethod
    def from_directory(
        cls,
        directory: str | os.PathLike,
        *,
        layers: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        allow_download: bool = False,
        autocast: bool = True,
        precision: str = "float32",
    ) -> AdaptedEncoder:
        """Load the adapter in ``directory`` and its base encoder; ``layers``, when given, must be the adapter's."""
        from safetensors.torch import load_file

        directory = Path(directory)
        record = read_adapter(directory)
        trained = tuple(int(k) for k in record["layers"])
        if layers is not None and tuple(int(k) for k in layers) != trained:
            raise ValueError(
                f"encoder {directory}: its head was trained on layers {'/'.join(map(str, trained))}, "
                f"found layers {'/'.join(map(str, layers))} (set layers={','.join(map(str, trained))})"
            )
        base = HFVisionEncoder.from_pretrained(
            str(record["base"]),
            layers=trained,
            device=device,
            allow_download=allow_download,
            autocast=autocast,
            precision=precision,
        )
        head = ProjectionHead(record["widths"], int(record["dim"]))
        path = directory / HEAD_FILE
        head.load_state_dict(load_file(str(path)))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls(base, head, directory=directory, sha256=digest)

    @property
    def device(self) -> torch.device:
        """Where the base encoder lives."""
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the base encoder computes in."""
        return self.base.dtype

    @property
    def identity(self) -> dict[str, Any]:
        """The base's identity with the head's sha256 in its revision (banks of the frozen encoder do not match)."""
        identity = dict(self.base.identity)
        identity["model"] = str(self.directory)
        identity["revision"] = f"{self.base.revision}+head:{self.sha256[:16]}"
        identity["adapter"] = {"base": self.base.name, "head_sha256": self.sha256}
        return identity

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Projected ``(slices, dim)`` vectors per level of a complex ``(slices, y, x)`` image."""
        return self.head(self.base.encode(image))


def load_hf_vision(
    name: str,
    *,
    layers: Sequence[int],
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    autocast: bool = True,
    precision: str = "float32",
) -> HFVisionEncoder | AdaptedEncoder:
    """The ``hf-vision`` encoder ``name`` names: an adapter directory with its base, else the plain checkpoint."""
    if is_adapter(name):
        return AdaptedEncoder.from_directory(
            name, layers=layers, device=device, allow_download=allow_download, autocast=autocast, precision=precision
        )
    return HFVisionEncoder.from_pretrained(
        name, layers=layers, device=device, allow_download=allow_download, autocast=autocast, precision=precision
    )


def read_adapter(directory: Path) -> dict[str, Any]:
    """The checked ``adapter.json`` of an adapter directory."""
    path = directory / ADAPTER_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable encoder adapter ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}: field 'format': expected {FORMAT!r}, found {found!r}")
    for key in ("base", "layers", "widths", "dim"):
        if key not in record:
            raise ValueError(f"{path}: field '{key}' is missing")
    if not (directory / HEAD_FILE).is_file():
        raise ValueError(f"{directory}: {HEAD_FILE} is missing beside {ADAPTER_FILE}")
    return record


# --- training -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptSettings:
    """How the head is trained (module docstring).

    Attributes:
        dim: features per level of the head.
        views: views of each image (the image and ``views − 1`` random copies).
        negatives_per_positive: simulated undersampled reconstructions per positive.
        held_out: positives (the last ones, with their negatives) kept for validation.
        steps: full-batch Adam steps.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        tau: temperature of Eq. (3).
        level_weights: weights of the levels in the loss (the prior's).
        seed: seed of views, negatives and initial weights.
    """

    dim: int = 64
    views: int = 4
    negatives_per_positive: int = 4
    held_out: int = 2
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    tau: float = 0.07
    level_weights: tuple[float, ...] = (0.005, 0.5, 1.0)
    seed: int = 0

    def check(self, positives: int, levels: int) -> None:
        """Raise ``ValueError`` naming the first setting out of range for ``positives`` images."""
        if self.dim < 1 or self.views < 1 or self.negatives_per_positive < 1 or self.steps < 1:
            raise ValueError("--dim, --views, --negatives and --steps: expected positive integers")
        if not 1 <= self.held_out <= positives - 2:
            raise ValueError(
                f"--held-out: expected 1 … {positives - 2} (at least two positives to train on), found {self.held_out}"
            )
        if len(self.level_weights) != levels:
            raise ValueError(f"--weights: expected {levels} level weights, found {len(self.level_weights)}")


@dataclass
class Embedded:
    """Figure-5 embeddings per level ``(n, D_l)`` with each row's label (positive) and source image."""

    features: list[torch.Tensor]
    positive: torch.Tensor
    source: torch.Tensor

    def subset(self, rows: torch.Tensor) -> Embedded:
        """The rows ``rows`` (a boolean mask)."""
        return Embedded([f[rows] for f in self.features], self.positive[rows], self.source[rows])


def embed_training_set(
    encoder: HFVisionEncoder,
    positives: Sequence[torch.Tensor],
    settings: AdaptSettings,
    *,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> Embedded:
    """Frozen-encoder embeddings of every positive, its simulated negatives and their views."""
    import numpy as np

    from semrecon_core.priors.bank_sources import Source, undersampled_versions

    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    rows: list[list[torch.Tensor]] = [[] for _ in encoder.layers]
    labels: list[bool] = []
    sources: list[int] = []
    items = list(enumerate(positives))
    for index, image in progress(items) if progress is not None else items:
        source = Source(path=Path(f"positive {index}"), images=image, kspace=None, sha256="")
        negatives = [
            version for _ in range(settings.negatives_per_positive) for version, _ in undersampled_versions(source, rng)
        ]
        for label, picture in [(True, image), *((False, n) for n in negatives)]:
            with torch.no_grad():
                views = random_views(picture.to(encoder.device), settings.views, generator)
                features = encoder.encode(views)
            for level, feature in enumerate(features):
                rows[level].append(figure5_embedding(feature).cpu())
            labels += [label] * settings.views
            sources += [index] * settings.views
    return Embedded([torch.cat(level) for level in rows], torch.tensor(labels), torch.tensor(sources, dtype=torch.long))


def query_losses(
    head: ProjectionHead | None,
    queries: Embedded,
    bank: Embedded,
    settings: AdaptSettings,
    *,
    exclude_same_source: bool,
) -> torch.Tensor:
    """Eq. (3) loss ``(n,)`` of each query against ``bank``'s positives and negatives (centred cosine, τ, weights).

    ``head=None`` scores the frozen encoder's embeddings. The centre is the bank's mean; with
    ``exclude_same_source`` a query is not compared with embeddings of its own source image.
    """
    project = head if head is not None else (lambda features: list(features))
    q_levels, b_levels = project(queries.features), project(bank.features)
    total = torch.zeros(queries.positive.shape[0])
    for q, b, weight in zip(q_levels, b_levels, settings.level_weights, strict=True):
        centre = b.mean(0)
        similarity = F.normalize(q - centre, dim=-1) @ F.normalize(b - centre, dim=-1).T / settings.tau
        if exclude_same_source:
            similarity = similarity.masked_fill(queries.source[:, None] == bank.source[None, :], float("-inf"))
        every = torch.logsumexp(similarity, dim=-1)
        positive = torch.logsumexp(similarity.masked_fill(~bank.positive[None, :], float("-inf")), dim=-1)
        total = total + weight * (every - positive)
    return total


def train_head(
    embedded: Embedded,
    settings: AdaptSettings,
    *,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> tuple[ProjectionHead, dict[str, Any]]:
    """Train the head on all but the last ``held_out`` source images; the head and the training record."""
    started = time.perf_counter()
    sources = int(embedded.source.max()) + 1
    validation = embedded.source >= sources - settings.held_out
    train, held = embedded.subset(~validation), embedded.subset(validation)
    torch.manual_seed(settings.seed)
    head = ProjectionHead([f.shape[1] for f in embedded.features], settings.dim)
    optimiser = torch.optim.Adam(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = range(settings.steps)
    for _ in progress(steps) if progress is not None else steps:
        losses = query_losses(head, train, train, settings, exclude_same_source=True)
        # positives: −log p = L; negatives: −log(1 − p) with p = e^(−L)
        objective = torch.where(train.positive, losses, -torch.log(-torch.expm1(-losses.clamp_min(1e-6)))).mean()
        optimiser.zero_grad(set_to_none=True)
        objective.backward()
        optimiser.step()
    with torch.no_grad():
        record = {
            "train_images": sources - settings.held_out,
            "validation_images": settings.held_out,
            "embeddings": int(embedded.source.numel()),
            "final_objective": float(objective),
            "train_auc": _auc(query_losses(head, train, train, settings, exclude_same_source=True), train.positive),
            "validation_auc": _auc(query_losses(head, held, train, settings, exclude_same_source=False), held.positive),
            "validation_auc_frozen": _auc(
                query_losses(None, held, train, settings, exclude_same_source=False), held.positive
            ),
            "seconds": round(time.perf_counter() - started, 1),
        }
    return head, record


def _auc(losses: torch.Tensor, positive: torch.Tensor) -> float:
    """How often a positive's loss is below a negative's (1: perfectly separated)."""
    return auc(losses[positive], losses[~positive])


def save_adapter(
    directory: Path, *, base: str, layers: Sequence[int], head: ProjectionHead, record: dict[str, Any]
) -> Path:
    """Write ``adapter.json`` and ``head.safetensors`` into ``directory``, both or neither."""
    from safetensors.torch import save_file

    from semrecon_core.data.images import StagedOutputs

    widths = [int(weight.shape[1]) for name, weight in head.state_dict().items() if name.endswith("weight")]
    dim = head.dim
    payload = {"format": FORMAT, "base": base, "layers": list(layers), "widths": widths, "dim": dim, **record}
    with StagedOutputs() as staged:
        weights = staged.path(directory / HEAD_FILE, mkdir=True)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(weights))
        staged.path(directory / ADAPTER_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return directory
