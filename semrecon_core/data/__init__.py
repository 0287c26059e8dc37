"""Typed k-space data and its readers (ISMRMRD, fastMRI, .npy, BART .cfl), buffering and simulation.

``Geometry`` and ``KSpace`` are loaded on first use, so ``semrecon simulate --help`` does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Geometry", "KSpace"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from semrecon_core.data import kspace

        return getattr(kspace, name)
    raise AttributeError(f"module 'semrecon_core.data' has no attribute {name!r}")
