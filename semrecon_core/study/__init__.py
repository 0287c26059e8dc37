"""``semrecon study``: the paper's Table-1 protocol as one resumable, seeded run over a set of cases.

A study reconstructs every case with every setting of a grid — backbones × priors (none, TV, semantic) ×
accelerations × presets — through the one :class:`~semrecon_core.pipeline.Pipeline`, scores each result
against the case's fully sampled reference and writes tables (JSON, CSV, Markdown with the Wilcoxon
signed-rank test TV vs semantic) and figures. The modules:

- :mod:`~semrecon_core.study.cases`: finding and loading cases (``.npy`` magnitude images with simulated coils,
  fastMRI ``.h5``, ISMRMRD raw; fully sampled data undersampled retrospectively) and their seeds.
- :mod:`~semrecon_core.study.grid`: the settings of the grid and the configuration of each.
- :mod:`~semrecon_core.study.scoring`: PSNR, SSIM, HaarPSI, VIF, Tenengrad, LPIPS and a labelled embedding distance.
- :mod:`~semrecon_core.study.tasks`: one task = one case at one acceleration, run in this process or a worker.
- :mod:`~semrecon_core.study.store`: finished (case, setting) results, one atomic file pair per item.
- :mod:`~semrecon_core.study.parallel`: the same tasks on Ray actors (``--workers N``).
- :mod:`~semrecon_core.study.tables` and :mod:`~semrecon_core.study.figures`: what a reader looks at.
- :mod:`~semrecon_core.study.runner`: the order of it all (tuning λ, the grid, tables, figures).

Optional packages (Ray, umap-learn, matplotlib) come with the ``study`` extra and are imported only where used.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose``, or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the Python package '{module}', which does not import here ({exc}); "
            "install it with: pip install 'semrecon[study]'"
        ) from exc
