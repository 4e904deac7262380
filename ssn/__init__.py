"""Sparse Switchable Normalization: SparsestMax, SN/SSN layers and a normaliser factory."""

from .factory import NORM_NAMES, create_norm, get_norm_layer
from .functional import max_radius, sparsemax, sparsestmax
from .norm import (
    STATS,
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
)
from .integrations import register_mmengine

__all__ = [
    "NORM_NAMES",
    "STATS",
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "create_norm",
    "get_norm_layer",
    "max_radius",
    "register_mmengine",
    "sparsemax",
    "sparsestmax",
]
