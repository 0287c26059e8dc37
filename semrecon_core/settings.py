"""The one place a configuration is resolved: explicit values, then the bank's, then the preset table.

:func:`resolve` reads the semantic prior's bank metadata once (its kind and the values it recommends) and
hands it to :meth:`~semrecon_core.config.ReconConfig.resolved`, which records where every value came from;
the resolved configuration carries the metadata on to the prior factory, which does not read them again.
:func:`explain` prints every resolved value with its source (``semrecon recon --explain``).
:func:`check_machine` checks, once before any work, the settings that depend on the machine (a CUDA device that is
not there); every path (``recon``, ``replay``, the gadget, ``serve``) refuses them with its message.
"""

from __future__ import annotations

import logging
from typing import Any

from semrecon_core.config import ConfigError, ReconConfig, ResolvedConfig

log = logging.getLogger(__name__)


class MachineError(ConfigError):
    """A setting this machine cannot satisfy (e.g. ``device=cuda`` without CUDA), named by :func:`check_machine`."""


IMAGE_ONLY_FIELDS = ("level_weights", "similarity")
"""Settings that mean nothing to an image-language bank."""

_SEMANTIC_ONLY = frozenset(
    ("level_weights", "layers", "similarity", "tau", "hinge", "views", "sigma", "encoder", "bank")
)
_SEMANTIC_ONLY |= {"allow_download", "encoder_checkpointing"}
_NETWORK_ONLY = frozenset(
    ("lr", "checkpoint", "width", "depth", "lora_rank", "final_dc", "start", "slice_batch", "time_budget_s")
)


def read_bank_metadata(config: ReconConfig) -> dict[str, Any] | None:
    """The metadata of the semantic prior's bank, or ``None`` (no semantic prior, no bank, or unreadable).

    A bank that cannot be read gives ``None`` here; building the prior reports the problem.
    """
    if config.prior != "semantic" or not config.bank:
        return None
    from semrecon_core.priors.bank import read_metadata

    try:
        return read_metadata(config.bank)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve(config: ReconConfig) -> ResolvedConfig:
    """``config`` with every setting resolved (explicit > bank > preset table > default) and its source.

    Reads the bank's metadata once (nothing when ``config`` is already resolved). A language bank used with
    image-only settings set explicitly gets a warning naming them.
    """
    if isinstance(config, ResolvedConfig):
        return config
    resolved = config.resolved(bank_metadata=read_bank_metadata(config))
    if resolved.bank_kind == "language":
        ignored = [name for name in IMAGE_ONLY_FIELDS if getattr(config, name) is not None]
        if ignored:
            log.warning(
                "semrecon: bank %s is an image-language bank; the image-only settings %s do not apply to it",
                config.bank,
                ", ".join(ignored),
            )
    return resolved


def device_problem(name: str) -> str | None:
    """Why device ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) cannot run on this machine; ``None``: it can."""
    if name in ("auto", "cpu"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"property 'device': '{name}' requested but CUDA is not available on this machine"
    index = torch.device(name).index
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        devices = f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        return f"property 'device': '{name}' requested but this machine has {devices}"
    return None


def check_machine(config: ReconConfig) -> ResolvedConfig:
    """``config`` resolved (:func:`resolve`) after checking the settings that depend on this machine.

    Raises :class:`MachineError` naming the setting (a ``device`` that is not there) before any work starts; every
    path calls it once: ``recon`` and ``replay`` exit 2 with its message, the gadget and ``semrecon serve`` log it as
    an ERROR and send the labelled CG-SENSE fallback for every buffer. Settings the machine can run only more slowly
    get a warning (once per process): ``espirit=sigpy`` on CUDA without CuPy computes the coil maps on the CPU
    (``espirit=torch`` runs them on the GPU). The other machine-dependent settings adapt on their own: ``autocast``
    applies on CUDA only, ``slice_batch`` 0 sizes the batches from the device's memory.
    """
    resolved = resolve(config)
    problem = device_problem(resolved.device)
    if problem is not None:
        raise MachineError(problem)
    slow = resolved.espirit == "sigpy" and _uses_cuda(resolved.device)
    if slow and resolved.device not in _WARNED_CUPY and not _has_cupy():
        _WARNED_CUPY.add(resolved.device)
        log.warning(
            "semrecon: espirit=sigpy on %s: CuPy is not installed, so ESPIRiT runs on the CPU (espirit=torch runs it "
            "on the GPU)",
            resolved.device,
        )
    return resolved


_WARNED_CUPY: set[str] = set()


def _uses_cuda(name: str) -> bool:
    import torch

    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def _has_cupy() -> bool:
    import importlib.util

    return importlib.util.find_spec("cupy") is not None


def unused(name: str, config: ResolvedConfig) -> bool:
    """Whether field ``name`` has no effect on a reconstruction with ``config``."""
    if name in _SEMANTIC_ONLY and config.prior != "semantic":
        return True
    if config.bank_kind == "language" and name in (*IMAGE_ONLY_FIELDS, "layers"):
        return True
    if name == "sigma" and config.bank_kind != "language":
        return True
    if name in ("stages", "dc_init") and config.backbone != "unrolled":
        return True
    if name in ("lam", "iterations") and config.backbone == "zero-filled":
        return True
    if name == "combine" and config.backbone != "zero-filled":
        return True
    return name in _NETWORK_ONLY and config.is_classical


def explain(config: ReconConfig) -> str:
    """A table of every setting of ``config`` (resolved here when it is not yet): name, value, source.

    Settings without effect on this combination are marked ``(unused)`` in a fourth column.
    """
    resolved = resolve(config)
    rows = [("setting", "value", "source", "")]
    for setting in resolved.settings():
        name = "lam (λ)" if setting.name == "lam" else setting.name
        note = "(unused)" if unused(setting.name, resolved) else ""
        rows.append((name, _format(setting.value), setting.source, note))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    bank = ""
    if resolved.prior == "semantic":
        if resolved.bank_metadata is not None:
            bank = f", {'image-language' if resolved.bank_kind == 'language' else 'image-only'} bank"
        else:
            bank = f", {'bank unreadable' if resolved.bank else 'no bank'} (image-only assumed)"
    head = f"resolved settings: {resolved.backbone} + {resolved.prior}, preset {resolved.preset}{bank}"
    lines = [head]
    for number, (name, value, source, note) in enumerate(rows):
        lines.append(f"  {name.ljust(widths[0])}  {value.ljust(widths[1])}  {source.ljust(widths[2])}  {note}".rstrip())
        if number == 0:
            lines.append(f"  {'-' * widths[0]}  {'-' * widths[1]}  {'-' * widths[2]}")
    return "\n".join(lines)


def semantic_prior_off(config: ResolvedConfig) -> bool:
    """Whether ``config`` asks for the semantic prior at λ 0: then the prior is not built nor evaluated (no encoder)."""
    return config.prior == "semantic" and config.lam == 0


def prior_off_label(config: ResolvedConfig) -> str:
    """``semantic prior off (calibrated λ 0 on 3 held-out images (bank P))`` or ``semantic prior off (λ 0, explicit)``.

    What a reconstruction with the semantic prior at λ 0 (:func:`semantic_prior_off`) says in place of the prior's
    label, so that a prior a site's calibration switched off is never silent.
    """
    from semrecon_core.config import CALIBRATED

    source = config.source("lam")
    if source.startswith(CALIBRATED):
        return f"semantic prior off (calibrated λ 0 on {source[len(CALIBRATED) :]})"
    return f"semantic prior off (λ 0, {source})"


def lam_note(config: ResolvedConfig) -> str:
    """``λ 0.0016 (preset paper (U-Net + semantic))``: λ and its source, for image comments."""
    return f"λ {config.lam:g} ({config.source('lam')})"


def _format(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_format(v) for v in value)
    return str(value)
