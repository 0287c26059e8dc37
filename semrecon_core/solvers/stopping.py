"""Stopping rules for the Adam fitting loop, as callbacks: a validation loss, a wall-clock budget.

Scan-specific fits of a randomly initialised network reach their best image early and then fit the noise of the
samples they train on. :class:`EarlyStopping` measures a loss on samples the fit never sees (a validation split of
the scan, as in zero-shot self-supervised learning) at every flush of the Adam loop, keeps a copy of the weights at
the lowest value, and stops the loop once the value has not improved for ``patience`` flushes.
:class:`TimeBudget` stops the fits of one reconstruction when its share of a wall-clock budget is spent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from semrecon_core.solvers.status import SolverStatus


class EarlyStopping:
    """Stop when ``loss()`` has not improved for ``patience`` checks; :meth:`restore` loads the best weights.

    The loop must flush (report a status with a ``solution``) at the iterations to check: at a flush the
    module's weights are those of the reported iteration. Each check adds ``validation`` to the status's values.
    """

    def __init__(self, module: nn.Module, loss: Callable[[], float], *, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"early stopping: expected a patience of at least one check, found {patience}")
        self.module = module
        self.loss = loss
        self.patience = patience
        self.best = math.inf
        self.best_iteration = -1
        self.checks = 0
        self.stopped = False
        self._waited = 0
        self._state: dict[str, torch.Tensor] | None = None

    def __call__(self, status: SolverStatus) -> bool | None:
        """Check at flushes only; ``False`` once ``patience`` checks passed without improvement."""
        if status.solution is None:
            return None
        value = float(self.loss())
        status.values["validation"] = value
        self.checks += 1
        if value < self.best:
            self.best, self.best_iteration, self._waited = value, status.iteration, 0
            self._state = {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}
            return None
        self._waited += 1
        self.stopped = self._waited >= self.patience
        return False if self.stopped else None

    def restore(self) -> None:
        """Load the weights of the best check (no-op before the first check)."""
        if self._state is not None:
            self.module.load_state_dict(self._state)

    def summary(self) -> dict[str, float | int]:
        """``{"best_iteration", "best_validation", "checks"}`` for the result's info."""
        return {"best_iteration": self.best_iteration, "best_validation": self.best, "checks": self.checks}


class TimeBudget:
    """A wall-clock budget shared by the consecutive fits of one reconstruction (slice batches, phases).

    Each fit asks for :meth:`part` when it starts and gets a callback that stops it at its share of what is
    left: the remaining time divided by the fits still to run, so a volume fitted in several batches spends
    the budget evenly rather than on its first batch.
    """

    def __init__(self, seconds: float, parts: int) -> None:
        if seconds <= 0 or parts < 1:
            raise ValueError(f"time budget: expected positive seconds and parts, found {seconds} s, {parts} parts")
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._parts_left = parts
        self.spent = False

    def part(self) -> Callable[[SolverStatus], bool | None]:
        """The stopping callback of the next fit."""
        now = time.monotonic()
        share_end = now + max(0.0, self._end - now) / max(1, self._parts_left)
        self._parts_left -= 1

        def stop_at_share(status: SolverStatus) -> bool | None:
            if time.monotonic() < share_end:
                return None
            self.spent = True
            return False

        return stop_at_share
