"""The one status type every solver reports, and the one callback type that can stop a loop.

CG, PDHG and the Adam fitting loop call ``callback(status)`` after each iteration (the Adam loop after
each flush of its device-side records, see :mod:`semrecon_core.solvers.adam`). A callback that returns
``False`` stops the loop after that iteration; ``None`` or ``True`` lets it go on. Progress bars, traces,
early stopping and time budgets are all callbacks; the loops themselves know nothing about them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class SolverStatus:
    """What a solver reports after one iteration.

    Attributes:
        iteration: 0-based iteration number.
        solution: the current iterate (not detached by the solver; callbacks must not modify it).
        values: scalar records of this iteration, e.g. ``residual``, ``objective``, ``primal_change`` or
            the Adam loop's loss terms ``data``, ``prior``, ``loss``.
        extra: anything else worth keeping in a trace (e.g. the semantic prior's embedding and answer).
    """

    iteration: int
    solution: torch.Tensor | None
    values: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """A JSON-friendly trace record: ``{"iteration", **values, **extra}``."""
        return {"iteration": self.iteration, **self.values, **self.extra}


Callback = Callable[[SolverStatus], bool | None]


def notify(callback: Callback | None, status: SolverStatus) -> bool:
    """Call ``callback`` (if any) with ``status``; return ``True`` when the loop must stop."""
    return callback is not None and callback(status) is False


def chain(callbacks: Iterable[Callback | None]) -> Callback | None:
    """One callback that calls each of ``callbacks`` in order; it stops the loop when any of them asks to."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def combined(status: SolverStatus) -> bool:
        keep_going = True
        for callback in present:
            if callback(status) is False:
                keep_going = False
        return keep_going

    return combined
