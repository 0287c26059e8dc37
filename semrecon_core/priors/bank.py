"""Embedding banks: the positive and negative embeddings P / N of the semantic prior.

A bank is one ``.safetensors`` file: tensors ``positives/<level>``, ``negatives/<level>`` and, for
token-PCA banks, ``pca_mean/<level>`` and ``pca_components/<level>``, plus JSON metadata under the
``semrecon_bank`` key (encoder identity — model, revision fingerprint, kind, layers, preprocessing,
instruction, prompt rendering, the dtype the embeddings were computed in —, similarity, level weights, PCA
dims, σ, K, sources with sha256, creation time, and the bank's leave-one-out P/N separability).
:func:`load_bank` refuses a bank whose encoder identity differs from the encoder in use, naming the field.

Banks written before the ``dtype`` and ``prompt`` fields existed are read as ``dtype`` = ``float32`` (the
image-only encoder's precision, and every encoder's on the CPU, where such banks were built for tests and
smoke runs; a bank embedded under bf16 autocast on CUDA then needs rebuilding) and, for image-language
banks, ``prompt`` = ``janus-pro`` (the only rendering there was).

The file's safetensors header is checked before anything reads it (:func:`semrecon_core.weights.read_header`):
an empty, truncated, zero-filled or non-safetensors file, tensors that are not floating point, or positives and
negatives of different embedding shapes raise :class:`DamagedBankError` naming the file and ``semrecon bank
build``, which writes it again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semrecon_core.priors.contrastive import (
    DEFAULT_PCA_DIMS,
    PCA,
    Separability,
    check_similarity,
    figure5_embedding,
    leave_one_out,
)
from semrecon_core.weights import DamagedWeightsError, SafetensorsHeader, read_header

FORMAT = "semrecon-embedding-bank/1"
_META_KEY = "semrecon_bank"
# Identity fields that must match between a bank and the encoder that uses it.
IDENTITY_FIELDS = ("family", "kind", "revision", "layers", "preprocessing", "instruction", "prompt", "dtype")
# Temperature of the separability reported for every bank (Eq. 3, the paper's τ).
SEPARABILITY_TAU = 0.07


class BankError(ValueError):
    """An embedding bank is unreadable, malformed, or does not match the encoder in use."""


class DamagedBankError(BankError, DamagedWeightsError):
    """A bank file that is damaged (cut short, empty, zero-filled, not safetensors, wrong dtype or shapes)."""


def _remedy(path: Path) -> str:
    return f"build it again with `semrecon bank build {path} --encoder ... --positives ...`"


def _bank_header(path: Path) -> SafetensorsHeader:
    """The checked safetensors header of the bank file ``path``."""
    return read_header(path, what="embedding bank", remedy=_remedy(path), error=DamagedBankError)


def _damaged(path: Path, problem: str) -> DamagedBankError:
    return DamagedBankError(path, problem, what="embedding bank", remedy=_remedy(path))


@dataclass
class EmbeddingBank:
    """Positive / negative embeddings per level, with the metadata that says how they were made.

    Attributes:
        positives: per level ``(M, D)`` vectors or ``(M, T, d)`` PCA-projected tokens.
        negatives: same layout.
        metadata: JSON-serialisable description; ``metadata["encoder"]`` is the encoder identity.
        pca: per-level projections of a ``token-pca`` bank, else ``None``.
    """

    positives: list[torch.Tensor]
    negatives: list[torch.Tensor]
    metadata: dict[str, Any]
    pca: list[PCA] | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def similarity(self) -> str:
        """``pooled``, ``vector`` (image-language), ``token-pca`` or ``centred``."""
        return str(self.metadata["similarity"])

    @property
    def kind(self) -> str:
        """``image`` or ``language``."""
        return str(self.metadata["encoder"]["kind"])

    def to(self, device: torch.device | str) -> EmbeddingBank:
        """A copy with every tensor on ``device``."""
        return EmbeddingBank(
            positives=[p.to(device) for p in self.positives],
            negatives=[n.to(device) for n in self.negatives],
            metadata=self.metadata,
            pca=None if self.pca is None else [p.to(device) for p in self.pca],
            path=self.path,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank atomically (a temporary file beside it, then ``os.replace``); mode 0644 less the umask."""
        from safetensors.torch import save_file

        from semrecon_core.data.images import atomic_path

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for level, (p, n) in enumerate(zip(self.positives, self.negatives, strict=True)):
            tensors[f"positives/{level}"] = p.detach().float().cpu().contiguous()
            tensors[f"negatives/{level}"] = n.detach().float().cpu().contiguous()
        for level, pca in enumerate(self.pca or []):
            tensors[f"pca_mean/{level}"] = pca.mean.cpu().contiguous()
            tensors[f"pca_components/{level}"] = pca.components.cpu().contiguous()
        metadata = {_META_KEY: json.dumps({**self.metadata, "format": FORMAT}, sort_keys=True)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
        self.path = path
        return path

    def separability(self, tau: float = SEPARABILITY_TAU) -> Separability:
        """Leave-one-out P/N separability of this bank under Eq. (3) (:func:`~.contrastive.leave_one_out`).

        An image-language bank holds out all K perturbed embeddings of an image together.
        """
        language = self.metadata.get("encoder", {}).get("kind") == "language"
        group = int(self.metadata.get("perturbations") or 1) if language else 1
        return leave_one_out(
            self.positives,
            self.negatives,
            similarity=self.similarity,
            weights=self.metadata.get("weights") or [1.0] * len(self.positives),
            tau=tau,
            group=group,
        )

    def describe(self, separability: dict[str, Any] | None = None) -> str:
        """Multi-line human-readable summary (``semrecon bank info``).

        ``separability`` (a :meth:`Separability.as_dict`) is shown when the metadata holds none.
        """
        meta = self.metadata
        encoder = meta["encoder"]
        lines = [
            f"bank: {self.path or '(in memory)'}",
            f"encoder: {encoder.get('model')} (revision {encoder.get('revision')}, "
            f"kind {encoder.get('kind')})" + ("  RANDOM WEIGHTS" if encoder.get("random_weights") else ""),
            f"layers: {encoder.get('layers')}  weights: {meta.get('weights')}  similarity: {self.similarity}",
            f"preprocessing: {encoder.get('preprocessing')}",
            f"dtype: {identity_field(encoder, 'dtype')}" + ("" if "dtype" in encoder else " (not recorded)"),
        ]
        if encoder.get("instruction"):
            lines.append(
                f"instruction: {encoder['instruction']!r} (prompt {identity_field(encoder, 'prompt')})  "
                f"sigma: {meta.get('sigma')}  K: {meta.get('perturbations')}"
            )
        if self.pca is not None:
            lines.append(f"PCA dims: {[p.components.shape[1] for p in self.pca]}")
        for level, (p, n) in enumerate(zip(self.positives, self.negatives, strict=True)):
            lines.append(f"level {level}: positives {tuple(p.shape)}  negatives {tuple(n.shape)}")
        sources = meta.get("sources", [])
        lines.append(f"sources: {len(sources)}  created: {meta.get('created')}")
        lines.extend(
            f"  {source.get('role', '?'):9s} {source.get('path')}  sha256 {str(source.get('sha256'))[:16]}"
            for source in sources
        )
        lines.append(describe_separability(meta.get("separability") or separability))
        if meta.get("recommended"):
            lines.append(f"recommended: {json.dumps(meta['recommended'], sort_keys=True)}")
        lines.extend(describe_calibration(meta.get("calibration")))
        return "\n".join(lines)


def describe_calibration(calibration: dict[str, Any] | None) -> list[str]:
    """Lines for ``semrecon bank info``: per calibrated preset/backbone the λ, the grid's scores, a verdict."""
    lines: list[str] = []
    for key, record in sorted((calibration or {}).items()):
        if not isinstance(record, dict):
            continue
        lam = float(record.get("lam", float("nan")))
        held_out = ", ".join(str(case.get("name")) for case in record.get("cases", []))
        lines.append(f"calibration {key}: λ {lam:g} on {record.get('images')} held-out images ({held_out})")
        if lam == 0:
            lines.append("  the prior does not help on these images: λ 0 (the semantic prior is off for this site)")
        for row in record.get("summary", []):
            names = [name for name in ("haarpsi", "psnr", "vif") if name in row]
            cells = "  ".join(f"{name} {row[name]['mean']:.4g} ± {row[name]['sd']:.2g}" for name in names)
            lines.append(f"  λ {row['lam']:<8g} {cells}" + ("  ← chosen" if row["lam"] == lam else ""))
        used = record.get("settings") or {}
        simulation = used.get("simulation") or {}
        shown = ", ".join(f"{k} {used[k]}" for k in ("backbone", "iterations", "checkpoint", "start") if k in used)
        if simulation:
            shown += f"; scans R {simulation.get('acceleration')}, {simulation.get('coils')} coils, size "
            shown += f"{simulation.get('size') or 'own'}, maps {simulation.get('maps')}"
        lines.append(f"  settings: {shown}")
        lines.extend(
            f"  image {case.get('name')}: {case.get('path')}  sha256 {str(case.get('sha256'))[:16]}"
            for case in record.get("cases", [])
        )
        if record.get("command"):
            lines.append(f"  made by: {record['command']}")
    return lines


def describe_separability(result: dict[str, Any] | None) -> str:
    """One line on a bank's leave-one-out P/N separability, with a verdict a user can act on."""
    if not result:
        return "separability: not measured"
    if "error" in result:
        return f"separability: not measurable ({result['error']})"
    value = float(result["auc"])
    if value >= 0.9:
        verdict = "P and N separate: the prior can steer"
    elif value >= 0.7:
        verdict = "P and N overlap: the prior steers weakly"
    else:
        verdict = "P and N do not separate: the prior can hardly steer anything"
    held = "one embedding" if int(result.get("group") or 1) == 1 else f"one image's {result['group']} embeddings"
    return (
        f"separability (leave-one-out, {held} held out, Eq. 3 τ {result.get('tau')}): AUC {value:.3f}, "
        f"loss P {result['positive_loss']:.4g} / N {result['negative_loss']:.4g} (gap {result['gap']:.4g}, "
        f"d' {_number(result.get('d_prime'))}); {verdict}"
    )


def _number(value: Any) -> str:
    return "∞" if value is None else f"{float(value):.3g}"


def identity_field(identity: dict[str, Any], name: str) -> Any:
    """An identity field, with the value banks written before the field existed imply (module docstring)."""
    value = identity.get(name)
    if value is None and name == "dtype":
        return "float32"
    if value is None and name == "prompt" and identity.get("kind") == "language":
        return "janus-pro"
    return value


_FIELD_HINTS = {
    "dtype": (
        "the image-only encoders compute in float32 unless asked for bfloat16; the image-language encoder "
        "in bfloat16 on CUDA, float32 on the CPU or with autocast=none; build the bank on the same kind of "
        "device and precision (semrecon bank build --dtype)"
    ),
    "prompt": "the prompt rendering follows the instruction (public-code instructions use the authors' roles)",
}


def check_compatible(metadata: dict[str, Any], identity: dict[str, Any], *, source: str = "bank") -> None:
    """Raise :class:`BankError` naming the first identity field where bank and encoder differ.

    The message says ``<field>: expected <the encoder in use's value>, found <the bank's value>``.
    """
    built = metadata.get("encoder", {})
    for name in IDENTITY_FIELDS:
        expected, found = identity_field(identity, name), identity_field(built, name)
        if expected != found:
            hint = f" ({_FIELD_HINTS[name]})" if name in _FIELD_HINTS else ""
            raise BankError(
                f"{source}: encoder field '{name}' does not match: expected {expected!r} (the encoder in use, "
                f"model {identity.get('model')!r}), found {found!r} in the bank{hint}; rebuild the bank with "
                f"`semrecon bank build` for this encoder"
            )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a bank file without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedding bank not found")
    return _metadata_of(_bank_header(path))


def _metadata_of(header: SafetensorsHeader) -> dict[str, Any]:
    path = header.path
    raw = header.metadata.get(_META_KEY)
    if raw is None:
        raise BankError(f"{path}: safetensors file has no '{_META_KEY}' metadata (not a semrecon embedding bank)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BankError(f"{path}: bank metadata is not valid JSON ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else metadata
        raise BankError(f"{path}: bank format {found!r}, expected {FORMAT!r}")
    for key in ("encoder", "similarity", "levels"):
        if key not in metadata:
            raise BankError(f"{path}: bank metadata lacks the field '{key}'")
    return metadata


def load_bank(
    path: str | os.PathLike,
    encoder: Any | None = None,
    *,
    device: str | torch.device = "cpu",
    metadata: dict[str, Any] | None = None,
) -> EmbeddingBank:
    """Load a bank; with ``encoder``, refuse it unless it was built with the same encoder identity.

    ``metadata``: the file's metadata already read (:func:`read_metadata`), so they are not read again.

    Raises:
        FileNotFoundError: no such file.
        BankError: corrupt or incomplete file, or an identity mismatch (naming the field).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedding bank not found")
    header = _bank_header(path)  # checked again when the metadata were read before: the file may have changed
    metadata = _metadata_of(header) if metadata is None else metadata
    if encoder is not None:
        check_compatible(metadata, encoder.identity, source=f"bank {path}")
    levels = int(metadata["levels"])
    needed = [f"{role}/{level}" for role in ("positives", "negatives") for level in range(levels)]
    if metadata["similarity"] == "token-pca":
        needed += [f"{role}/{level}" for role in ("pca_mean", "pca_components") for level in range(levels)]
    missing = [name for name in needed if name not in header.tensors]
    if missing:
        raise BankError(f"{path}: bank lacks tensors {', '.join(missing)}")
    for level in range(levels):
        pos_shape, neg_shape = header.tensors[f"positives/{level}"].shape, header.tensors[f"negatives/{level}"].shape
        if len(pos_shape) < 2 or pos_shape[1:] != neg_shape[1:]:
            raise _damaged(
                path,
                f"level {level}: positives {pos_shape} and negatives {neg_shape} differ in embedding shape "
                "(expected (count, ...) with the same trailing dimensions)",
            )
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            tensors = {name: handle.get_tensor(name) for name in needed}
    except Exception as exc:  # noqa: BLE001 - the header was fine: the data could not be read
        raise _damaged(path, f"bank tensors are unreadable ({exc})") from None
    pca = None
    if metadata["similarity"] == "token-pca":
        pca = [PCA(tensors[f"pca_mean/{k}"], tensors[f"pca_components/{k}"]) for k in range(levels)]
    bank = EmbeddingBank(
        positives=[tensors[f"positives/{k}"] for k in range(levels)],
        negatives=[tensors[f"negatives/{k}"] for k in range(levels)],
        metadata=metadata,
        pca=pca,
        path=path,
    )
    for level, (p, n) in enumerate(zip(bank.positives, bank.negatives, strict=True)):
        for role, tensor in (("positives", p), ("negatives", n)):
            bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
            if bad.any():
                rows = [int(i) for i in torch.nonzero(bad).flatten()[:5]]
                raise BankError(
                    f"{path}: level {level}: {int(bad.sum())} of the {tensor.shape[0]} {role} embeddings contain "
                    f"NaN or Inf (first: #{', #'.join(map(str, rows))}); rebuild the bank"
                )
    return bank


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bank_from_features(
    positives: Sequence[torch.Tensor],
    negatives: Sequence[torch.Tensor],
    *,
    identity: dict[str, Any],
    similarity: str,
    weights: Sequence[float],
    pca_dims: Sequence[int] = DEFAULT_PCA_DIMS,
    extra: dict[str, Any] | None = None,
) -> EmbeddingBank:
    """Assemble a bank from stacked encoder features per level.

    ``positives[level]`` is ``(M, T, D)`` token states (image-only) or ``(M, D)`` vectors. ``pooled``
    stores token means ``(M, D)``; ``token-pca`` fits a PCA per level on P ∪ N tokens and stores the
    projected tokens ``(M, T, d)``; ``vector`` stores the vectors as given; ``centred`` stores Figure-5
    embeddings ``(M, D)`` (the mean of per-token L2-normalised states; a vector normalised), centred on
    their P ∪ N mean when the loss uses them. The metadata records the bank's leave-one-out separability
    (``separability``; ``extra["perturbations"]`` = K makes an image's K embeddings one held-out group).
    """
    check_similarity(similarity)
    if len(positives) != len(negatives) or len(weights) != len(positives):
        raise ValueError(f"{len(positives)} positive levels, {len(negatives)} negative levels, {len(weights)} weights")
    pca: list[PCA] | None = None
    if similarity == "token-pca":
        if len(pca_dims) != len(positives):
            raise ValueError(f"pca_dims: expected {len(positives)} dims (one per level), found {tuple(pca_dims)}")
        pca = [
            PCA.fit(torch.cat([p.reshape(-1, p.shape[-1]), n.reshape(-1, n.shape[-1])]), min(d, p.shape[-1]))
            for p, n, d in zip(positives, negatives, pca_dims, strict=True)
        ]
        positives = [projection(p.float()) for projection, p in zip(pca, positives, strict=True)]
        negatives = [projection(n.float()) for projection, n in zip(pca, negatives, strict=True)]
    elif similarity == "pooled":
        positives = [p.mean(dim=1) if p.dim() == 3 else p for p in positives]
        negatives = [n.mean(dim=1) if n.dim() == 3 else n for n in negatives]
    elif similarity == "centred":
        positives = [figure5_embedding(p) for p in positives]
        negatives = [figure5_embedding(n) for n in negatives]
    metadata = {
        "encoder": dict(identity),
        "similarity": similarity,
        "levels": len(positives),
        "weights": [float(w) for w in weights],
        "pca_dims": None if pca is None else [int(p.components.shape[1]) for p in pca],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    bank = EmbeddingBank(
        positives=[p.float().cpu() for p in positives],
        negatives=[n.float().cpu() for n in negatives],
        metadata=metadata,
        pca=pca,
    )
    try:
        bank.metadata["separability"] = bank.separability().as_dict()
    except ValueError as exc:  # too few positives or negatives to hold any out
        bank.metadata["separability"] = {"error": str(exc)}
    return bank


def embed_images(
    encoder: Any,
    images: Iterable[torch.Tensor],
    *,
    perturbations: int = 0,
    sigma: float = 0.0,
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[torch.Tensor]:
    """Encode ``(slices, y, x)`` images one at a time without gradients; stacked features per level.

    With ``perturbations > 0`` (image-language encoders) each slice contributes ``perturbations``
    embeddings with N(0, σ²) noise on the text-token embeddings (paper Eq. 10).
    """
    generator = torch.Generator().manual_seed(seed)
    levels: list[list[torch.Tensor]] | None = None
    iterator = progress(images) if progress is not None else images
    for image in iterator:
        with torch.no_grad():
            if perturbations > 0:
                states = encoder.encode_perturbed(image, count=perturbations, sigma=sigma, generator=generator)
                features = [states.reshape(-1, states.shape[-1])]
            else:
                features = encoder.encode(image)
        if levels is None:
            levels = [[] for _ in features]
        for level, feature in enumerate(features):
            levels[level].append(feature.float().cpu())
    if levels is None:
        raise ValueError("no images to embed")
    return [torch.cat(level) for level in levels]
