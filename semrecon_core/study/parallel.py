"""Study tasks on Ray: one actor per worker, each case (at one acceleration) an actor task.

``--workers N`` (N > 1) starts N actors — on a local Ray started here (``ray.init()``), or on a running cluster
(``--address``). An actor is one long-lived process, so what it loads stays loaded for every task it runs:
the prior factory's per-process caches keep each encoder and bank loaded once per worker, and so do the
scoring network and LPIPS. An actor asks Ray for ``threads`` CPUs and, when the study runs on CUDA, for
``gpus`` GPUs (a fraction shares one device among several workers). The actors run
:func:`~semrecon_core.study.tasks.run_task`, the serial path's code; results return to the driver, which stores
them, so workers need the case and bank files (a shared file system on a cluster) but no write access.

The serial path (``--workers 1``) never imports this module, nor Ray.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from semrecon_core.study import require

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from semrecon_core.study.tasks import Task

log = logging.getLogger(__name__)


class _Worker:
    """The body of a Ray actor: runs tasks in its process and returns their items."""

    def run(self, task: Task) -> list[dict[str, Any]]:
        from semrecon_core.study.tasks import run_task

        return list(run_task(task))


class RayPool:
    """``workers`` Ray actors running study tasks; a context manager that shuts Ray down if it started it.

    Args:
        workers: number of actors (processes).
        address: a Ray cluster to join (``None``: start a local Ray with ``workers × threads`` CPUs).
        threads: CPU threads per task (what each actor asks Ray for).
        gpus: GPUs per actor (0 on CPU).
    """

    def __init__(self, workers: int, *, address: str | None = None, threads: int = 1, gpus: float = 0.0) -> None:
        self.ray = require("ray", f"--workers {workers} (Ray)")
        self.workers = workers
        self.threads = threads
        self.gpus = gpus
        self.address = address
        self._started = False
        self._actors: list[Any] = []

    def __enter__(self) -> RayPool:
        ray = self.ray
        if not ray.is_initialized():
            env = {name: str(self.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": True,
                "logging_level": logging.WARNING,
                "runtime_env": {"env_vars": env},
            }
            if self.address:
                ray.init(address=self.address, **options)
            else:
                ray.init(num_cpus=self.workers * self.threads, num_gpus=self._local_gpus(), **options)
            self._started = True
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus)(_Worker)
        self._actors = [remote.remote() for _ in range(self.workers)]
        return self

    def _local_gpus(self) -> int | None:
        if self.gpus <= 0:
            return 0
        return None  # let Ray detect the local devices

    def __exit__(self, *exc: object) -> None:
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors = []
        if self._started:
            self.ray.shutdown()

    def run(self, tasks: Sequence[Task], on_item: Callable[[dict[str, Any]], None]) -> None:
        """Run ``tasks`` on the actors as they become free; ``on_item`` gets each item as its task finishes.

        A failed task raises its error here (after the tasks already finished were handed to ``on_item``).
        """
        ray = self.ray
        free = list(self._actors)
        pending: dict[Any, Any] = {}
        queue = list(tasks)
        while queue or pending:
            while queue and free:
                actor = free.pop()
                pending[actor.run.remote(queue.pop(0))] = actor
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                free.append(pending.pop(ref))
                for item in ray.get(ref):
                    on_item(item)
