"""A wall-clock budget for the fits of one reconstruction, as stopping callbacks of the Adam loop.

No convergence rule is shipped: on the 128² knee the loss on held-out samples (zero-shot self-supervised
validation) was lowest after ~20 iterations of the unrolled network while the image kept improving until ~175,
so stopping on it would have lost ~2.5 dB; a loss plateau stopped 0.7–2.6 dB short as well.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from semrecon_core.solvers.status import SolverStatus


class TimeBudget:
    """A wall-clock budget shared by the consecutive fits of one reconstruction (slice batches, phases).

    Each fit asks for :meth:`part` when it starts and gets a callback that stops it at its share of what is
    left: the remaining time divided by the fits still to run, so a volume fitted in several batches spends
    the budget evenly rather than on its first batch.
    """

    def __init__(self, seconds: float, parts: int, *, started: float | None = None) -> None:
        """``seconds`` from ``started`` (a ``time.monotonic()`` reading; default now), shared by ``parts`` fits."""
        if seconds <= 0 or parts < 1:
            raise ValueError(f"time budget: expected positive seconds and parts, found {seconds} s, {parts} parts")
        self.seconds = seconds
        self._end = (time.monotonic() if started is None else started) + seconds
        self._parts_left = parts

    def part(self) -> BudgetShare:
        """The stopping callback of the next fit."""
        now = time.monotonic()
        share = BudgetShare(now + max(0.0, self._end - now) / max(1, self._parts_left))
        self._parts_left -= 1
        return share


class BudgetShare:
    """One fit's share of a :class:`TimeBudget`: a callback that stops the fit at ``end``; ``spent`` once it has."""

    def __init__(self, end: float) -> None:
        self.end = end
        self.spent = False

    def __call__(self, status: SolverStatus) -> bool | None:
        """``False`` (stop) once the share's end has passed."""
        if time.monotonic() < self.end:
            return None
        self.spent = True
        return False
