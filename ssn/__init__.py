"""Sparse Switchable Normalization: SparsestMax, SN/SSN layers and a normaliser factory."""

from .factory import NORM_NAMES, create_norm, get_norm_layer
from .functional import authors_sparsestmax, max_radius, sparsemax, sparsestmax
from .inflate import inflate_resnet_state_dict
from .integrations import bridge_pytorchvideo, register_mmengine
from .norm import (
    STATS,
    LatchedNorm,
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SparseSwitchNormBase,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SwitchNormBase,
)
from .registry import NORM_ORDER, NORMS, SYNC_NAMES, NormSpec
from .schedule import radius_at
from .stats import selected_stat
from .surgery import convert_norm, export_norm, switch_norms
from .timm_norm import SparseSwitchNormAct2d, SwitchNormAct2d, register_timm
from .training import average_running_stats, param_groups, set_radius, update_latches
from .virtual import VirtualBatchNorm1d, VirtualBatchNorm2d, VirtualBatchNorm3d

__all__ = [
    "LatchedNorm",
    "NORMS",
    "NORM_ORDER",
    "NormSpec",
    "authors_sparsestmax",
    "NORM_NAMES",
    "STATS",
    "SYNC_NAMES",
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
    "SparseSwitchNormAct2d",
    "SparseSwitchNormBase",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SwitchNormAct2d",
    "SwitchNormBase",
    "VirtualBatchNorm1d",
    "VirtualBatchNorm2d",
    "VirtualBatchNorm3d",
    "bridge_pytorchvideo",
    "average_running_stats",
    "convert_norm",
    "create_norm",
    "export_norm",
    "get_norm_layer",
    "inflate_resnet_state_dict",
    "max_radius",
    "param_groups",
    "radius_at",
    "register_mmengine",
    "register_timm",
    "set_radius",
    "sparsemax",
    "selected_stat",
    "sparsestmax",
    "switch_norms",
    "update_latches",
]

import sys as _sys

if "timm" in _sys.modules:  # NOTE: timm loaded first: its factories know our layers from now on
    register_timm()
