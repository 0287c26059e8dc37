"""The order of a study: plan the grid, choose λ on the tuning case, run what is not stored, write it up.

:func:`run_study` is what ``semrecon study`` calls:

1. find the cases (and the tuning case, which must not be one of them, not even under another name);
2. build the grid and check it before anything runs (banks for the semantic prior, their similarity);
3. with ``tune_on``: reconstruct the tuning case with every TV and semantic setting (or those of
   ``tune_priors``, at the accelerations ``tune_accelerations``) at λ × each grid factor and keep, per setting,
   the λ with the best PSNR (or SSIM) on that case — the test cases are never looked at — recorded in
   ``tuning.json`` and the tables; a setting at an acceleration that was not tuned takes the λ tuned at the
   nearest tuned acceleration (the lower one on a tie);
4. reconstruct and score every (case, setting) whose result is not stored yet: one task per case,
   acceleration and preset, serially in this process or on Ray workers, each result stored as it arrives,
   with a progress bar and an ETA;
5. write the tables from the stored results, sorted in table order (so the tables are the same however the
   work was spread), then the figures and ``study.json`` (arguments, provenance, timings, what was reused).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semrecon_core.settings import resolve
from semrecon_core.study.cases import Case, ScanOptions, check_case, discover, file_sha256
from semrecon_core.study.grid import DEEP_BACKBONES, Grid, Setting, check_bank_similarity
from semrecon_core.study.scoring import ScoringSpec, lpips_unavailable
from semrecon_core.study.store import ItemStore, item_key
from semrecon_core.study.tables import Layout, write_tables
from semrecon_core.study.tasks import Item, Task, run_task

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from semrecon_core.config import ReconConfig

log = logging.getLogger(__name__)

GRID_FIELDS = ("backbone", "prior", "preset", "bank", "lam")
"""Configuration fields the grid sets; ``--set`` may not."""
TUNE_METRICS = ("psnr", "ssim")


@dataclass(frozen=True)
class StudyOptions:
    """Everything ``semrecon study`` was asked (see ``semrecon study --help`` for each option)."""

    cases: tuple[str, ...]
    out: Path
    backbones: tuple[str, ...] = ("sense", "unet", "unrolled", "inr")
    priors: tuple[str, ...] | None = None
    presets: tuple[str, ...] = ("paper",)
    accelerations: tuple[float, ...] = (4.0,)
    banks: dict[str, str] = field(default_factory=dict)
    encoder: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    lams: dict[tuple[str | None, str], float] = field(default_factory=dict)
    iterations: int | None = None
    width: int | None = None
    depth: int | None = None
    per_backbone: dict[str, dict[str, int]] = field(default_factory=dict)
    seed: int = 0
    scan: ScanOptions = field(default_factory=ScanOptions)
    tune_on: str | None = None
    tune_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    tune_metric: str = "psnr"
    tune_priors: tuple[str, ...] = ("tv", "semantic")
    tune_accelerations: tuple[float, ...] | None = None
    workers: int = 1
    address: str | None = None
    gpus_per_worker: float | None = None
    threads: int = 1
    device: str = "auto"
    perceptual: str = "auto"
    lpips_weights: str | None = None
    trajectory_case: str | None = None
    figures: bool = True
    progress: bool = True


@dataclass
class StudyOutcome:
    """What a run did: items computed and reused, the stored records, the tables' content, notes."""

    out: Path
    computed: int
    reused: int
    records: list[dict[str, Any]]
    document: dict[str, Any]
    notes: list[str]
    tuning: dict[str, Any] | None = None


def check_options(options: StudyOptions) -> None:
    """Refuse arguments that cannot make a study, naming the option (a ``ValueError``: exit status 2)."""
    if options.workers < 1:
        raise ValueError(f"--workers: expected at least 1, found {options.workers}")
    if options.threads < 1:
        raise ValueError(f"--threads: expected at least 1, found {options.threads}")
    if options.gpus_per_worker is not None and options.gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker: expected >= 0, found {options.gpus_per_worker}")
    for name in ("iterations", "width", "depth"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}: expected a positive integer, found {value}")
    if options.tune_metric not in TUNE_METRICS:
        raise ValueError(f"--tune-metric: expected one of {', '.join(TUNE_METRICS)}, found {options.tune_metric!r}")
    for backbone, fields in options.per_backbone.items():
        for name, value in fields.items():
            if value < 1:
                raise ValueError(f"--{name} {backbone}={value}: expected a positive integer")
    unknown = [p for p in options.tune_priors if p not in ("tv", "semantic")]
    if unknown or not options.tune_priors:
        raise ValueError(
            f"--tune-priors: expected some of tv, semantic, found {', '.join(options.tune_priors) or 'none'}"
        )
    if options.tune_accelerations is not None:
        missing = [r for r in options.tune_accelerations if r not in options.accelerations]
        if missing or not options.tune_accelerations:
            raise ValueError(
                f"--tune-accelerations: {', '.join(f'{r:g}' for r in missing) or 'none'} not among --accelerations "
                f"({', '.join(f'{r:g}' for r in options.accelerations)})"
            )
    if not options.tune_grid or any(not g > 0 for g in options.tune_grid):
        raise ValueError(f"--tune-grid: expected positive factors, found {options.tune_grid}")
    if options.scan.coils < 1:
        raise ValueError(f"--coils: expected at least 1, found {options.scan.coils}")
    if options.scan.acs < 8:
        raise ValueError(f"--acs: expected at least 8 calibration lines (ESPIRiT), found {options.scan.acs}")
    fixed = sorted(name for name in options.properties if name.strip().replace("-", "_") in GRID_FIELDS)
    if fixed:
        raise ValueError(
            f"--set {', '.join(fixed)}: set by the study's grid; use --backbones, --priors, --presets, --bank, --lam"
        )
    for bank in options.banks.values():
        if not Path(bank).is_file():
            raise FileNotFoundError(f"--bank {bank}: no such file")


def base_config(options: StudyOptions) -> ReconConfig:
    """The configuration every setting starts from: ``--set`` first, then device, seed, ACS and encoder."""
    from semrecon_core.config import ReconConfig

    config = ReconConfig.from_properties(options.properties)
    encoder = options.encoder
    if encoder is None and "encoder" not in options.properties and options.banks:
        from semrecon_core.priors.bank import read_metadata

        encoder = read_metadata(sorted(options.banks.values())[0])["encoder"].get("model")
    changes: dict[str, Any] = {"device": options.device, "seed": options.seed, "calib_width": options.scan.acs}
    if encoder:
        changes["encoder"] = str(encoder)
    return config.replace(**changes)


class Study:
    """One study: its cases, grid, store and scoring (built and checked on construction)."""

    def __init__(self, options: StudyOptions) -> None:
        check_options(options)
        self.options = options
        self.out = Path(options.out)
        self.cases = discover(options.cases)
        self.tuning_case = self._tuning_case()
        priors = options.priors or (("none", "tv", "semantic") if options.banks else ("none", "tv"))
        deep = {"iterations": options.iterations, "width": options.width, "depth": options.depth}
        self.grid = Grid(
            base=base_config(options),
            backbones=options.backbones,
            priors=priors,
            presets=options.presets,
            accelerations=options.accelerations,
            banks={p: b for p, b in options.banks.items() if p in options.presets},
            lams=options.lams,
            deep={k: v for k, v in deep.items() if v is not None},
            per_backbone={b: dict(f) for b, f in options.per_backbone.items()},
        )
        if "semantic" in self.grid.priors:
            check_bank_similarity(self.grid)
        for case in [*self.cases, *([self.tuning_case] if self.tuning_case else [])]:
            check_case(case, self.grid.accelerations, options.scan)
        self.bank_hashes = {path: file_sha256(Path(path)) for path in self.grid.banks.values()}
        names = [case.name for case in self.cases]
        if options.trajectory_case is not None and options.trajectory_case not in names:
            raise ValueError(
                f"--trajectory-case {options.trajectory_case}: not a case of this study ({', '.join(names)})"
            )
        self.trajectory_case = options.trajectory_case or names[0]
        self.store = ItemStore(self.out / "items")
        if options.perceptual not in ("auto", "none"):
            from semrecon_core.encoders.loading import resolve_checkpoint

            resolve_checkpoint(options.perceptual)  # a missing network is named now, not after hours of work
        self.lpips_reason = lpips_unavailable(options.lpips_weights)
        self.scoring = {preset: self._scoring(preset) for preset in self.grid.presets}
        self.tuned: dict[Setting, float] = {}
        self.lam_sources: dict[str, str] = {}
        self.notes: list[str] = []
        self.computed = 0
        self.reused = 0
        self._pool: Any = None  # the Ray actors, started on first use and kept for tuning and the grid

    def _tuning_case(self) -> Case | None:
        if self.options.tune_on is None:
            return None
        found = discover([self.options.tune_on])
        if len(found) != 1:
            raise ValueError(f"--tune-on {self.options.tune_on}: expected one case file, found {len(found)}")
        tuning = found[0]
        for case in self.cases:
            if case.path == tuning.path or case.sha256 == tuning.sha256:
                raise ValueError(
                    f"--tune-on {self.options.tune_on}: the tuning case is also a test case ({case.path}); "
                    "λ must be chosen on a separate case"
                )
        return tuning

    def _scoring(self, preset: str) -> ScoringSpec:
        semantic = None
        if preset in self.grid.banks:
            semantic = self.grid.config(Setting("unet", "semantic", preset, self.grid.accelerations[0]))
        return ScoringSpec(
            lpips_weights=self.options.lpips_weights,
            lpips_reason=self.lpips_reason,
            perceptual=self.options.perceptual,
            semantic=semantic,
            device=self.grid.base.device,
        )

    # ------------------------------------------------------------------------------------------- items
    def _item(self, case: Case, setting: Setting, *, role: str, lam: float | None, lam_source: str) -> Item:
        config = self.grid.config(setting, lam)
        scoring = self.scoring[setting.preset]
        key = item_key(case, setting, config, self.options.scan, scoring, role=role, file_hashes=self.bank_hashes)
        return Item(key=key, setting=setting, config=config, lam_source=lam_source)

    def _tasks(self, case: Case, items: Sequence[Item], *, role: str, chunks: int = 1) -> list[Task]:
        """Tasks of one case: one per (acceleration, preset), split into ``chunks`` where there are enough items."""
        groups: dict[tuple[float, str], list[Item]] = {}
        for item in items:
            groups.setdefault((item.setting.acceleration, item.setting.preset), []).append(item)
        tasks = []
        for (acceleration, preset), members in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1])):
            scoring = self.scoring[preset]
            if role == "tuning":
                scoring = ScoringSpec(lpips_reason="not scored while tuning", perceptual="none", device=scoring.device)
            parts = [members[k::chunks] for k in range(chunks)] if chunks > 1 else [members]
            tasks += [
                Task(
                    case=case,
                    acceleration=acceleration,
                    scan=self.options.scan,
                    items=tuple(part),
                    scoring=scoring,
                    trajectory=role == "test" and case.name == self.trajectory_case,
                    threads=self.options.threads,
                    role=role,
                )
                for part in parts
                if part
            ]
        return tasks

    def _run(self, tasks: Sequence[Task], description: str, on_item: Callable[[dict[str, Any]], None]) -> None:
        """Run ``tasks`` serially or on Ray with one progress bar (items done, ETA)."""
        from tqdm.auto import tqdm

        total = sum(len(task.items) for task in tasks)
        if total == 0:
            return
        with tqdm(
            total=total, desc=description, unit="item", disable=not self.options.progress, file=sys.stderr
        ) as bar:

            def done(record: dict[str, Any]) -> None:
                on_item(record)
                bar.update(1)

            if self.options.workers == 1:
                for task in tasks:
                    for record in run_task(task):
                        done(record)
            else:
                if self._pool is None:
                    from semrecon_core.study.parallel import RayPool

                    pool = RayPool(
                        self.options.workers,
                        address=self.options.address,
                        threads=self.options.threads,
                        gpus=self._gpus(),
                    )
                    self._pool = pool.__enter__()
                self._pool.run(tasks, done)

    def _gpus(self) -> float:
        if self.options.gpus_per_worker is not None:
            return self.options.gpus_per_worker
        device = self.grid.base.device
        if device.startswith("cuda"):
            return 1.0
        if device == "auto":
            import torch

            return 1.0 if torch.cuda.is_available() else 0.0
        return 0.0

    # ------------------------------------------------------------------------------------------- store
    def _stored(
        self, role: str, items: Sequence[tuple[Case, Item]]
    ) -> tuple[dict[str, dict[str, Any]], list[tuple[Case, Item]]]:
        """The records of ``items`` already in the store, by key (counted as reused), and the items still to run."""
        records: dict[str, dict[str, Any]] = {}
        missing: list[tuple[Case, Item]] = []
        for case, item in items:
            stored = self.store.load(role, case.name, item.setting.slug, item.key)
            if stored is None:
                missing.append((case, item))
            else:
                records[item.key] = stored
        self.reused += len(records)
        return records, missing

    def _keeper(self, records: dict[str, dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
        """The callback for computed records: save one, file it in ``records`` by key and count it."""

        def keep(record: dict[str, Any]) -> None:
            records[record["key"]] = self.store.save(record)
            self.computed += 1

        return keep

    # ------------------------------------------------------------------------------------------- tuning
    def tune(self) -> dict[str, Any] | None:
        """Choose λ of the TV and semantic settings on the tuning case; ``None`` without one."""
        case = self.tuning_case
        if case is None:
            return None
        metric = self.options.tune_metric
        tuned_accelerations = self.options.tune_accelerations or self.grid.accelerations
        candidates: dict[Setting, list[tuple[float, Item]]] = {}
        for setting in self.grid.settings():
            if setting.prior not in self.options.tune_priors or setting.acceleration not in tuned_accelerations:
                continue
            base = self.grid.default_lam(setting)
            candidates[setting] = [
                (base * factor, self._item(case, setting, role="tuning", lam=base * factor, lam_source="tuning"))
                for factor in self.options.tune_grid
            ]
        tried = [(case, item) for entries in candidates.values() for _, item in entries]
        records, missing = self._stored("tuning", tried)
        pending = [item for _, item in missing]
        tasks = self._tasks(case, pending, role="tuning", chunks=self.options.workers)
        self._run(tasks, "tuning λ", self._keeper(records))
        chosen = []
        for setting, entries in candidates.items():
            scores = [(lam, records[item.key]["scores"][metric]) for lam, item in entries]
            best_lam, best_score = max(scores, key=lambda pair: pair[1])  # first of equals: grid order
            self.tuned[setting] = best_lam
            self.lam_sources[setting.slug] = (
                f"tuned on `{case.name}` at R = {setting.acceleration:g} ({metric.upper()} {best_score:.4g})"
            )
            chosen.append(
                {
                    **setting.as_dict(),
                    "lam": best_lam,
                    "candidates": [{"lam": lam, metric: score} for lam, score in scores],
                }
            )
        for setting in self.grid.settings():
            if setting in self.tuned or setting.prior not in self.options.tune_priors:
                continue
            nearest = min(tuned_accelerations, key=lambda r: (abs(r - setting.acceleration), r))
            source = Setting(setting.backbone, setting.prior, setting.preset, nearest)
            self.tuned[setting] = self.tuned[source]
            self.lam_sources[setting.slug] = f"{self.lam_sources[source.slug]}, applied at R = {setting.acceleration:g}"
        tuning = {
            "case": case.name,
            "path": str(case.path),
            "sha256": case.sha256,
            "metric": metric,
            "grid": list(self.options.tune_grid),
            "priors": list(self.options.tune_priors),
            "accelerations": list(tuned_accelerations),
            "settings": chosen,
        }
        from semrecon_core.data.images import atomic_path

        with atomic_path(self.out / "tuning.json") as temp:
            temp.write_text(json.dumps(tuning, indent=1) + "\n")
        return tuning

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> StudyOutcome:
        """Tune, run the grid, write tables and figures (Ray, when it was started, is shut down after)."""
        try:
            return self._run_all()
        finally:
            if self._pool is not None:
                self._pool.__exit__(None, None, None)
                self._pool = None

    def _run_all(self) -> StudyOutcome:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.computed = 0
        self.reused = 0
        tuning = self.tune()
        items: list[tuple[Case, Item]] = []
        defaults: dict[str, str] = {}  # where each untuned setting's λ comes from
        for case in self.cases:
            for setting in self.grid.settings():
                lam = self.tuned.get(setting)
                if lam is not None:
                    source = self.lam_sources[setting.slug]
                elif self.grid.given_lam(setting) is not None:
                    source = "--lam"
                else:  # the preset table's, or a λ the bank recommends (settings.resolve)
                    if setting.slug not in defaults:
                        origin = resolve(self.grid.config(setting)).source("lam")
                        defaults[setting.slug] = origin if origin.startswith("bank ") else "preset default"
                    source = defaults[setting.slug]
                self.lam_sources.setdefault(setting.slug, source)
                items.append((case, self._item(case, setting, role="test", lam=lam, lam_source=source)))
        records, missing = self._stored("test", items)
        pending: dict[str, list[Item]] = {}
        for case, item in missing:
            pending.setdefault(case.name, []).append(item)
        tasks = [task for case in self.cases for task in self._tasks(case, pending.get(case.name, []), role="test")]
        self._run(tasks, "study", self._keeper(records))
        finished = [records[item.key] for _, item in items]
        layout = Layout(self.grid.presets, self.grid.accelerations, self.grid.backbones, self.grid.priors)
        study = self.describe(finished, tuning)
        document = write_tables(self.out, finished, layout, study)
        if self.options.figures:
            self.notes += self.figures(finished, layout)
        self.write_run(started, tuning)
        return StudyOutcome(self.out, self.computed, self.reused, finished, document, self.notes, tuning)

    def describe(self, records: Sequence[dict[str, Any]], tuning: dict[str, Any] | None) -> dict[str, Any]:
        """The study's deterministic description (what the tables state): cases, scans, grid, banks, scoring."""
        from semrecon_core.priors.bank import read_metadata

        banks = {}
        warnings = []
        case_hashes = {case.sha256: case.name for case in self.cases}
        for preset, path in sorted(self.grid.banks.items()):
            metadata = read_metadata(path)
            sources = metadata.get("sources") or []
            roles: dict[str, int] = {}
            for source in sources:
                roles[str(source.get("role", "?"))] = roles.get(str(source.get("role", "?")), 0) + 1
            encoder = metadata["encoder"]
            random = " RANDOM WEIGHTS" if encoder.get("random_weights") else ""
            banks[preset] = {
                "path": Path(path).name,
                "sha256": self.bank_hashes[path],
                "description": (
                    f"{metadata['similarity']} {encoder.get('kind')} bank of {encoder.get('model')}{random}, "
                    + (", ".join(f"{n} {role}" for role, n in sorted(roles.items())) or "sources not recorded")
                ),
            }
            warnings += [
                f"case `{case_hashes[source['sha256']]}` is among the sources of bank {Path(path).name}"
                for source in sources
                if source.get("sha256") in case_hashes
            ]
        scoring = self.scoring[self.grid.presets[0]]
        labels = sorted({r["perceptual_label"] for r in records}) or ["not computed"]
        deep = self.grid.describe_deep()
        return {
            "cases": [{"name": c.name, "sha256": c.sha256} for c in self.cases],
            "scan": vars(self.options.scan),
            "grid": {
                "backbones": list(self.grid.backbones),
                "priors": list(self.grid.priors),
                "presets": list(self.grid.presets),
                "accelerations": list(self.grid.accelerations),
            },
            "deep": deep,
            "threads": self.options.threads,
            "device": self.grid.base.device,
            "base_config": self.grid.base.to_properties() | {"encoder": Path(self.grid.base.encoder).name},
            "banks": banks,
            "semantic_labels": sorted({r["label"] for r in records if r["prior"] == "semantic"}),
            "warnings": sorted(set(warnings)),
            "scoring": {"lpips_reason": scoring.lpips_reason, "perceptual_label": " / ".join(labels)},
            "lam_sources": dict(sorted(self.lam_sources.items())),
            "tuning": None
            if tuning is None
            else {k: tuning[k] for k in ("case", "metric", "grid", "priors", "accelerations")},
            "skipped": self.grid.skipped,
        }

    def figures(self, records: Sequence[dict[str, Any]], layout: Layout) -> list[str]:
        """The figures (per-case panels, UMAP); returns notes on what was skipped."""
        from semrecon_core.study.figures import write_figures

        def image_of(record: dict[str, Any]) -> Any:
            setting = Setting(record["backbone"], record["prior"], record["preset"], record["acceleration"])
            return self.store.image("test", record["case"], setting.slug, record["key"])

        try:
            return write_figures(
                self.out,
                records,
                image_of=image_of,
                reference_of=self.store.reference,
                banks=dict(self.grid.banks),
                trajectory_case=self.trajectory_case,
                order=lambda r: layout.row_key(r),
                seed=self.options.seed,
                random_weights=any("RANDOM WEIGHTS" in r["label"] for r in records if r["prior"] == "semantic"),
            )
        except (ImportError, ValueError, OSError) as exc:
            log.warning("study figures failed: %s", exc)
            return [f"figures failed: {exc}"]

    def write_run(self, started: float, tuning: dict[str, Any] | None) -> None:
        """``study.json``: the arguments, the cases with paths, this run's counts, timings and notes."""
        import platform

        from semrecon_core import __version__
        from semrecon_core.data.images import atomic_path

        options = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(self.options).items()
            if k not in ("scan", "lams", "banks", "per_backbone")
        }
        run = {
            "semrecon": __version__,
            "python": platform.python_version(),
            "options": options,
            "scan": vars(self.options.scan),
            "banks": dict(self.grid.banks),
            "lams": {f"{b or '*'}:{p}": v for (b, p), v in self.options.lams.items()},
            "per_backbone": self.options.per_backbone,
            "cases": [{"name": c.name, "path": str(c.path), "kind": c.kind, "sha256": c.sha256} for c in self.cases],
            "computed": self.computed,
            "reused": self.reused,
            "seconds": time.perf_counter() - started,
            "notes": self.notes,
            "deep_backbones": [b for b in self.grid.backbones if b in DEEP_BACKBONES],
        }
        with atomic_path(self.out / "study.json") as temp:
            temp.write_text(json.dumps(run, indent=1, default=str) + "\n")


def run_study(options: StudyOptions) -> StudyOutcome:
    """Run (or resume) a study; see the module docstring."""
    return Study(options).run()
