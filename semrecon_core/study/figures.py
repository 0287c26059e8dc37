"""Figures of a study, written into ``DIR/figures/`` (matplotlib; UMAP through umap-learn).

- ``<case>-<preset>-R<R>.png`` (the paper's Figs. 2–3): one column per setting after the reference; rows are
  the image with the zoom window marked, the zoomed crop, and the error map ``|image − reference|`` / the
  reference's maximum on one colour scale. The window is the one where the reference has the most
  structure (largest mean squared gradient), the same for every column.
- ``umap-<preset>-R<R>.png`` (Fig. 5): one panel per bank level: a UMAP (cosine metric, seeded) of the
  bank's P and N, every reconstruction's embedding (colour: prior, marker: backbone), the references, and the
  optimisation trajectory of one case with the semantic prior coloured by iteration; for image-language banks
  the model's answer is written at the trajectory's first, middle and last point. Embeddings are in the
  space the bank compares in (:func:`~semrecon_core.study.scoring.bank_space`).

Each figure states RANDOM WEIGHTS when the semantic encoder has them. A missing package skips the figures
it is needed for, with the reason returned to the caller; a figure never fails the study.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from semrecon_core.study import require

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

ERROR_SCALE = 0.2  # error maps span 0 – 20 % of the reference's maximum
PRIOR_COLOURS = {"none": "tab:gray", "tv": "tab:orange", "semantic": "tab:purple"}
BACKBONE_MARKERS = {"zero-filled": "x", "sense": "s", "unet": "o", "unrolled": "^", "inr": "D"}


def _pyplot() -> Any:
    matplotlib = require("matplotlib", "study figures")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "study figures")


def zoom_window(reference: np.ndarray) -> tuple[int, int, int]:
    """``(top, left, size)`` of the square window (a quarter of the image side) with the most structure."""
    from scipy.ndimage import sobel, uniform_filter

    ny, nx = reference.shape
    size = max(8, min(ny, nx) // 4)
    energy = sobel(reference, axis=0) ** 2 + sobel(reference, axis=1) ** 2
    mean = uniform_filter(energy, size=size, mode="constant")
    half = size // 2
    valid = mean[half : ny - size + half + 1, half : nx - size + half + 1]
    top, left = np.unravel_index(int(np.argmax(valid)), valid.shape)
    return int(top), int(left), size


def _caption(scores: dict[str, Any]) -> str:
    """PSNR / SSIM, and HaarPSI / VIF on a second line when the record has them."""
    text = f"PSNR {scores['psnr']:.2f} / SSIM {scores['ssim']:.3f}"
    if scores.get("haarpsi") is not None and scores.get("vif") is not None:
        text += f"\nHaarPSI {scores['haarpsi']:.3f} / VIF {scores['vif']:.3f}"
    return text


def case_panel(
    path: Path,
    reference: np.ndarray,
    columns: Sequence[tuple[dict[str, Any], np.ndarray]],
    *,
    title: str,
) -> Path:
    """The Figs. 2–3 panel of one case: reference and every setting's image, zoom and error map."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    middle = reference.shape[0] // 2
    ref = reference[middle]
    peak = float(ref.max()) or 1.0
    top, left, size = zoom_window(ref)
    count = len(columns) + 1
    figure, axes = plt.subplots(3, count, figsize=(1.9 * count, 6.2), squeeze=False)
    images = [("reference", ref, "")] + [
        (
            f"{record['backbone']} + {record['prior']}",
            image[middle],
            _caption(record["scores"]),
        )
        for record, image in columns
    ]
    for column, (name, image, scores) in enumerate(images):
        axes[0, column].imshow(image, cmap="gray", vmin=0, vmax=peak)
        axes[0, column].add_patch(Rectangle((left, top), size, size, fill=False, edgecolor="yellow", linewidth=0.8))
        axes[0, column].set_title(f"{name}\n{scores}", fontsize=7)
        axes[1, column].imshow(image[top : top + size, left : left + size], cmap="gray", vmin=0, vmax=peak)
        if column:
            shown = axes[2, column].imshow(
                np.abs(image - ref) / peak, cmap="inferno", vmin=0, vmax=ERROR_SCALE, interpolation="nearest"
            )
        else:
            axes[2, 0].text(
                0.5,
                0.5,
                f"|image − reference| / max\n(0 – {ERROR_SCALE:.0%}) →",
                ha="center",
                va="center",
                fontsize=7,
                transform=axes[2, 0].transAxes,
            )
        for axis in axes[:, column]:
            axis.set_xticks([])
            axis.set_yticks([])
    if len(images) > 1:
        figure.colorbar(shown, ax=axes[2, :].tolist(), fraction=0.02, pad=0.01)
    return _save(figure, path, title, plt)


def umap_panel(
    path: Path,
    *,
    positives: Sequence[np.ndarray],
    negatives: Sequence[np.ndarray],
    records: Sequence[dict[str, Any]],
    trajectory: Sequence[dict[str, Any]],
    level_names: Sequence[str],
    centre: bool,
    seed: int,
    title: str,
) -> Path:
    """The Fig. 5 panel: per level, a UMAP of P, N, the reconstructions, the references and a trajectory.

    Args:
        path: output PNG.
        positives: per level ``(M, D)``.
        negatives: per level ``(M, D)``.
        records: stored items with ``embeddings`` (per level ``(slices, D)``) and ``reference_embedding``.
        trajectory: ``[{"backbone", "points": [{"iteration", "levels", "answer"?}, ...]}, ...]`` of one case.
        level_names: a title per level.
        centre: subtract the P ∪ N mean first (banks compared after centring).
        seed: UMAP's random state.
        title: the figure's title.
    """
    plt = _pyplot()
    umap = require("umap", "the UMAP figure")
    levels = len(positives)
    figure, axes = plt.subplots(1, levels, figsize=(5.2 * levels, 4.8), squeeze=False)
    for level in range(levels):
        axis: Axes = axes[0, level]
        blocks: list[tuple[tuple[str, Any], np.ndarray]] = [(("P", 0), positives[level]), (("N", 0), negatives[level])]
        blocks += [(("recon", i), np.asarray(r["embeddings"][level])) for i, r in enumerate(records)]
        references = {r["case"]: r for r in records}
        blocks += [
            (("reference", case), np.asarray(r["reference_embedding"][level]))
            for case, r in sorted(references.items())
            if r.get("reference_embedding")
        ]
        blocks += [
            (("trajectory", k), np.stack([np.asarray(p["levels"][level]).mean(axis=0) for p in run["points"]]))
            for k, run in enumerate(trajectory)
            if run["points"]
        ]
        blocks = [(name, block.reshape(-1, block.shape[-1])) for name, block in blocks if block.size]
        stacked = np.concatenate([block for _, block in blocks])
        if centre:
            anchor = np.concatenate([positives[level], negatives[level]]).mean(axis=0)
            stacked = stacked - anchor
        if stacked.shape[0] < 5:
            axis.text(0.5, 0.5, f"{stacked.shape[0]} points: too few for a UMAP", ha="center", transform=axis.transAxes)
            continue
        reducer = umap.UMAP(
            n_neighbors=min(15, stacked.shape[0] - 1),
            min_dist=0.1,
            metric="cosine",
            random_state=seed,
            init="random" if stacked.shape[0] < 40 else "spectral",
        )
        points = reducer.fit_transform(stacked)
        located: dict[tuple[str, Any], np.ndarray] = {}
        start = 0
        for name, block in blocks:
            located[name] = points[start : start + block.shape[0]]
            start += block.shape[0]
        _draw_level(axis, located, records, trajectory, plt)
        axis.set_title(level_names[level], fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        figure.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(len(unique), 6), fontsize=7)
    return _save(figure, path, title, plt, layout=(0, 0.08, 1, 0.95))


def _save(figure: Any, path: Path, title: str, plt: Any, *, layout: tuple[float, ...] | None = None) -> Path:
    """Title ``figure`` (red if it says RANDOM WEIGHTS), fit it in ``layout`` if given, save it as PNG, close it."""
    from semrecon_core.data.images import atomic_path

    figure.suptitle(title, fontsize=9, color="red" if "RANDOM WEIGHTS" in title else "black")
    if layout is not None:
        figure.tight_layout(rect=layout)
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=110, format="png")
    plt.close(figure)
    return path


def _draw_level(
    axis: Axes,
    located: dict[tuple[str, Any], np.ndarray],
    records: Sequence[dict[str, Any]],
    trajectory: Sequence[dict[str, Any]],
    plt: Any,
) -> None:
    axis.scatter(
        located["P", 0][:, 0], located["P", 0][:, 1], s=14, c="tab:blue", alpha=0.6, label="P (bank positives)"
    )
    axis.scatter(located["N", 0][:, 0], located["N", 0][:, 1], s=14, c="tab:red", alpha=0.6, label="N (bank negatives)")
    for index, record in enumerate(records):
        xy = located.get(("recon", index))
        if xy is None:
            continue
        axis.scatter(
            xy[:, 0],
            xy[:, 1],
            s=30,
            c=PRIOR_COLOURS.get(record["prior"], "black"),
            marker=BACKBONE_MARKERS.get(record["backbone"], "o"),
            edgecolors="black",
            linewidths=0.3,
            label=f"{record['backbone']} + {record['prior']}",
        )
    for (kind, _), xy in located.items():
        if kind == "reference":
            axis.scatter(
                xy[:, 0], xy[:, 1], s=90, c="gold", marker="*", edgecolors="black", linewidths=0.4, label="reference"
            )
    colours = plt.get_cmap("viridis")
    for k, run in enumerate(trajectory):
        xy = located.get(("trajectory", k))
        if xy is None:
            continue
        iterations = np.array([p["iteration"] for p in run["points"]], dtype=float)
        shade = (iterations - iterations.min()) / max(np.ptp(iterations), 1.0)
        axis.plot(xy[:, 0], xy[:, 1], color="black", linewidth=0.5, alpha=0.5)
        axis.scatter(
            xy[:, 0],
            xy[:, 1],
            s=12,
            c=colours(shade),
            zorder=3,
            label=f"trajectory {run['backbone']} (iteration: dark → yellow)",
        )
        _annotate_answers(axis, xy, run["points"])


def _annotate_answers(axis: Axes, xy: np.ndarray, points: Sequence[dict[str, Any]]) -> None:
    """The model's answer (first slice) at the first, middle and last point of a trajectory that has them."""
    for index in sorted({0, len(points) // 2, len(points) - 1}):
        answers = points[index].get("answer")
        if not answers:
            continue
        first = answers[0]
        choice = first.get("choice", first.get("answer", ""))
        probability = first.get(f"p_{choice}")
        text = f"it {points[index]['iteration']}: {choice}" + ("" if probability is None else f" ({probability:.2f})")
        axis.annotate(text, xy[index], fontsize=6, xytext=(3, 3), textcoords="offset points")


def write_figures(
    out: Path,
    records: Sequence[dict[str, Any]],
    *,
    image_of: Callable[[dict[str, Any]], np.ndarray],
    reference_of: Callable[[str, float], np.ndarray | None],
    banks: dict[str, str],
    trajectory_case: str | None,
    order: Callable[[dict[str, Any]], Any],
    seed: int,
    random_weights: bool,
) -> list[str]:
    """All figures of a study into ``out/figures``; returns notes on figures skipped and why."""
    notes: list[str] = []
    try:
        _pyplot()
    except ImportError as exc:
        return [f"no figures: {exc}"]
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    warning = " — semantic encoder with RANDOM WEIGHTS" if random_weights else ""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["case"], record["preset"], record["acceleration"]), []).append(record)
    for (case, preset, acceleration), members in sorted(groups.items()):
        reference = reference_of(case, acceleration)
        if reference is None:
            notes.append(f"{case} R = {acceleration:g}: no stored reference image, no panel")
            continue
        columns = [(record, image_of(record)) for record in sorted(members, key=order)]
        case_panel(
            folder / f"{case}-{preset}-R{acceleration:g}.png",
            reference,
            columns,
            title=f"{case}, preset {preset}, R = {acceleration:g}{warning}",
        )
    notes += _umap_figures(folder, records, banks, trajectory_case, order, seed, warning)
    return notes


def _umap_figures(
    folder: Path,
    records: Sequence[dict[str, Any]],
    banks: dict[str, str],
    trajectory_case: str | None,
    order: Callable[[dict[str, Any]], Any],
    seed: int,
    warning: str,
) -> list[str]:
    if not banks:
        return ["no UMAP figure: no bank (--bank) to embed with"]
    try:
        require("umap", "the UMAP figure")
    except ImportError as exc:
        return [f"no UMAP figure: {exc}"]
    from semrecon_core.priors.bank import load_bank

    notes: list[str] = []
    for preset, bank_path in sorted(banks.items()):
        bank = load_bank(bank_path)
        positives = [_pooled(p) for p in bank.positives]
        negatives = [_pooled(n) for n in bank.negatives]
        layers = bank.metadata["encoder"].get("layers") or []
        if bank.kind == "language":
            names = ["final LLM state (image-language)"]
        else:
            names = [f"level {k}: vision layer {layers[k] if k < len(layers) else k}" for k in range(len(positives))]
        for acceleration in sorted({r["acceleration"] for r in records if r["preset"] == preset}):
            chosen = sorted(
                (
                    r
                    for r in records
                    if r["preset"] == preset and r["acceleration"] == acceleration and r.get("embeddings")
                ),
                key=order,
            )
            if not chosen:
                notes.append(f"no UMAP figure for {preset} R = {acceleration:g}: no stored embeddings")
                continue
            runs = [
                {"backbone": r["backbone"], "points": r["trajectory"]}
                for r in chosen
                if r["case"] == trajectory_case and r.get("trajectory")
            ]
            umap_panel(
                folder / f"umap-{preset}-R{acceleration:g}.png",
                positives=positives,
                negatives=negatives,
                records=chosen,
                trajectory=runs,
                level_names=names,
                centre=bank.similarity == "centred",
                seed=seed,
                title=f"UMAP of bank P/N and reconstructions, preset {preset}, R = {acceleration:g}; trajectory: "
                f"{trajectory_case}{warning}",
            )
    return notes


def _pooled(tensor: Any) -> np.ndarray:
    return (tensor.mean(dim=1) if tensor.dim() == 3 else tensor).double().numpy()
