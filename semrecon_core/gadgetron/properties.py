"""Gadgetron ``<configuration>`` properties → the gadget's settings (one validated ``ReconConfig``).

Gadgetron sends the ``<configuration>`` element of an ``<external>`` node verbatim as the CONFIG
message. Both property spellings Gadgetron accepts are read::

    <property name="backbone" value="unet"/>
    <property><name>backbone</name><value>unet</value></property>

Every property is either a :class:`~semrecon_core.config.ReconConfig` field (``-`` or ``_``) or one of
:data:`GADGET_PROPERTIES`; anything else is a :class:`~semrecon_core.config.ConfigError` naming it.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from semrecon_core.config import ConfigError, ReconConfig
from semrecon_core.data.images import Display

# Properties of the gadget itself (not of the reconstruction), with their help text.
GADGET_PROPERTIES: dict[str, str] = {
    "series_index": "image_series_index of the images the gadget sends (positive integer, default 1)",
    "display_max_value": "max_value of the AutoScaleGadget after the gadget (default 2048; 0: none): window "
    "centre/width describe the pixels that leave the chain",
    "display_max_intensity": "max_intensity of the FloatToUShortGadget after the gadget (default 4095; 0: the "
    "images stay float)",
    "preview": "send a CG-SENSE preview series as each buffer arrives, before the fitted images (true/false, default "
    "true; only for the fitted backbones)",
    "preview_series_index": "image_series_index of the preview images (default 0: series_index + 1)",
}


@dataclass(frozen=True, kw_only=True)
class GadgetSettings:
    """What the gadget needs before the first buffer: the reconstruction config, image series and display."""

    config: ReconConfig = field(default_factory=ReconConfig)
    series_index: int = 1
    display: Display = field(default_factory=Display)
    preview: bool = True
    preview_series_index: int = 0

    @property
    def sends_preview(self) -> bool:
        """Whether a preview series goes out: asked for, and the backbone is one that is fitted (takes time)."""
        return self.preview and not self.config.is_classical

    @property
    def preview_series(self) -> int:
        """The preview's image_series_index."""
        return self.preview_series_index or self.series_index + 1


def parse_properties(
    configuration: str | bytes | ET.Element | None, *, source: str = "configuration"
) -> dict[str, str]:
    """Read ``name -> value`` pairs from a ``<configuration>`` element (or its XML text).

    ``None`` or empty text gives no properties. Bytes are UTF-8 (what Gadgetron sends) unless an XML
    declaration names another encoding. A property without a name, a repeated name, bytes that are not
    text or XML that does not parse is a :class:`ConfigError` naming ``source``.
    """
    if configuration is None:
        return {}
    if isinstance(configuration, ET.Element):
        root = configuration
    else:
        text = _decode(configuration, source) if isinstance(configuration, bytes) else configuration
        if not text.strip():
            return {}
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise ConfigError(f"{source}: the configuration XML does not parse ({exc})") from None
    properties: dict[str, str] = {}
    for element in root.iter("property"):
        name = element.get("name")
        value = element.get("value")
        if name is None:
            name = (element.findtext("name") or "").strip()
            value = element.findtext("value")
        if not name:
            raise ConfigError(f'{source}: a <property> has no name (expected name="..." or <name>...</name>)')
        if name in properties:
            raise ConfigError(f"{source}: property '{name}' is given twice")
        properties[name] = "" if value is None else value
    return properties


def _decode(configuration: bytes, source: str) -> str | bytes:
    """UTF-8 text, or the bytes themselves when an XML declaration names their encoding (the parser reads it)."""
    try:
        return configuration.decode("utf-8")
    except UnicodeDecodeError as exc:
        if configuration.lstrip().startswith(b"<?xml") and b"encoding=" in configuration.split(b"?>", 1)[0]:
            return configuration
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{configuration[exc.start]:02x} at offset {exc.start} of "
            f"{len(configuration)}); the <configuration> must be UTF-8 or declare its encoding"
        ) from None


def settings_from_properties(
    properties: dict[str, str], *, base: ReconConfig | None = None, source: str = "configuration"
) -> GadgetSettings:
    """Validate ``properties`` into :class:`GadgetSettings` (recon fields on top of ``base``).

    Raises :class:`ConfigError` naming an unknown property or a malformed value.
    """
    recon: dict[str, str] = {}
    series: dict[str, int] = {}
    preview = True
    display: dict[str, Any] = {}
    for name, value in properties.items():
        key = name.strip().replace("-", "_")
        if key in ("display_max_value", "display_max_intensity"):
            display[key.removeprefix("display_")] = _non_negative(key, value, source)
        elif key in ("series_index", "preview_series_index"):
            try:
                series[key] = int(value)
            except ValueError:
                raise ConfigError(f"{source}: property '{key}': cannot parse {value!r} as an integer") from None
            if series[key] < 0:
                raise ConfigError(f"{source}: property '{key}': expected >= 0, found {series[key]}")
        elif key == "preview":
            flag = value.strip().lower()
            if flag not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ConfigError(f"{source}: property 'preview': expected true or false, found {value!r}")
            preview = flag in ("true", "1", "yes", "on")
        else:
            recon[name] = value
    try:
        config = ReconConfig.from_properties(recon, base=base)
    except ConfigError as exc:
        extra = ", ".join(sorted(GADGET_PROPERTIES))
        raise ConfigError(f"{source}: {exc} (gadget properties: {extra})") from None
    return GadgetSettings(config=config, preview=preview, display=Display(**display), **series)


def _non_negative(name: str, value: str, source: str) -> float:
    """``value`` as a finite number >= 0, else a ConfigError naming the property."""
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{source}: property '{name}': cannot parse {value!r} as a number") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{source}: property '{name}': expected a finite number >= 0, found {value!r}")
    return number


def settings_from_configuration(
    configuration: str | bytes | ET.Element | None,
    *,
    overrides: dict[str, str] | None = None,
    source: str = "configuration",
) -> GadgetSettings:
    """Parse a ``<configuration>`` element and validate it, ``overrides`` (e.g. ``--set``) winning."""
    properties = parse_properties(configuration, source=source)
    properties.update(overrides or {})
    return settings_from_properties(properties, source=source)


def parse_assignments(assignments: list[str] | None) -> dict[str, str]:
    """``["name=value", ...]`` (from ``--set``) → dict; a missing ``=`` is a ConfigError naming the item."""
    out: dict[str, str] = {}
    for item in assignments or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {item!r}: expected name=value")
        out[name.strip()] = value.strip()
    return out
