"""Registration with other frameworks; imported lazily so ``ssn`` needs nothing but torch."""

from __future__ import annotations

from .norm import (
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
)

__all__ = ["register_mmengine"]

MM_NAMES = {
    "SSN": SparseSwitchNorm2d,
    "SN": SwitchNorm2d,
    "SSN1d": SparseSwitchNorm1d,
    "SSN2d": SparseSwitchNorm2d,
    "SSN3d": SparseSwitchNorm3d,
    "SN1d": SwitchNorm1d,
    "SN2d": SwitchNorm2d,
    "SN3d": SwitchNorm3d,
}


def register_mmengine() -> None:
    """Register the layers in mmengine's root ``MODELS`` registry (idempotent).

    After this, mmcv's ``build_norm_layer(dict(type='SSN'), C)`` and mmseg configs with
    ``norm_cfg=dict(type='SSN')`` build our layers. NOTE: the root registry, not mmseg's: a child
    registry is only searched inside its own default scope.
    """
    from mmengine.registry import MODELS

    for name, cls in MM_NAMES.items():
        MODELS.register_module(name=name, module=cls, force=True)
