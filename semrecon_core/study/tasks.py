"""One unit of study work: a case at one acceleration, reconstructed with a list of settings.

:func:`run_task` is the same code in the serial path and on a Ray worker (:mod:`semrecon_core.study.parallel`):
it builds the case's undersampled scan, estimates the coil maps once (ESPIRiT with the study's calibration
width) and shares them among the settings, so settings differ only in their configuration; then it
reconstructs each setting through the :class:`~semrecon_core.pipeline.Pipeline` and scores it. Results are
yielded one item at a time so that the serial path stores each as soon as it is done.

Reproducibility: every configuration carries the study seed (the pipeline seeds torch with it before each
reconstruction), the scan's seed derives from the case name, and the CPU thread count is fixed for the task
(``threads``): torch's CPU kernels split reductions by thread, so the same seed gives the same pixels only at
the same thread count, whichever process runs the task.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from semrecon_core.study.cases import Case, ScanOptions, load_scan
from semrecon_core.study.scoring import Scorer, ScoringSpec, bank_space

if TYPE_CHECKING:
    from collections.abc import Iterator

    from semrecon_core.config import ReconConfig
    from semrecon_core.solvers.status import SolverStatus
    from semrecon_core.study.grid import Setting

log = logging.getLogger(__name__)

TRACE_KEYS_DROPPED = ("embedding",)
"""Trace entries not stored with a result (the trajectory keeps the embeddings it needs, per level)."""


@dataclass(frozen=True)
class Item:
    """One (case, setting) to compute: its key in the store, the setting and its configuration."""

    key: str
    setting: Setting
    config: ReconConfig
    lam_source: str


@dataclass(frozen=True)
class Task:
    """A case at one acceleration with the items to compute for it (picklable).

    Attributes:
        case: the case.
        acceleration: R of its scan.
        scan: how cases become scans.
        items: what to reconstruct.
        scoring: what to score with.
        trajectory: record the semantic fits' trajectories (embeddings per level at each flush).
        threads: CPU threads of torch (and of NumPy's BLAS where threadpoolctl is installed) for this task.
        role: ``test`` or ``tuning``.
    """

    case: Case
    acceleration: float
    scan: ScanOptions
    items: tuple[Item, ...]
    scoring: ScoringSpec
    trajectory: bool = False
    threads: int = 1
    role: str = "test"


@contextlib.contextmanager
def thread_limits(threads: int) -> Iterator[None]:
    """Fix torch's (and, with threadpoolctl, BLAS's) CPU threads inside the block; restore them after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        try:
            threadpoolctl = importlib.import_module("threadpoolctl")
        except ImportError:
            pass
        else:
            stack.enter_context(threadpoolctl.threadpool_limits(limits=threads))
        try:
            yield
        finally:
            torch.set_num_threads(previous)


class TrajectoryRecorder:
    """A solver callback keeping, at each flush of the Adam loop, the iterate's embeddings in the bank's space.

    With an image-language bank each point also keeps the model's answer, which the Fig. 5 panel writes: inside
    ``with recorder:`` the prior's ``trace_answers`` is on (a prompt pass and a greedy decode per flush); it is
    restored on leaving, since priors are shared by every item a worker runs.
    """

    def __init__(self, prior: Any) -> None:
        self.prior = prior
        self.points: list[dict[str, Any]] = []
        self._previous = False

    def __enter__(self) -> TrajectoryRecorder:
        """Turn the prior's answers along the trajectory on."""
        self._previous = self.prior.trace_answers
        self.prior.trace_answers = True
        return self

    def __exit__(self, *exc: object) -> None:
        """Restore the prior's setting."""
        self.prior.trace_answers = self._previous

    def __call__(self, status: SolverStatus) -> None:
        """Embed ``status.solution`` when the loop hands one over (the last status of a flush)."""
        if status.solution is None:
            return
        import torch

        with torch.no_grad():
            levels = bank_space(self.prior, self.prior.encoder.encode(status.solution))
        point: dict[str, Any] = {
            "iteration": status.iteration,
            "slices": status.extra.get("slices"),
            "levels": [level.tolist() for level in levels],
        }
        if "answer" in status.extra:
            point["answer"] = status.extra["answer"]
        self.points.append(point)


def run_task(task: Task) -> Iterator[dict[str, Any]]:
    """Reconstruct and score every item of ``task``; yields one result per item (see :func:`result`)."""
    from semrecon_core.config import ReconConfig
    from semrecon_core.pipeline import Pipeline

    with thread_limits(task.threads):
        scan = load_scan(task.case, task.acceleration, task.scan)
        if scan.ground_truth is None:  # load_scan guarantees a reference; a reader change must not pass silently
            raise ValueError(f"{task.case.path}: no reference image for scoring")
        reference = scan.ground_truth.abs().numpy().astype(np.float64)
        first = task.items[0].config
        maps_config = ReconConfig(calib_width=task.scan.acs, device=first.device, seed=first.seed)
        started = time.perf_counter()
        maps = Pipeline(maps_config).estimate_maps(scan)
        maps_seconds = time.perf_counter() - started
        scorer = Scorer(task.scoring)
        reference_embedding = scorer.embeddings(reference) if task.role == "test" else None
        for number, item in enumerate(task.items):
            pipeline = Pipeline(item.config)
            recorder = None
            if task.trajectory and pipeline.prior is not None and item.config.prior == "semantic":
                recorder = TrajectoryRecorder(pipeline.prior)  # none when a calibrated λ 0 switched the prior off
            with recorder or contextlib.nullcontext():
                recon = pipeline.run(scan, maps=maps, callback=recorder)
            image = recon.cropped().abs().numpy().astype(np.float32)
            if image.shape != reference.shape:
                raise ValueError(
                    f"{task.case.path}: reconstruction {image.shape} and reference {reference.shape} differ in shape"
                )
            yield result(
                task,
                item,
                recon=recon,
                image=image,
                scores=scorer.score(reference, image),
                perceptual=scorer.perceptual_label,
                embeddings=scorer.embeddings(image) if task.role == "test" else None,
                reference_embedding=reference_embedding,
                trajectory=None if recorder is None else recorder.points,
                maps_seconds=maps_seconds,
                reference=reference.astype(np.float32) if number == 0 and task.role == "test" else None,
            )


def result(
    task: Task,
    item: Item,
    *,
    recon: Any,
    image: np.ndarray,
    scores: dict[str, float | None],
    perceptual: str,
    embeddings: Any,
    reference_embedding: Any,
    trajectory: list[dict[str, Any]] | None,
    maps_seconds: float,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """The stored record of one item: identity, configuration, scores, label, time, trace, embeddings, image.

    ``image`` (and ``reference``, the case's reference image, sent with a task's first item) are arrays
    that the store writes beside the record.
    """
    config = recon.config
    trace = [
        {k: v for k, v in record.items() if k not in TRACE_KEYS_DROPPED}
        for record in recon.result.trace
        if "lr" in record or config.is_classical
    ]
    return {
        "key": item.key,
        "role": task.role,
        "case": task.case.name,
        "path": str(task.case.path),
        "case_sha256": task.case.sha256,
        **item.setting.as_dict(),
        "lam": float(config.lam),
        "lam_source": item.lam_source,
        "iterations": int(config.iterations),
        "label": recon.label,
        "scores": scores,
        "perceptual_label": perceptual,
        "lpips_reason": task.scoring.lpips_reason,
        "seconds": recon.seconds,
        "maps_seconds": maps_seconds,
        "threads": task.threads,
        "source": recon.kspace.source,
        "config": config.to_properties(),
        "trace": trace,
        "embeddings": embeddings,
        "reference_embedding": reference_embedding,
        "trajectory": trajectory,
        "image": image,
        "reference": reference,
    }
