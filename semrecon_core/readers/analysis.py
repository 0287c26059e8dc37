"""``semrecon readers analyze``: the scores of a reader kit as the paper's Figure 4 and its tables.

From the kit's key and score database, per criterion:

- mean ± sd (sample sd, ``ddof=1``) and n of each method's scores, all readers, cases and slices pooled;
- the Wilcoxon signed-rank test between every two methods of a group (study kits: of a backbone), paired by
  (reader, case, slice) — the units both methods were scored on — through
  :func:`semrecon_core.study.tables.wilcoxon_pair` (scipy's ``wilcoxon`` with its defaults; the reason when there
  is no test);
- inter-reader agreement: quadratic-weighted Cohen's κ (scikit-learn's ``cohen_kappa_score`` with labels 1–5) for
  every two readers on the images both scored, per criterion and over all criteria; undefined (and said so) when a
  reader gave one score to everything.

Written atomically into ``OUT`` (default ``KIT/analysis``): ``readers.md``, ``summary.csv`` (mean ± sd rows),
``scores.csv`` (every score with its method and case), ``readers.json`` (all of it) and ``figure4.png`` (mean ± sd
bars per group and method, one panel per criterion, Wilcoxon p above each pair of a two-method group). An
unfinished reading is analysed as far as it goes: every output states each reader's progress.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semrecon_core.readers.kit import load_key, load_kit

SCORE_FIELDS = ("reader", "image", "method", "group", "case", "slice", "criterion", "score", "time")
SUMMARY_FIELDS = ("criterion", "group", "method", "n", "mean", "sd")


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyse` found (also the content of ``readers.json``)."""

    progress: dict[str, dict[str, int]]
    summary: list[dict[str, Any]]
    wilcoxon: list[dict[str, Any]]
    kappa: list[dict[str, Any]]
    scores: list[dict[str, Any]]
    criteria: tuple[dict[str, str], ...]

    @property
    def finished(self) -> bool:
        """Whether every reader has scored every screen."""
        return all(p["screens_done"] == p["screens"] for p in self.progress.values())

    def progress_line(self) -> str:
        """E.g. ``reader A: 6 of 6 screens; reader B: 2 of 6 screens (unfinished)``."""
        parts = [
            f"{name}: {p['screens_done']} of {p['screens']} screens"
            + (" (unfinished)" if p["screens_done"] < p["screens"] else "")
            for name, p in self.progress.items()
        ]
        return "; ".join(parts) if parts else "no reader has scored yet"


def quadratic_kappa(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Quadratic-weighted Cohen's κ of two readers' 1–5 scores (scikit-learn); ``None`` when undefined."""
    import warnings

    try:
        from sklearn.metrics import cohen_kappa_score
    except ImportError:
        raise ImportError("semrecon readers analyze needs scikit-learn (pip install 'semrecon[readers]')") from None
    if len(a) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined κ (one score for everything) is reported as None below
        value = float(cohen_kappa_score(a, b, labels=[1, 2, 3, 4, 5], weights="quadratic"))
    return value if math.isfinite(value) else None


def analyse(folder: str | Path) -> Analysis:
    """The analysis of the kit in ``folder`` (its key and ``scores.sqlite``)."""
    from semrecon_core.readers.app import DATABASE, reader_position
    from semrecon_core.readers.store import ScoreStore
    from semrecon_core.study.tables import wilcoxon_pair

    folder = Path(folder)
    kit, key = load_kit(folder), load_key(folder)
    database = folder / DATABASE
    if not database.is_file():
        raise ValueError(f"{folder}: no scores yet ({DATABASE} is written by 'semrecon readers serve')")
    store = ScoreStore(database)
    images: dict[str, dict[str, Any]] = key["images"]
    criteria = tuple(c["key"] for c in kit.criteria)
    progress = {}
    for reader in store.readers():
        position, screens = reader_position(kit, store, reader)
        scored = store.scored_images(reader)
        progress[reader] = {
            "screens_done": position,
            "screens": len(screens),
            "images_done": sum(set(criteria) <= found for found in scored.values()),
            "images": len(kit.ids),
        }
    rows = []
    for score in store.scores():
        entry = images.get(score.image)
        if entry is None:
            raise ValueError(f"{database}: score of image {score.image}, which the key does not list")
        rows.append(
            {
                "reader": score.reader,
                "image": score.image,
                "method": entry["method"],
                "group": entry["group"],
                "case": entry["case"],
                "slice": int(entry["slice"]),
                "criterion": score.criterion,
                "score": score.score,
                "time": score.time,
            }
        )
    methods = sorted({e["method"] for e in images.values()})
    groups: dict[str, list[str]] = {}
    for method in methods:
        groups.setdefault(method.rpartition("/")[0], []).append(method)

    values: dict[tuple[str, str], dict[tuple[str, str, int], int]] = {}  # (criterion, method) → unit → score
    for row in rows:
        values.setdefault((row["criterion"], row["method"]), {})[(row["reader"], row["case"], row["slice"])] = row[
            "score"
        ]
    summary, tests = [], []
    for criterion in criteria:
        for group, members in groups.items():
            for method in members:
                found = np.array(list(values.get((criterion, method), {}).values()), dtype=float)
                summary.append(
                    {
                        "criterion": criterion,
                        "group": group,
                        "method": method,
                        "n": int(found.size),
                        "mean": float(found.mean()) if found.size else None,
                        "sd": float(found.std(ddof=1)) if found.size > 1 else None,
                    }
                )
            for first, second in itertools.combinations(_ordered(members), 2):
                a, b = values.get((criterion, first), {}), values.get((criterion, second), {})
                units = sorted(set(a) & set(b))
                test = wilcoxon_pair([a[u] for u in units], [b[u] for u in units])
                tests.append({"criterion": criterion, "group": group, "first": first, "second": second, **test})

    kappa = []
    by_reader: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        by_reader.setdefault((row["reader"], row["criterion"]), {})[row["image"]] = row["score"]
    for first, second in itertools.combinations(sorted(progress), 2):
        pooled_a: list[int] = []
        pooled_b: list[int] = []
        for criterion in criteria:
            of_first, of_second = by_reader.get((first, criterion), {}), by_reader.get((second, criterion), {})
            shared = sorted(set(of_first) & set(of_second))
            pooled_a += [of_first[i] for i in shared]
            pooled_b += [of_second[i] for i in shared]
            kappa.append(
                _kappa_row(criterion, first, second, [of_first[i] for i in shared], [of_second[i] for i in shared])
            )
        kappa.append(_kappa_row("all", first, second, pooled_a, pooled_b))
    return Analysis(progress, summary, tests, kappa, rows, kit.criteria)


def _ordered(members: Sequence[str]) -> list[str]:
    """A group's methods, the semantic prior first (so differences read semantic − other), else sorted."""
    return sorted(members, key=lambda m: (m.rpartition("/")[2] != "semantic", m))


def _kappa_row(criterion: str, first: str, second: str, a: list[int], b: list[int]) -> dict[str, Any]:
    value = quadratic_kappa(a, b)
    note = ""
    if value is None:
        note = "fewer than 2 shared images" if len(a) < 2 else "undefined: no variation in the scores"
    return {"criterion": criterion, "readers": [first, second], "n": len(a), "kappa": value, "note": note}


# --------------------------------------------------------------------------------------------- writing
def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(analysis: Analysis) -> str:
    """``readers.md``: progress, mean ± sd, the Wilcoxon tests and κ."""
    titles = {c["key"]: c["title"] for c in analysis.criteria}
    lines = ["# Reader study", ""]
    state = "finished" if analysis.finished else "UNFINISHED: analysed as far as it goes"
    lines += [f"Reading {state}. {analysis.progress_line()}.", ""]
    lines += [
        "## Scores (1–5, 5 best): mean ± sd (n)",
        "",
        "| criterion | group | method | mean ± sd | n |",
        "|---|---|---|---|---|",
    ]
    for row in analysis.summary:
        lines.append(
            f"| {titles.get(row['criterion'], row['criterion'])} | {row['group'] or '–'} | {row['method']} | "
            f"{_number(row['mean'])} ± {_number(row['sd'])} | {row['n']} |"
        )
    lines += [
        "",
        "## Wilcoxon signed-rank test, paired by reader, case and slice",
        "",
        "| criterion | group | first vs second | pairs | median difference | W | p | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for test in analysis.wilcoxon:
        lines.append(
            f"| {titles.get(test['criterion'], test['criterion'])} | {test['group'] or '–'} | {test['first']} vs "
            f"{test['second']} | {test['n']} | {_number(test['median_difference'])} | "
            f"{_number(test['statistic'], 1)} | {_number(test['p'], 4)} | {test['note']} |"
        )
    lines += [
        "",
        "## Inter-reader agreement: quadratic-weighted Cohen's κ",
        "",
        "| criterion | readers | shared images | κ | note |",
        "|---|---|---|---|---|",
    ]
    for row in analysis.kappa:
        criterion = "all criteria" if row["criterion"] == "all" else titles.get(row["criterion"], row["criterion"])
        lines.append(
            f"| {criterion} | {' – '.join(row['readers'])} | {row['n']} | {_number(row['kappa'], 3)} | {row['note']} |"
        )
    return "\n".join(lines) + "\n"


def _csv(fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def figure(analysis: Analysis, path: Path) -> None:
    """The Figure-4-style bar chart: one panel per criterion, groups along x, methods as bars (mean ± sd)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the reader-study figure needs matplotlib (pip install 'semrecon[readers]')") from None
    groups = list(dict.fromkeys(row["group"] for row in analysis.summary))
    names = sorted({row["method"].rpartition("/")[2] for row in analysis.summary})
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        1, len(analysis.criteria), figsize=(3.2 * len(analysis.criteria), 3.6), sharey=True, squeeze=False
    )
    width = 0.8 / max(len(names), 1)
    for axis, criterion in zip(axes[0], analysis.criteria, strict=True):
        for index, name in enumerate(names):
            x, means, sds = [], [], []
            for g, group in enumerate(groups):
                for row in analysis.summary:
                    if (
                        row["criterion"] == criterion["key"]
                        and row["group"] == group
                        and (row["method"].rpartition("/")[2] == name)
                        and row["mean"] is not None
                    ):
                        x.append(g + (index - (len(names) - 1) / 2) * width)
                        means.append(row["mean"])
                        sds.append(row["sd"] or 0.0)
            axis.bar(x, means, width, yerr=sds, capsize=3, color=colours(index % 10), label=name)
        for g, group in enumerate(groups):
            tests = [t for t in analysis.wilcoxon if t["criterion"] == criterion["key"] and t["group"] == group]
            if len(tests) == 1 and tests[0]["p"] is not None:
                p = tests[0]["p"]
                axis.text(g, 5.35, f"p={p:.3g}" + (" *" if p < 0.05 else ""), ha="center", fontsize=8)
        axis.set_xticks(range(len(groups)), [g or "all" for g in groups], rotation=30, ha="right")
        axis.set_ylim(0, 5.8)
        axis.set_yticks([1, 2, 3, 4, 5])
        axis.set_title(criterion["title"], fontsize=9)
    axes[0][0].set_ylabel("Likert score (mean ± sd)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    if not analysis.finished:
        fig.suptitle(f"UNFINISHED READING — {analysis.progress_line()}", fontsize=9, color="#b00")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the staged path ends in .tmp
    plt.close(fig)


def write_analysis(analysis: Analysis, out: str | Path, *, plot: bool = True) -> list[Path]:
    """Write the outputs into ``out`` (created), all committed together; returns their paths."""
    from semrecon_core.data.images import StagedOutputs

    out = Path(out)
    document = {
        "finished": analysis.finished,
        "progress": analysis.progress,
        "summary": analysis.summary,
        "wilcoxon": analysis.wilcoxon,
        "kappa": analysis.kappa,
        "kappa_call": "sklearn.metrics.cohen_kappa_score(a, b, labels=[1, 2, 3, 4, 5], weights='quadratic')",
        "criteria": list(analysis.criteria),
    }
    written = []
    with StagedOutputs() as staged:
        texts = {
            "readers.md": markdown(analysis),
            "summary.csv": _csv(SUMMARY_FIELDS, analysis.summary),
            "scores.csv": _csv(SCORE_FIELDS, analysis.scores),
            "readers.json": json.dumps(document, indent=1) + "\n",
        }
        for name, text in texts.items():
            staged.path(out / name, mkdir=True).write_text(text)
            written.append(out / name)
        if plot:
            figure(analysis, staged.path(out / "figure4.png", mkdir=True))
            written.append(out / "figure4.png")
    return written
