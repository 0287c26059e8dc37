"""Finished study items on disk: one JSON record and one magnitude image per (case, setting).

``DIR/items/<role>/<case>/<setting>-<key>.json`` and ``.npy``. The key hashes everything that determines an
item's numbers — the case's content, the scan options and its seed, the full resolved configuration (with the
bank's content hash instead of its path), what it is scored with, and :data:`FORMAT` — so a rerun with the same
arguments finds every finished item and recomputes nothing, while a changed setting gets new items beside
the old ones. The image is written before the record, each atomically (a temporary file renamed into place):
an item counts as finished only when its record exists, and an interrupted write leaves no partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from semrecon_core.config import ReconConfig
    from semrecon_core.study.cases import Case, ScanOptions
    from semrecon_core.study.grid import Setting
    from semrecon_core.study.scoring import ScoringSpec

log = logging.getLogger(__name__)

FORMAT = "semrecon-study-item/1"


def item_key(
    case: Case,
    setting: Setting,
    config: ReconConfig,
    scan: ScanOptions,
    scoring: ScoringSpec,
    *,
    role: str,
    file_hashes: dict[str, str],
) -> str:
    """A stable hash of everything that determines the item's numbers (see the module docstring)."""
    from semrecon_core.settings import resolve
    from semrecon_core.study.cases import case_seed

    properties = resolve(config).to_properties()
    if config.bank:
        properties["bank"] = "sha256:" + file_hashes[config.bank]
    content = {
        "format": FORMAT,
        "role": role,
        "case": case.name,
        "case_sha256": case.sha256,
        "setting": setting.as_dict(),
        "scan": {**vars(scan), "seed": case_seed(scan.seed, case.name, setting.acceleration)},
        "config": properties,
        "scoring": scoring.key() if role == "test" else "psnr/ssim",
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ItemStore:
    """Reads and writes finished items under ``root`` (``DIR/items``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def paths(self, role: str, case: str, slug: str, key: str) -> tuple[Path, Path]:
        """``(record.json, image.npy)`` of an item."""
        folder = self.root / role / case
        return folder / f"{slug}-{key}.json", folder / f"{slug}-{key}.npy"

    def load(self, role: str, case: str, slug: str, key: str) -> dict[str, Any] | None:
        """The stored record (without its image), or ``None`` when the item is not finished."""
        record_path, _ = self.paths(role, case, slug, key)
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable study record (%s); it will be recomputed", record_path, exc)
            return None
        if record.get("key") != key:
            log.warning("%s: key %s, expected %s; it will be recomputed", record_path, record.get("key"), key)
            return None
        return record

    def image(self, role: str, case: str, slug: str, key: str) -> np.ndarray:
        """The stored magnitude image ``(slices, y, x)`` of an item."""
        _, image_path = self.paths(role, case, slug, key)
        return np.load(image_path, allow_pickle=False)

    def reference_path(self, case: str, acceleration: float) -> Path:
        """Where the reference image of a case's scan at one acceleration is kept."""
        return self.root / "test" / case / f"reference-R{acceleration:g}.npy"

    def reference(self, case: str, acceleration: float) -> np.ndarray | None:
        """The stored reference image ``(slices, y, x)``, or ``None``."""
        path = self.reference_path(case, acceleration)
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def save(self, record: dict[str, Any]) -> dict[str, Any]:
        """Store one worker result (``image`` and ``reference`` go to ``.npy`` files); returns the stored record."""
        from semrecon_core.data.images import atomic_path
        from semrecon_core.study.grid import Setting

        setting = Setting(record["backbone"], record["prior"], record["preset"], record["acceleration"])
        record_path, image_path = self.paths(record["role"], record["case"], setting.slug, record["key"])
        record_path.parent.mkdir(parents=True, exist_ok=True)
        stored = {k: v for k, v in record.items() if k not in ("image", "reference")}
        if record.get("reference") is not None:
            with atomic_path(self.reference_path(record["case"], record["acceleration"])) as temp, temp.open("wb") as f:
                np.save(f, np.asarray(record["reference"], dtype=np.float32))
        with atomic_path(image_path) as temp, temp.open("wb") as handle:
            np.save(handle, np.asarray(record["image"], dtype=np.float32))
        with atomic_path(record_path) as temp:
            temp.write_text(json.dumps(stored, indent=1, sort_keys=True, allow_nan=True) + "\n")
        return stored
