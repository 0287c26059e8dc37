"""What every engine receives and returns, and the engine protocol.

An engine turns a :class:`ReconProblem` (scaled k-space, mask and coil maps on the target device) into a
:class:`ReconResult` for one backbone family. Engines are looked up by backbone name in
:func:`semrecon_core.engines.get_engine`; :mod:`semrecon_core.pipeline` is the only caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from semrecon_core.config import ResolvedConfig
    from semrecon_core.priors.base import Prior
    from semrecon_core.solvers.status import Callback


@dataclass
class ReconProblem:
    """What an engine receives: scaled data on the target device.

    Attributes:
        kspace: complex64 ``(slices, coils, ky, kx)`` measured k-space divided by ``scale``.
        mask: bool ``(slices, ky, kx)``.
        maps: complex64 coil maps ``(slices, coils, y, x)``.
        scale: the factor the data were divided by (max of the zero-filled image magnitude).
        device: where the tensors live.
        first_slice: the index of the first slice in the scan (a sub-problem's place in its volume).
        start: the CG-SENSE preview already computed for this scan (complex ``(slices, y, x)``, divided by
            ``scale``, on ``device``), which an engine starting there (``start=preview``) uses instead of
            computing it again; ``None``: not available.
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    scale: float
    device: torch.device
    first_slice: int = 0
    start: torch.Tensor | None = None

    def select(self, part: slice) -> ReconProblem:
        """The sub-problem of the slices in ``part`` (same scale and device)."""
        return ReconProblem(
            kspace=self.kspace[part],
            mask=self.mask[part],
            maps=self.maps[part],
            scale=self.scale,
            device=self.device,
            first_slice=self.first_slice + (part.start or 0),
            start=None if self.start is None else self.start[part],
        )


@dataclass
class ReconResult:
    """A reconstruction: the complex image ``(slices, y, x)``.

    ``label`` names what produced it (backbone, prior, encoder; random-weight encoders say so),
    ``info`` holds per-engine extras (e.g. learned weights, iterations), ``trace`` per-iteration records.
    """

    image: torch.Tensor
    label: str
    info: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)


class Engine(Protocol):
    """``engine(problem, config, *, prior, callback) -> ReconResult``.

    ``config`` is already resolved (every field set); ``prior`` is the built prior for ``config.prior``
    (``None`` for ``none``); ``callback`` receives one status per iteration and may stop the loop.
    """

    def __call__(
        self, problem: ReconProblem, config: ResolvedConfig, *, prior: Prior | None, callback: Callback | None
    ) -> ReconResult:
        """Reconstruct ``problem``; the image is in the problem's scaled units."""
        ...
