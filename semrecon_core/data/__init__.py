"""Typed k-space data and its readers (ISMRMRD, fastMRI, .npy, BART .cfl), buffering and simulation."""

from semrecon_core.data.kspace import Geometry, KSpace

__all__ = ["Geometry", "KSpace"]
