"""The settings of a study's grid and the reconstruction configuration of each.

A setting is (backbone, prior, preset, acceleration). Combinations that cannot run are left out of the grid
and listed with the reason (the semantic prior needs a deep backbone; zero-filled takes no prior). Every
setting's :class:`~semrecon_core.config.ReconConfig` starts from one base configuration (``--set``, the
encoder, the device, the seed) and adds the setting, the network size and iterations of the deep backbones
(``--width``/``--depth``/``--iterations``, for every deep backbone or per backbone, e.g. ``--iterations
300,unrolled=60``; the classical solvers keep their own iterations), the bank of the preset (semantic settings
only) and λ: chosen on a tuning case, given per prior (``--lam tv=…``) or per backbone and prior (``--lam
unet:semantic=…``), else the preset's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from semrecon_core.config import BACKBONES, PRESETS, PRIORS, ConfigError, ReconConfig

if TYPE_CHECKING:
    from collections.abc import Sequence

DEEP_BACKBONES = ("unet", "unrolled", "inr")


@dataclass(frozen=True)
class Setting:
    """One cell of the grid."""

    backbone: str
    prior: str
    preset: str
    acceleration: float

    @property
    def slug(self) -> str:
        """A file-name friendly name, e.g. ``unet-semantic-paper-R4``."""
        return f"{self.backbone}-{self.prior}-{self.preset}-R{self.acceleration:g}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "backbone": self.backbone,
            "prior": self.prior,
            "preset": self.preset,
            "acceleration": self.acceleration,
        }


def parse_list(text: str, choices: Sequence[str], option: str) -> tuple[str, ...]:
    """A comma-separated list of ``choices`` (order kept, duplicates dropped); an unknown entry is an error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option}: expected a comma-separated list of {', '.join(choices)}, found {text!r}")
    unknown = [item for item in items if item not in choices]
    if unknown:
        raise ValueError(f"{option}: unknown {', '.join(unknown)} (expected some of {', '.join(choices)})")
    return tuple(dict.fromkeys(items))


def parse_accelerations(text: str, option: str = "--accelerations") -> tuple[float, ...]:
    """Comma-separated accelerations R ≥ 1, sorted, duplicates dropped."""
    values: list[float] = []
    for item in text.split(","):
        if not item.strip():
            continue
        values.append(_parse_number(item.strip(), option, minimum=1, expected="R >= 1"))
    if not values:
        raise ValueError(f"{option}: expected a comma-separated list of R values, found {text!r}")
    return tuple(sorted(set(values)))


def _parse_number(raw: str, option: str, *, minimum: float, expected: str) -> float:
    """``raw`` as a finite number ≥ ``minimum``; errors start with ``option`` and say what was ``expected``."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{option}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{option}: expected {expected}, found {raw}")
    return value


def parse_per_backbone(text: str, option: str) -> tuple[int | None, dict[str, int]]:
    """``N`` / ``N,BACKBONE=M,…`` / ``BACKBONE=M,…`` → ``(N for every deep backbone or None, {backbone: M})``."""
    common: int | None = None
    specific: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, raw = item.rpartition("=")
        if sep and name.strip() not in DEEP_BACKBONES:
            raise ValueError(
                f"{option} {item}: unknown deep backbone {name.strip()!r} (expected {', '.join(DEEP_BACKBONES)})"
            )
        if not raw.strip().isdigit() or int(raw) < 1:
            raise ValueError(f"{option}: expected a positive integer or BACKBONE=INTEGER, found {item!r}")
        if sep:
            specific[name.strip()] = int(raw)
        else:
            common = int(raw)
    if common is None and not specific:
        raise ValueError(f"{option}: expected N or BACKBONE=N entries, found {text!r}")
    return common, specific


def parse_lams(entries: Sequence[str]) -> dict[tuple[str | None, str], float]:
    """``--lam PRIOR=VALUE`` / ``--lam BACKBONE:PRIOR=VALUE`` → ``{(backbone or None, prior): λ}``."""
    out: dict[tuple[str | None, str], float] = {}
    for entry in entries:
        name, sep, raw = entry.partition("=")
        backbone, colon, prior = name.strip().rpartition(":")
        if not sep or not prior:
            raise ValueError(f"--lam: expected PRIOR=VALUE or BACKBONE:PRIOR=VALUE, found {entry!r}")
        if prior not in ("none", "tv", "semantic"):
            raise ValueError(f"--lam {entry}: unknown prior {prior!r} (expected none, tv or semantic)")
        if colon and backbone not in BACKBONES:
            raise ValueError(f"--lam {entry}: unknown backbone {backbone!r} (expected one of {', '.join(BACKBONES)})")
        value = _parse_number(raw, f"--lam {entry}", minimum=0, expected="a non-negative number")
        out[(backbone if colon else None, prior)] = value
    return out


def parse_banks(entries: Sequence[str], presets: Sequence[str]) -> dict[str, str]:
    """``--bank PATH`` (every preset) / ``--bank PRESET=PATH`` → ``{preset: path}``."""
    banks: dict[str, str] = {}
    for entry in entries:
        preset, sep, path = entry.partition("=")
        if sep and preset in PRESETS:
            banks[preset] = path
        else:
            banks.update(dict.fromkeys(presets, entry))
    return {preset: path for preset, path in banks.items() if preset in presets}


@dataclass
class Grid:
    """The settings to run and how to configure each.

    Attributes:
        base: configuration every setting starts from (``--set``, encoder, device, seed, calibration width).
        backbones: in table order.
        priors: in table order.
        presets: in table order.
        accelerations: ascending.
        banks: the bank of each preset (semantic settings).
        lams: λ given on the command line, ``{(backbone or None, prior): λ}``.
        deep: ``iterations`` / ``width`` / ``depth`` for the deep backbones (unset ones are left out).
        per_backbone: the same fields for one deep backbone, ``{backbone: {field: value}}``, over ``deep``.
        skipped: combinations left out, with the reason.
    """

    base: ReconConfig
    backbones: tuple[str, ...]
    priors: tuple[str, ...]
    presets: tuple[str, ...]
    accelerations: tuple[float, ...]
    banks: dict[str, str] = field(default_factory=dict)
    lams: dict[tuple[str | None, str], float] = field(default_factory=dict)
    deep: dict[str, int] = field(default_factory=dict)
    per_backbone: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, values, known in (
            ("backbones", self.backbones, BACKBONES),
            ("priors", self.priors, PRIORS),
            ("presets", self.presets, PRESETS),
        ):
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(f"--{name}: expected some of {', '.join(known)}, found {', '.join(values) or 'none'}")
        if "semantic" in self.priors:
            missing = [p for p in self.presets if p not in self.banks]
            if missing:
                raise ValueError(
                    f"--priors includes semantic: give an embedding bank (--bank PATH, or --bank PRESET=PATH for "
                    f"preset {', '.join(missing)}); build one with `semrecon bank build`"
                )
        self.skipped = sorted(
            {
                reason
                for backbone in self.backbones
                for prior in self.priors
                if (reason := inapplicable(backbone, prior)) is not None
            }
        )

    def settings(self) -> list[Setting]:
        """Every runnable setting, sorted in table order (preset, acceleration, backbone, prior)."""
        return [
            Setting(backbone, prior, preset, acceleration)
            for preset in self.presets
            for acceleration in self.accelerations
            for backbone in self.backbones
            for prior in self.priors
            if inapplicable(backbone, prior) is None
        ]

    def order(self, setting: Setting) -> tuple[int, float, int, int]:
        """Sort key of a setting in table order."""
        return (
            self.presets.index(setting.preset),
            setting.acceleration,
            self.backbones.index(setting.backbone),
            self.priors.index(setting.prior),
        )

    def describe_deep(self) -> str:
        """The deep backbones' sizes and iterations as set, e.g. ``depth 4, iterations 300; inr: width 128``."""
        text = ", ".join(f"{k} {v}" for k, v in sorted(self.deep.items()))
        for backbone in DEEP_BACKBONES:
            fields = self.per_backbone.get(backbone)
            if fields and backbone in self.backbones:
                text += (
                    ("; " if text else "") + f"{backbone}: " + ", ".join(f"{k} {v}" for k, v in sorted(fields.items()))
                )
        return text

    def given_lam(self, setting: Setting) -> float | None:
        """λ from the command line for this setting (backbone-specific first), else ``None``."""
        for key in ((setting.backbone, setting.prior), (None, setting.prior)):
            if key in self.lams:
                return self.lams[key]
        return None

    def config(self, setting: Setting, lam: float | None = None) -> ReconConfig:
        """The configuration of ``setting``; ``lam`` (a tuned λ) wins over the command line and the preset."""
        changes: dict[str, Any] = {
            "backbone": setting.backbone,
            "prior": setting.prior,
            "preset": setting.preset,
            "bank": self.banks.get(setting.preset) if setting.prior == "semantic" else None,
        }
        if setting.backbone in DEEP_BACKBONES:
            changes.update(self.deep)
            changes.update(self.per_backbone.get(setting.backbone, {}))
        chosen = lam if lam is not None else self.given_lam(setting)
        if chosen is not None:
            changes["lam"] = chosen
        try:
            return self.base.replace(**changes)
        except ConfigError as exc:
            raise ValueError(f"setting {setting.slug}: {exc}") from None

    def default_lam(self, setting: Setting) -> float:
        """The λ a setting runs with when nothing is tuned: given on the command line, else the preset's."""
        from semrecon_core.settings import resolve

        return float(resolve(self.config(setting)).lam)


def inapplicable(backbone: str, prior: str) -> str | None:
    """Why (backbone, prior) cannot run, or ``None`` when it can."""
    if prior == "semantic" and backbone not in DEEP_BACKBONES:
        return f"{backbone} + semantic: the semantic prior needs a deep backbone (unet, unrolled, inr)"
    if backbone == "zero-filled" and prior != "none":
        return f"zero-filled + {prior}: the zero-filled image takes no prior"
    return None


def check_bank_similarity(grid: Grid) -> None:
    """Refuse a preset whose image-only similarity differs from its bank's, before anything runs."""
    from semrecon_core.priors.bank import read_metadata

    for preset, path in grid.banks.items():
        metadata = read_metadata(path)
        if metadata["encoder"].get("kind") != "image":
            continue
        wanted = grid.config(Setting("unet", "semantic", preset, grid.accelerations[0])).resolved("image").similarity
        if metadata["similarity"] != wanted:
            raise ValueError(
                f"--bank {path}: built for similarity {metadata['similarity']!r}, but preset {preset} uses "
                f"{wanted!r}; give each preset its bank (--bank {preset}=PATH) or --set similarity="
                f"{metadata['similarity']}"
            )
