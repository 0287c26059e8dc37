"""The one reconstruction configuration shared by the CLI, the gadget's XML properties and the tests.

``ReconConfig`` is a keyword-only, frozen dataclass. Fields left at ``None`` take the value the bank recommends
or else that of the chosen preset (``paper``, the default, or ``public-code``; REFERENCE.md §1) through
:meth:`ReconConfig.resolved`, which records each value's source (``semrecon_core.settings.resolve`` reads the
bank's metadata for it).
``ReconConfig.from_properties`` parses string properties (Gadgetron ``<property>`` elements, ``--set name=value``)
and rejects unknown names and malformed values with a message that names them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

Backbone = Literal["zero-filled", "sense", "unet", "unrolled", "inr"]
PriorName = Literal["none", "tv", "semantic"]
Preset = Literal["paper", "public-code"]

BACKBONES: tuple[str, ...] = typing.get_args(Backbone)
PRIORS: tuple[str, ...] = typing.get_args(PriorName)
PRESETS: tuple[str, ...] = typing.get_args(Preset)


class ConfigError(ValueError):
    """A configuration property is unknown or has a value that does not parse or validate."""


BankKind = Literal["image", "language"]

# Defaults. Key: (field, preset, backbone, prior, bank kind), None = any; the most specific match wins, where a
# bank kind outweighs a prior, a prior a backbone, and a backbone a preset.
# λ (REFERENCE.md §7, benchmarks/results/calibration.md): public-code uses the authors' values on the authors'
# loss definitions; its TV λ per backbone keeps the TV/data gradient ratio of the authors' INR phase 1 (TV
# weight 3). The paper preset's TV λ is CS-TV's (its per-pixel data term and TV make the deep fit minimise the
# CS-TV objective); its semantic λ is the authors' λ times the measured ratio of the two presets' data-term
# gradients at initialisation (320² knee, 15 coils, R = 4), so the prior/data balance at the start of a fit
# equals the authors'.
_Key = tuple[str, "Preset | None", "Backbone | None", "PriorName | None", "BankKind | None"]
_DEFAULTS: dict[_Key, object] = {
    ("level_weights", "paper", None, None, None): (0.005, 0.5, 1.0),
    ("level_weights", "public-code", None, None, None): (0.01, 0.5, 1.0),
    ("similarity", "paper", None, None, None): "centred",  # benchmarks/results/similarity.md
    ("similarity", "public-code", None, None, None): "token-pca",
    ("sigma", "paper", None, None, None): 0.03,
    ("sigma", "public-code", None, None, None): 0.02,
    ("lr", None, None, None, None): 1e-3,
    ("lr", None, "inr", None, None): 1e-4,
    ("iterations", None, None, None, None): 1500,
    ("iterations", None, "inr", None, None): 1600,
    ("iterations", None, "unrolled", None, None): 200,  # random init overfits later: backbones_defaults.md
    ("iterations", None, None, "semantic", "language"): 200,
    ("stages", None, None, None, None): 4,
    ("stages", None, None, "semantic", "language"): 8,
    ("dc_init", None, None, None, None): 0.01,
    ("dc_init", None, None, "semantic", "language"): 0.001,
    ("final_dc", None, None, None, None): 0.0,
    ("final_dc", "public-code", "unet", None, None): 0.5,
    ("final_dc", "public-code", "inr", None, None): 0.05,
    ("final_dc", None, "unrolled", None, None): 0.5,
    ("lam", None, None, "none", None): 0.0,
    ("lam", "paper", None, "tv", None): 0.003,
    ("lam", "public-code", "unet", "tv", None): 0.75,
    ("lam", "public-code", "unrolled", "tv", None): 6.75,
    ("lam", "public-code", "inr", "tv", None): 3.0,
    ("lam", "public-code", "unet", "semantic", None): 0.1,
    ("lam", "public-code", "unrolled", "semantic", None): 1.0,
    ("lam", "public-code", "inr", "semantic", None): 5.0,
    ("lam", "public-code", None, "semantic", "language"): 500.0,
    ("lam", "paper", "unet", "semantic", None): 0.0016,
    ("lam", "paper", "unrolled", "semantic", None): 0.0018,
    ("lam", "paper", "inr", "semantic", None): 0.02,
    ("lam", "paper", None, "semantic", "language"): 0.47,
}

# Classical solvers have their own defaults whatever the preset, per prior: CG-SENSE (prior none) with a
# small Tikhonov weight and early stopping, primal-dual TV with λ relative to max |zero-filled| = 1
# (tuned on the real 8-coil brain at R = 4: benchmarks/results/classical_vs_bart.md).
_CLASSICAL_DEFAULTS: dict[str, dict[str, object]] = {
    "none": {"iterations": 30, "lam": 0.003, "lr": 0.0},
    "tv": {"iterations": 100, "lam": 0.003, "lr": 0.0},
}


def default_value(name: str, preset: str, backbone: str, prior: str, kind: str | None) -> tuple[bool, object]:
    """``(found, value)``: the most specific default of field ``name`` for this combination."""
    entry = _default_entry(name, preset, backbone, prior, kind)
    return (False, None) if entry is None else (True, entry[1])


def _default_entry(name: str, preset: str, backbone: str, prior: str, kind: str | None) -> tuple[_Key, object] | None:
    """``(key, value)`` of the most specific entry of :data:`_DEFAULTS` for field ``name``, or ``None``."""
    best: tuple[int, _Key, object] | None = None
    for key, value in _DEFAULTS.items():
        field_name, *pattern = key
        if field_name != name:
            continue
        wanted = (preset, backbone, prior, kind)
        if all(p is None or p == w for p, w in zip(pattern, wanted, strict=True)):
            specificity = sum(weight for p, weight in zip(pattern, (1, 2, 4, 8), strict=True) if p is not None)
            if best is None or specificity > best[0]:
                best = (specificity, key, value)
    return None if best is None else (best[1], best[2])


# How sources and combinations are named (``ResolvedConfig.sources``, ``semrecon recon --explain``).
SOURCE_EXPLICIT = "explicit"
SOURCE_DEFAULT = "default"
_NAMES = {
    "zero-filled": "zero-filled",
    "sense": "SENSE",
    "unet": "U-Net",
    "unrolled": "unrolled",
    "inr": "INR",
    "none": "no prior",
    "tv": "TV",
    "semantic": "semantic",
    "image": "image-only bank",
    "language": "image-language bank",
}


def _preset_source(key: _Key) -> str:
    """``preset paper (U-Net + semantic)``: the table entry ``key`` as a source."""
    _, preset, *combination = key
    parts = " + ".join(_NAMES[p] for p in combination if p is not None)
    if preset is None:
        return f"preset table ({parts}; every preset)" if parts else "preset table (every preset)"
    return f"preset {preset} ({parts})" if parts else f"preset {preset}"


@dataclass(frozen=True)
class Setting:
    """One resolved setting: its ``value`` and where it came from (``source``).

    Sources: ``explicit`` (set by the caller: option, ``--set``, property), ``bank PATH`` (a value the bank
    recommends in its metadata), ``preset paper (U-Net + semantic)`` (the entry of the preset table that
    matched), ``classical default (CS-TV)`` and ``default`` (the field's own default).
    """

    name: str
    value: object
    source: str


@dataclass(frozen=True, kw_only=True)
class ReconConfig:
    """How to reconstruct one scan.

    Attributes:
        backbone: ``zero-filled`` (coil-combined adjoint), ``sense`` (classical iterative solver:
            CG-SENSE with prior ``none``, primal-dual compressed-sensing TV with prior ``tv``), or a deep
            backbone ``unet`` / ``unrolled`` / ``inr`` fitted scan-specifically with Eq. (7).
        prior: regulariser ``none``, ``tv`` or ``semantic`` (contrastive loss in a frozen encoder's space).
        preset: ``paper`` (default) or ``public-code``; fills fields left at ``None``.
        lam: regularisation weight λ; for ``sense`` + ``none`` the Tikhonov weight of CG-SENSE.
        iterations: optimiser iterations (CG / primal-dual iterations for ``sense``).
        lr: Adam learning rate of the deep backbones.
        level_weights: weights of the encoder levels (vision layers ``layers``).
        layers: vision-tower hidden-state indices used by the image-only encoder.
        similarity: ``centred`` cosine of Figure-5 embeddings centred on the bank (paper preset), ``pooled``
            cosine of token means (the paper's text) or ``token-pca`` per-token cosine after PCA (public code).
        tau: InfoNCE temperature.
        hinge: ``none`` (Eq. 3, the paper) or ``bank``: the semantic loss of a slice counts only above the bank's
            positives' own leave-one-out level, so the fit cannot drive the encoder's score past real fully
            sampled images (a departure from the paper; ``benchmarks/results/prior_variants.md``).
        views: encoder views per evaluation of the semantic loss: 1 (the paper) or the image plus random
            shifted / flipped / rescaled copies, averaged, so that the gradient keeps what survives small
            geometric changes instead of the encoder's pixel-grid patterns (a departure from the paper).
        sigma: std of the Gaussian perturbation of text embeddings (image-language banks).
        encoder: HuggingFace id or local directory of the Janus checkpoint.
        bank: path of an embedding bank (``.safetensors``) for the semantic prior.
        allow_download: allow fetching encoder weights from the hub (off by default).
        checkpoint: warm-start checkpoint of the backbone (``semrecon pretrain`` output).
        width: network size: U-Net / unrolled denoiser channels at the first level, SIREN features per
            layer (``None``: the paper's 64 / 256).
        depth: network size: U-Net levels, SIREN sine layers (``None``: the paper's 5 / 8).
        lora_rank: LoRA rank for scan-specific fine-tuning of a warm-started backbone (0: train all weights).
        final_dc: weight of a final soft data-consistency step, ``argmin_x ‖Ax − y‖² + w‖x − f‖²`` from the
            network's image ``f`` (0: none; public-code: the authors' 0.5 for the U-Net, 0.05 for the INR).
        stages: unrolled network stages (4; image-language banks: the authors' 8).
        dc_init: initial data-consistency weight of each unrolled stage (0.01; image-language: 0.001).
        start: where the U-Net's fit starts: ``network`` (its own output, the paper), ``preview`` (its output
            plus a fixed offset that makes the first iterate the CG-SENSE preview, so a fit stopped early sends an
            image near the preview instead of the network's untrained output) or ``cs-tv`` (the same offset to the
            CS-TV image of :func:`cs_tv_config`, computed inside the fit's time budget; online chains). The fitted
            network moves its image almost only in smooth directions, which the fully sampled k-space centre pins,
            so a fit started at the preview stays there (``benchmarks/results/online_chain_tv.md``).
        combine: how the zero-filled backbone combines the coil images: ``maps`` (the coil maps' adjoint, as every
            other backbone) or ``rss`` (root-sum-of-squares, as ``ismrmrd_recon_cartesian_2d`` and Gadgetron's
            simple reconstruction chains; magnitude only).
        slice_batch: slices optimised together (0: as many as the device holds: all on the CPU; on CUDA sized from
            the memory of one measured fit step, U-Net and unrolled; the INR fits all).
        time_budget_s: wall-clock seconds the fit of one scan may take, shared evenly by its slice batches
            (and the INR's two phases); a fit stopped by it keeps its image at that point (0: no limit).
        calib_width: calibration (ACS) width used for ESPIRiT when the data do not say.
        espirit: ESPIRiT implementation: ``sigpy`` (the reference, default) or ``torch`` (the same maps to 1e-4,
            every slice at once, on the reconstruction's device; what the shipped chains use).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        autocast: ``bfloat16`` autocast of encoder and backbone on CUDA, or ``none``.
        encoder_checkpointing: recompute the semantic encoder's block activations in the backward pass
            (less memory, more compute).
        seed: random seed; same seed and settings give the same output on CPU.
    """

    backbone: Backbone = "sense"
    prior: PriorName = "none"
    preset: Preset = "paper"
    lam: float | None = None
    iterations: int | None = None
    lr: float | None = None
    level_weights: tuple[float, ...] | None = None
    layers: tuple[int, ...] = (1, 13, 24)
    similarity: Literal["pooled", "token-pca", "centred"] | None = None
    tau: float = 0.07
    hinge: Literal["none", "bank"] = "none"
    views: int = 1
    sigma: float | None = None
    encoder: str = "deepseek-community/Janus-Pro-1B"
    bank: str | None = None
    allow_download: bool = False
    checkpoint: str | None = None
    width: int | None = None
    depth: int | None = None
    lora_rank: int = 4
    final_dc: float | None = None
    stages: int | None = None
    dc_init: float | None = None
    start: Literal["network", "preview", "cs-tv"] = "network"
    combine: Literal["maps", "rss"] = "maps"
    slice_batch: int = 0
    time_budget_s: float = 0.0
    calib_width: int = 24
    espirit: Literal["sigpy", "torch"] = "sigpy"
    device: str = "auto"
    autocast: Literal["bfloat16", "none"] = "bfloat16"
    encoder_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("prior", self.prior, PRIORS)
        _check_choice("preset", self.preset, PRESETS)
        _check_choice("similarity", self.similarity, ("pooled", "token-pca", "centred", None))
        _check_choice("autocast", self.autocast, ("bfloat16", "none"))
        _check_choice("espirit", self.espirit, ("sigpy", "torch"))
        _check_choice("start", self.start, ("network", "preview", "cs-tv"))
        _check_choice("hinge", self.hinge, ("none", "bank"))
        _check_choice("combine", self.combine, ("maps", "rss"))
        if self.combine == "rss" and self.backbone != "zero-filled":
            raise ConfigError(f"property 'combine': 'rss' needs backbone zero-filled, found backbone '{self.backbone}'")
        if self.views < 1:
            raise ConfigError(f"property 'views': expected a positive integer, found {self.views!r}")
        if self.start != "network" and self.backbone != "unet":
            raise ConfigError(f"property 'start': '{self.start}' needs backbone unet, found backbone '{self.backbone}'")
        for name in ("lam", "lr", "sigma", "final_dc", "dc_init"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"property '{name}': expected a non-negative number, found {value!r}")
        if not self.time_budget_s >= 0:
            raise ConfigError(f"property 'time_budget_s': expected seconds >= 0, found {self.time_budget_s!r}")
        if self.tau <= 0:
            raise ConfigError(f"property 'tau': expected a positive number, found {self.tau!r}")
        for name in ("iterations", "slice_batch", "lora_rank", "calib_width"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"property '{name}': expected a non-negative integer, found {value!r}")
        for name in ("width", "depth", "stages"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"property '{name}': expected a positive integer, found {value!r}")
        if self.level_weights is not None and len(self.level_weights) != len(self.layers):
            raise ConfigError(
                f"property 'level_weights': expected {len(self.layers)} weights (one per layer in "
                f"'layers' {self.layers}), found {len(self.level_weights)}"
            )
        if self.prior == "semantic" and self.backbone in ("zero-filled", "sense"):
            raise ConfigError(
                f"property 'prior': 'semantic' needs a deep backbone (unet, unrolled, inr), "
                f"found backbone '{self.backbone}'"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"property 'device': expected auto, cpu, cuda or cuda:N, found {self.device!r}")

    @property
    def is_classical(self) -> bool:
        """True for the solvers without a network (zero-filled, CG-SENSE, compressed-sensing TV)."""
        return self.backbone in ("zero-filled", "sense")

    def resolved(
        self, bank_kind: BankKind | None = None, *, bank_metadata: dict[str, Any] | None = None
    ) -> ResolvedConfig:
        """A copy with every unset field filled, each value with its source (:attr:`ResolvedConfig.sources`).

        Precedence: a value set here (``explicit``) > a value the bank recommends (``bank_metadata``'s
        ``recommended``, see :func:`bank_recommendations`) > the preset table for (preset, backbone, prior,
        bank kind) > the field's default. ``bank_metadata`` (the bank file's metadata, read once by
        :func:`semrecon_core.settings.resolve`) also gives the bank kind; without it ``bank_kind`` (``image`` or
        ``language``) selects the image-language settings of the semantic prior (``None``: image-only). The
        metadata travel with the result, so that building the prior does not read them again. Pure: reads
        no file.
        """
        semantic = self.prior == "semantic"
        metadata = bank_metadata if semantic else None
        if metadata is not None:
            bank_kind = "language" if metadata.get("encoder", {}).get("kind") == "language" else "image"
        kind = bank_kind if semantic else None
        recommended = bank_recommendations(metadata, self.preset, self.backbone, source=self.bank or "bank")
        classical = _CLASSICAL_DEFAULTS.get(self.prior, {}) if self.is_classical else {}
        hints = typing.get_type_hints(ReconConfig) if recommended else {}
        updates: dict[str, Any] = {}  # field values of several types; __post_init__ validates them
        sources: dict[str, str] = {}
        for f in fields(ReconConfig):
            value = getattr(self, f.name)
            if value is not None:
                explicit = f.default is None or value != f.default
                sources[f.name] = SOURCE_EXPLICIT if explicit else SOURCE_DEFAULT
            elif f.name in recommended:
                updates[f.name] = _parse_value(f.name, _as_text(recommended[f.name]), hints[f.name])
                sources[f.name] = f"bank {self.bank}"
                record = bank_calibration(metadata, self.preset, self.backbone) if f.name == "lam" else None
                if record is not None and _same_number(record.get("lam"), updates[f.name]):
                    sources[f.name] = calibrated_source(int(record.get("images") or 0), self.bank)
            elif f.name in classical:
                updates[f.name] = classical[f.name]
                sources[f.name] = f"classical default ({'CS-TV' if self.prior == 'tv' else 'CG-SENSE'})"
            elif (entry := _default_entry(f.name, self.preset, self.backbone, self.prior, kind)) is not None:
                updates[f.name] = entry[1]
                sources[f.name] = _preset_source(entry[0])
            else:
                sources[f.name] = SOURCE_DEFAULT
        values = {f.name: getattr(self, f.name) for f in fields(ReconConfig)}
        try:
            return ResolvedConfig(
                **{**values, **updates},
                bank_kind=kind,
                bank_metadata=metadata,
                sources=tuple(sources.items()),
            )
        except ConfigError as exc:
            if not recommended:
                raise
            raise ConfigError(f"bank {self.bank}: a recommended value does not validate: {exc}") from None

    def replace(self: _Config, **changes: Any) -> _Config:
        """Return a validated copy (of the same class) with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_properties(cls, properties: dict[str, str], base: ReconConfig | None = None) -> ReconConfig:
        """Build a config from string properties (``name -> value``), on top of ``base``.

        Names may use ``-`` or ``_``. Raises :class:`ConfigError` naming an unknown property or a
        value that does not parse as the field's type.
        """
        base = base or cls()
        known = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        changes: dict[str, Any] = {}
        unknown: dict[str, str] = {}
        for raw_name, raw_value in properties.items():
            name = raw_name.strip().replace("-", "_")
            if name not in known:
                unknown[raw_name] = raw_value
                continue
            changes[name] = _parse_value(name, raw_value, hints[name])
        if unknown:
            raise ConfigError(
                f"unknown configuration properties: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
            )
        return dataclasses.replace(base, **changes)

    def to_properties(self) -> dict[str, str]:
        """Inverse of :meth:`from_properties` for the fields that are set."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or not f.metadata.get("property", True):
                continue
            if isinstance(value, tuple):
                out[f.name] = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                out[f.name] = "true" if value else "false"
            else:
                out[f.name] = str(value)
        return out


@dataclass(frozen=True, kw_only=True)
class ResolvedConfig(ReconConfig):
    """A :class:`ReconConfig` whose preset-dependent fields are all set: what the engines receive.

    Made by :meth:`ReconConfig.resolved`; ``bank``, ``checkpoint``, ``width`` and ``depth`` stay optional.
    ``bank_kind`` records the kind of bank the defaults were chosen for (``None``: no semantic prior, or an
    image-only bank assumed). ``bank_metadata``: the bank's metadata as read for the resolution (``None``: not
    read), reused by the prior factory. ``sources``: ``(field, source)`` of every :class:`ReconConfig` field
    (:meth:`setting`, :meth:`settings`). Neither is a property (:meth:`to_properties` leaves them out).
    """

    bank_kind: BankKind | None = None
    bank_metadata: dict[str, Any] | None = dataclasses.field(
        default=None, compare=False, repr=False, metadata={"property": False}
    )
    sources: tuple[tuple[str, str], ...] = dataclasses.field(
        default=(), compare=False, repr=False, metadata={"property": False}
    )

    lam: float = 0.0
    iterations: int = 0
    lr: float = 0.0
    final_dc: float = 0.0
    stages: int = 4
    dc_init: float = 0.01
    level_weights: tuple[float, ...] = ()
    similarity: Literal["pooled", "token-pca", "centred"] = "pooled"
    sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [name for name in _RESOLVED if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"resolved configuration: no value for {', '.join(missing)}")

    def resolved(
        self, bank_kind: BankKind | None = None, *, bank_metadata: dict[str, Any] | None = None
    ) -> ResolvedConfig:
        """Already resolved: itself."""
        return self

    def replace(self: _Config, **changes: Any) -> _Config:
        """A validated copy with ``changes`` applied; the changed fields' source becomes ``explicit``.

        A changed ``bank`` forgets the metadata read for the old one.
        """
        assert isinstance(self, ResolvedConfig)
        sources = dict(self.sources)
        sources.update({name: SOURCE_EXPLICIT for name in changes if name in sources})
        extra: dict[str, Any] = {"sources": tuple(sources.items())}
        if "bank" in changes and changes["bank"] != self.bank:
            extra["bank_metadata"] = None
        return dataclasses.replace(self, **{**extra, **changes})

    def source(self, name: str) -> str:
        """Where the value of field ``name`` came from (``explicit``, ``bank PATH``, ``preset ...``, ``default``)."""
        return dict(self.sources).get(name, SOURCE_DEFAULT)

    def setting(self, name: str) -> Setting:
        """Field ``name`` with its value and source."""
        return Setting(name, getattr(self, name), self.source(name))

    def settings(self) -> list[Setting]:
        """Every :class:`ReconConfig` field, in declaration order, with its value and source."""
        return [self.setting(f.name) for f in fields(ReconConfig)]


def preview_config(config: ReconConfig) -> ReconConfig:
    """The CG-SENSE reconstruction of the preview and fallback images (and of the U-Net's ``start=preview``).

    CPU, no prior, the same seed and calibration width as ``config``; the gadget runs its preview on ``config``'s
    device.
    """
    return ReconConfig(backbone="sense", prior="none", device="cpu", seed=config.seed, calib_width=config.calib_width)


def cs_tv_config(config: ReconConfig) -> ReconConfig:
    """The CS-TV reconstruction the U-Net's ``start=cs-tv`` starts from: :func:`preview_config` with prior ``tv``.

    The classical defaults (λ 0.003, 100 primal-dual iterations), i.e. ``config/semrecon_tv.xml``'s image.
    """
    return preview_config(config).replace(prior="tv")


_RESOLVED = (
    "lam",
    "iterations",
    "lr",
    "final_dc",
    "stages",
    "dc_init",
    "level_weights",
    "similarity",
    "sigma",
)
RECOMMENDABLE = _RESOLVED
"""The fields a bank may recommend in its metadata: those the preset table fills."""
_Config = TypeVar("_Config", bound=ReconConfig)


def bank_recommendations(
    metadata: dict[str, Any] | None, preset: str, backbone: str, *, source: str = "bank"
) -> dict[str, object]:
    """The settings a bank recommends for (``preset``, ``backbone``): ``metadata["recommended"]``.

    ``recommended`` maps a field of the preset table (:data:`RECOMMENDABLE`: λ, iterations, ...) to a value, or to
    ``{selector: value}`` with selectors ``"paper/unet"``, ``"unet"``, ``"paper"`` or ``"*"`` (the most
    specific that matches wins; none: no recommendation), e.g. ``{"lam": {"paper/unet": 0.002, "inr": 0.03}}``.
    A field outside :data:`RECOMMENDABLE` is a :class:`ConfigError` naming ``source``.
    """
    table = (metadata or {}).get("recommended") or {}
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: metadata 'recommended' must map setting names to values, found {table!r}")
    out: dict[str, object] = {}
    for name, value in table.items():
        if name not in RECOMMENDABLE:
            raise ConfigError(
                f"{source}: metadata 'recommended' names {name!r}; a bank may recommend {', '.join(RECOMMENDABLE)}"
            )
        if isinstance(value, dict):
            for selector in (f"{preset}/{backbone}", backbone, preset, "*"):
                if selector in value:
                    out[name] = value[selector]
                    break
        else:
            out[name] = value
    return out


CALIBRATED = "calibrated on "
"""How the source of a λ that ``semrecon bank calibrate`` chose begins: ``calibrated on N held-out images (bank P)``."""


def calibrated_source(images: int, bank: str | None) -> str:
    """The source of a calibrated λ: ``calibrated on N held-out images (bank PATH)``."""
    return f"{CALIBRATED}{images} held-out image{'' if images == 1 else 's'} (bank {bank})"


def bank_calibration(metadata: dict[str, Any] | None, preset: str, backbone: str) -> dict[str, Any] | None:
    """The record ``semrecon bank calibrate`` left in a bank for (``preset``, ``backbone``), or ``None``.

    ``metadata["calibration"]`` maps selectors (``"paper/unet"``, ``"unet"``, ``"paper"``, ``"*"``, as
    :func:`bank_recommendations`; the most specific wins) to records with the chosen ``lam`` and the number of held-out
    ``images`` (:mod:`semrecon_core.priors.calibrate`).
    """
    table = (metadata or {}).get("calibration")
    if not isinstance(table, dict):
        return None
    for selector in (f"{preset}/{backbone}", backbone, preset, "*"):
        record = table.get(selector)
        if isinstance(record, dict):
            return record
    return None


def _same_number(a: object, b: object) -> bool:
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _as_text(value: object) -> str:
    """A recommended value (JSON) as the text :func:`_parse_value` reads."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"property '{name}': expected one of {shown}, found {value!r}")


def _parse_value(name: str, raw: str, hint: object) -> object:
    text = raw.strip()
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and text.lower() in ("", "none", "null"):
        return None
    inner = [a for a in args if a is not type(None)] if args else [hint]
    target = inner[0] if len(inner) == 1 else hint
    origin = typing.get_origin(target)
    try:
        if target is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if target is int:
            return int(text)
        if target is float:
            return float(text)
        if origin is tuple:
            item_type = typing.get_args(target)[0]
            return tuple(item_type(v) for v in text.replace(" ", "").split(",") if v)
        return text
    except ValueError as exc:
        raise ConfigError(f"property '{name}': cannot parse {raw!r} ({exc})") from None
