"""The study's numbers as files: per-item rows, mean ± sd per setting, and the Wilcoxon test TV vs semantic.

Written into the study folder, each atomically:

- ``results.csv``: one row per (case, setting) with λ and every score at full precision.
- ``results.json``: the same rows, the summary, the Wilcoxon results and the study's description.
- ``table.md``: the paper's Table-1 layout — rows backbone × prior, for each acceleration a group of columns
  (PSNR, SSIM, HaarPSI, VIF, LPIPS, Tenengrad, the embedding distance) holding mean ± sd over cases — then λ per setting
  and the Wilcoxon signed-rank test of semantic vs TV per backbone and metric.

Everything here depends only on the stored items and the study's arguments, never on timings, dates or how
many workers ran, so the same study gives byte-identical tables however it ran. Timings are in
``results.json`` only (``seconds`` of each row).

The Wilcoxon test pairs the per-case values of the semantic and the TV setting (same case, preset,
acceleration and backbone) and calls ``scipy.stats.wilcoxon(semantic, tv)`` with its defaults (two-sided,
``zero_method="wilcox"``: zero differences are dropped). Fewer than two pairs, or differences that are all
zero, get no test and say so; with ``m`` non-zero differences the smallest two-sided p-value the exact test can
give is ``2 / 2^m``, stated whenever it exceeds 0.05 (no outcome could then be significant).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from semrecon_core.study.scoring import HIGHER_IS_BETTER, METRICS

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

ROW_FIELDS = (
    "case",
    "preset",
    "acceleration",
    "backbone",
    "prior",
    "lam",
    "lam_source",
    "iterations",
    *METRICS,
    "label",
)
METRIC_TITLES = {
    "psnr": "PSNR (dB) ↑",
    "ssim": "SSIM ↑",
    "haarpsi": "HaarPSI ↑",
    "vif": "VIF ↑",
    "lpips": "LPIPS ↓",
    "tenengrad": "Tenengrad",
    "perceptual": "embedding distance ↓",
}
DIGITS = {
    "psnr": ".2f",
    "ssim": ".4f",
    "haarpsi": ".4f",
    "vif": ".4f",
    "lpips": ".4f",
    "tenengrad": ".4g",
    "perceptual": ".4f",
}
WILCOXON_CALL = "scipy.stats.wilcoxon(semantic, tv): two-sided, zero_method='wilcox' (zero differences dropped)"


@dataclass(frozen=True)
class Layout:
    """Order of the table: presets, accelerations, backbones and priors as the study lists them."""

    presets: tuple[str, ...]
    accelerations: tuple[float, ...]
    backbones: tuple[str, ...]
    priors: tuple[str, ...]

    def row_key(self, row: dict[str, Any]) -> tuple:
        """Deterministic sort key of a row: table order, then case name."""
        return (
            self.presets.index(row["preset"]),
            row["acceleration"],
            self.backbones.index(row["backbone"]),
            self.priors.index(row["prior"]),
            row["case"],
        )


def rows_from_records(records: Sequence[dict[str, Any]], layout: Layout) -> list[dict[str, Any]]:
    """Flat rows (:data:`ROW_FIELDS` plus ``seconds``) of stored item records, in deterministic order."""
    rows = [
        {
            **{name: record[name] for name in ROW_FIELDS if name in record},
            **{metric: record["scores"].get(metric) for metric in METRICS},
            "seconds": record.get("seconds"),
        }
        for record in records
    ]
    return sorted(rows, key=layout.row_key)


def summarise(rows: Sequence[dict[str, Any]], layout: Layout) -> list[dict[str, Any]]:
    """Mean, sd (n − 1) and n of every score per (preset, acceleration, backbone, prior), in table order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["preset"], row["acceleration"], row["backbone"], row["prior"]), []).append(row)
    out = []
    for (preset, acceleration, backbone, prior), members in groups.items():
        entry: dict[str, Any] = {
            "preset": preset,
            "acceleration": acceleration,
            "backbone": backbone,
            "prior": prior,
            "n": len(members),
            "lam": sorted({m["lam"] for m in members}),
        }
        for metric in METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            entry[metric] = (
                {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}
                if values
                else None
            )
            entry[metric + "_n"] = len(values)
        out.append(entry)
    return sorted(out, key=lambda e: layout.row_key({**e, "case": ""}))


def wilcoxon_pair(semantic: Sequence[float], tv: Sequence[float]) -> dict[str, Any]:
    """The Wilcoxon signed-rank test of paired values (see the module docstring); the reason when there is none."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(semantic, float), np.asarray(tv, float)
    differences = x - y
    nonzero = int(np.count_nonzero(differences))
    out: dict[str, Any] = {
        "n": int(x.size),
        "nonzero": nonzero,
        "median_difference": float(np.median(differences)) if x.size else None,
        "statistic": None,
        "p": None,
        "note": "",
    }
    if x.size < 2:
        out["note"] = f"no test: n = {x.size} paired case{'s' if x.size != 1 else ''} (needs at least 2)"
        return out
    if nonzero == 0:
        out["note"] = f"no test: all {x.size} differences are zero"
        return out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test = wilcoxon(x, y)
    out["statistic"] = float(test.statistic)
    out["p"] = float(test.pvalue)
    notes = []
    if nonzero < x.size:
        notes.append(f"{x.size - nonzero} zero difference(s) dropped")
    smallest = 2.0 / 2**nonzero
    if smallest > 0.05:
        notes.append(f"with {nonzero} non-zero differences no p below {smallest:.3g} is possible")
    notes += [str(w.message) for w in caught]
    out["note"] = "; ".join(notes)
    return out


def wilcoxon_tests(rows: Sequence[dict[str, Any]], layout: Layout) -> list[dict[str, Any]]:
    """Semantic vs TV per (preset, acceleration, backbone) and score, paired by case, in table order."""
    values: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["prior"] not in ("tv", "semantic"):
            continue
        for metric in METRICS:
            if row[metric] is not None:
                key = (row["preset"], row["acceleration"], row["backbone"], metric, row["prior"])
                values.setdefault(key, {})[row["case"]] = row[metric]
    out = []
    for preset in layout.presets:
        for acceleration in layout.accelerations:
            for backbone in layout.backbones:
                for metric in METRICS:
                    semantic = values.get((preset, acceleration, backbone, metric, "semantic"))
                    tv = values.get((preset, acceleration, backbone, metric, "tv"))
                    if not semantic or not tv:
                        continue
                    cases = sorted(set(semantic) & set(tv))
                    test = wilcoxon_pair([semantic[c] for c in cases], [tv[c] for c in cases])
                    out.append(
                        {
                            "preset": preset,
                            "acceleration": acceleration,
                            "backbone": backbone,
                            "metric": metric,
                            "cases": cases,
                            **test,
                        }
                    )
    return out


# --------------------------------------------------------------------------------------------- writing
def write_tables(out: Path, records: Sequence[dict[str, Any]], layout: Layout, study: dict[str, Any]) -> dict[str, Any]:
    """Write ``results.csv``, ``results.json`` and ``table.md`` into ``out``; returns what ``results.json`` holds."""
    from semrecon_core.data.images import atomic_path

    rows = rows_from_records(records, layout)
    summary = summarise(rows, layout)
    tests = wilcoxon_tests(rows, layout)
    document = {"study": study, "rows": rows, "summary": summary, "wilcoxon": tests, "wilcoxon_call": WILCOXON_CALL}
    with atomic_path(out / "results.json") as temp:
        temp.write_text(json.dumps(document, indent=1, allow_nan=True) + "\n")
    with atomic_path(out / "results.csv") as temp:
        temp.write_text(csv_text(rows))
    with atomic_path(out / "table.md") as temp:
        temp.write_text(markdown(rows, summary, tests, layout, study))
    return document


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV (no timings); absent scores are empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ROW_FIELDS)
    for row in rows:
        writer.writerow(["" if row.get(name) is None else _plain(row[name]) for name in ROW_FIELDS])
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value


def _cell(entry: dict[str, Any] | None, metric: str, bold: bool) -> str:
    if entry is None:
        return "–"
    value = entry[metric]
    if value is None:
        return "n/a"
    digits = DIGITS[metric]
    text = format(value["mean"], digits)
    if value["sd"] is not None:
        text += " ± " + format(value["sd"], digits)
    return f"**{text}**" if bold else text


def _best(entries: dict[str, dict[str, Any]], metric: str) -> str | None:
    direction = HIGHER_IS_BETTER[metric]
    scored = {prior: e[metric]["mean"] for prior, e in entries.items() if e.get(metric) is not None}
    if direction is None or len(scored) < 2:
        return None
    best = max(scored.values()) if direction else min(scored.values())
    winners = [prior for prior, value in scored.items() if value == best]
    return winners[0] if len(winners) == 1 else None


def markdown(
    rows: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    tests: Sequence[dict[str, Any]],
    layout: Layout,
    study: dict[str, Any],
) -> str:
    """``table.md``: the description, Table 1 per preset, λ per setting, the Wilcoxon tests, what was left out."""
    lines = ["# semrecon study", ""]
    lines += _description(study)
    metrics = list(METRICS)  # absent scores stay as columns that say n/a, with the reason below the table
    index = {(e["preset"], e["acceleration"], e["backbone"], e["prior"]): e for e in summary}
    cases = sorted({row["case"] for row in rows})
    for preset in layout.presets:
        lines += [
            "",
            f"## Table 1 — preset `{preset}`: mean ± sd over cases (n = {len(cases)}); best prior per backbone in bold",
            "",
        ]
        header = ["backbone", "prior"]
        for acceleration in layout.accelerations:
            header += [
                f"R = {acceleration:g}: {METRIC_TITLES[m]}" if k == 0 else METRIC_TITLES[m]
                for k, m in enumerate(metrics)
            ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for backbone in layout.backbones:
            for prior in layout.priors:
                if not any((preset, r, backbone, prior) in index for r in layout.accelerations):
                    continue
                cells = [backbone, prior]
                for acceleration in layout.accelerations:
                    group = {
                        p: index[(preset, acceleration, backbone, p)]
                        for p in layout.priors
                        if (preset, acceleration, backbone, p) in index
                    }
                    entry = group.get(prior)
                    cells += [_cell(entry, m, _best(group, m) == prior) for m in metrics]
                lines.append("| " + " | ".join(cells) + " |")
        counts = sorted({e["n"] for e in summary if e["preset"] == preset})
        if counts and counts != [len(cases)]:
            lines += ["", f"Settings have n = {', '.join(map(str, counts))} cases (some cases lack an acceleration)."]
    lines += ["", "Scores:", ""]
    lines += [f"- {line}" for line in _score_notes(study)]
    lines += _lam_table(summary, study)
    lines += _wilcoxon_table(tests)
    if study.get("skipped"):
        lines += ["", "## Left out", ""] + [f"- {reason}" for reason in study["skipped"]]
    return "\n".join(lines) + "\n"


def _description(study: dict[str, Any]) -> list[str]:
    scan = study["scan"]
    lines = [
        f"Cases ({len(study['cases'])}): " + ", ".join(f"`{c['name']}`" for c in study["cases"]) + ".",
        (
            f"Scans: magnitude images simulated with {scan['coils']} birdcage coils (noise {scan['noise']:g}); "
            f"fully sampled raw data undersampled retrospectively; mask `{scan['mask']}` with {scan['acs']} "
            f"ACS lines; study seed {scan['seed']}."
        ),
        (
            f"Deep backbones: {study['deep'] or 'the paper sizes and iterations'}; "
            f"CPU threads per reconstruction: {study['threads']}; device `{study['device']}`."
        ),
    ]
    for preset, bank in sorted(study.get("banks", {}).items()):
        lines.append(f"Bank ({preset}): `{bank['path']}` — {bank['description']}.")
    labels = sorted(set(study.get("semantic_labels", [])))
    lines += [f"Semantic prior: {label}." for label in labels]
    if any("RANDOM WEIGHTS" in label for label in labels):
        lines.append("**The semantic encoder has RANDOM WEIGHTS: these semantic results test the pipeline only.**")
    for warning in study.get("warnings", []):
        lines.append(f"**Warning:** {warning}")
    if study.get("tuning"):
        tuning = study["tuning"]
        priors = " and ".join({"tv": "TV", "semantic": "semantic"}[p] for p in tuning.get("priors", ("tv", "semantic")))
        where = ""
        if tuning.get("accelerations") is not None:
            where = f" at R = {', '.join(f'{r:g}' for r in tuning['accelerations'])} (other R: the nearest tuned R's λ)"
        lines.append(
            f"λ of {priors} settings chosen on the tuning case `{tuning['case']}` (not a test case){where} by "
            f"{tuning['metric'].upper()} over λ × {{{', '.join(f'{g:g}' for g in tuning['grid'])}}} "
            "(× the preset's default λ or the --lam value); other λ as listed below."
        )
    return lines


def _score_notes(study: dict[str, Any]) -> list[str]:
    scoring = study["scoring"]
    lpips = "computed." if not scoring["lpips_reason"] else f"unavailable — {scoring['lpips_reason']}"
    return [
        (
            "PSNR, SSIM, HaarPSI (Reisenhofer et al. 2018) and VIF in the pixel domain (Sheikh & Bovik 2006) "
            "against the reference, both divided by the reference's maximum (data range 1; HaarPSI and VIF clamp "
            "the reconstruction into [0, 1]); "
            "Tenengrad: mean squared Sobel gradient of the reconstruction / its maximum (sharpness, higher is not "
            "necessarily better)."
        ),
        f"LPIPS (AlexNet): {lpips}",
        "Embedding distance: " + scoring["perceptual_label"] + ".",
    ]


def _lam_table(summary: Sequence[dict[str, Any]], study: dict[str, Any]) -> list[str]:
    sources = study.get("lam_sources", {})
    lines = [
        "",
        "## λ per setting",
        "",
        "| preset | R | backbone | prior | λ | chosen by |",
        "|---|---|---|---|---|---|",
    ]
    for entry in summary:
        if entry["prior"] == "none" and entry["backbone"] != "sense":
            continue
        slug = f"{entry['backbone']}-{entry['prior']}-{entry['preset']}-R{entry['acceleration']:g}"
        lams = ", ".join(f"{lam:g}" for lam in entry["lam"])
        lines.append(
            f"| {entry['preset']} | {entry['acceleration']:g} | {entry['backbone']} | {entry['prior']} | {lams} | "
            f"{sources.get(slug, '')} |"
        )
    return lines


def _wilcoxon_table(tests: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["", "## Wilcoxon signed-rank test: semantic vs TV, paired by case", ""]
    if not tests:
        return [*lines, "No backbone has both a TV and a semantic setting with scores: no test."]
    lines += [
        f"`{WILCOXON_CALL}`; difference = semantic − TV (positive: semantic higher).",
        "",
        "| preset | R | backbone | metric | n | median difference | W | p | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for test in tests:
        digits = DIGITS[test["metric"]]
        median = "–" if test["median_difference"] is None else format(test["median_difference"], digits)
        statistic = "–" if test["statistic"] is None else f"{test['statistic']:g}"
        p = "–" if test["p"] is None else _p_value(test["p"])
        lines.append(
            f"| {test['preset']} | {test['acceleration']:g} | {test['backbone']} | {test['metric']} | {test['n']} | "
            f"{median} | {statistic} | {p} | {test['note']} |"
        )
    return lines


def _p_value(p: float) -> str:
    if math.isnan(p):
        return "nan"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.2e}"
