"""The one table of normalizer names: what each name builds and what it is.

Every other list of names (``NORM_NAMES``, the synchronised ones, the mmcv and timm names, the
order reports sort by) is derived from :data:`NORMS`; a new normalizer is one row here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from .norm import (
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
)

__all__ = ["NORMS", "NORM_NAMES", "NORM_ORDER", "SYNC_NAMES", "NormSpec", "norm_spec", "sync_name"]


@dataclass(frozen=True)
class NormSpec:
    """One normalizer name.

    Attributes:
        name: the lower-case name (``ssn.create_norm``'s first argument).
        layers: the class per spatial rank (1, 2, 3); empty for the ``nn.GroupNorm`` forms (``gn``,
            ``ln``), which take the group count first and are built by ``create_norm``.
        groups: the fixed group count of a GroupNorm form (``ln``: 1); None where ``groups=`` is
            the user's (``gn``).
        defaults: keywords the name implies (``sync=True`` for ``syncsn``; ``affine=True`` for
            ``in``, a learnable normaliser like the others, as in the paper).
        sync: batch statistics all-reduced across processes.
        local: the per-device form of the name (``syncssn`` -> ``ssn``; itself otherwise).
        switch: an SN/SSN layer (learned ratios over IN, LN and BN statistics).
        sparse: SSN (SparsestMax ratios that latch; a radius).
        running_stats: keeps BN running statistics (per device unless ``sync``).
        mm_name: the layer's name in mmengine's registry (``norm_cfg=dict(type=...)``), if any.
    """

    name: str
    layers: Mapping[int, type[nn.Module]] = field(default_factory=dict)
    groups: int | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    sync: bool = False
    local: str = ""
    switch: bool = False
    sparse: bool = False
    running_stats: bool = False
    mm_name: str | None = None


def _dims(d1: type[nn.Module], d2: type[nn.Module], d3: type[nn.Module]) -> Mapping[int, type[nn.Module]]:
    return MappingProxyType({1: d1, 2: d2, 3: d3})


_BN = _dims(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SYNC_BN = _dims(nn.SyncBatchNorm, nn.SyncBatchNorm, nn.SyncBatchNorm)  # its rank is known at run time only
_IN = _dims(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_SN = _dims(SwitchNorm1d, SwitchNorm2d, SwitchNorm3d)
_SSN = _dims(SparseSwitchNorm1d, SparseSwitchNorm2d, SparseSwitchNorm3d)
_SYNC = MappingProxyType({"sync": True})

# NOTE: the order is the one error messages list the names in (and tests parametrise over).
NORMS: Mapping[str, NormSpec] = MappingProxyType(
    {
        s.name: s
        for s in (
            NormSpec("bn", _BN, local="bn", running_stats=True),
            NormSpec("syncbn", _SYNC_BN, sync=True, local="bn", running_stats=True),
            NormSpec("gn", local="gn"),
            NormSpec("in", _IN, defaults=MappingProxyType({"affine": True}), local="in"),
            NormSpec("ln", groups=1, local="ln"),
            NormSpec("sn", _SN, local="sn", switch=True, running_stats=True, mm_name="SN"),
            NormSpec("ssn", _SSN, local="ssn", switch=True, sparse=True, running_stats=True, mm_name="SSN"),
            NormSpec("syncsn", _SN, defaults=_SYNC, sync=True, local="sn", switch=True, running_stats=True),
            NormSpec(
                "syncssn",
                _SSN,
                defaults=_SYNC,
                sync=True,
                local="ssn",
                switch=True,
                sparse=True,
                running_stats=True,
            ),
        )
    }
)

NORM_NAMES: tuple[str, ...] = tuple(NORMS)
SYNC_NAMES: tuple[str, ...] = tuple(n for n, s in NORMS.items() if s.sync)
# Reports sort by this: each per-device normalizer followed by its synchronised form.
NORM_ORDER: tuple[str, ...] = tuple(
    n
    for local in NORM_NAMES
    if not NORMS[local].sync
    for n in (local, *(s.name for s in NORMS.values() if s.sync and s.local == local))
)


def norm_spec(name: str) -> NormSpec:
    """The row of ``name`` (any case).

    Raises:
        KeyError: an unknown name (the message lists the valid ones).
    """
    spec = NORMS.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        raise KeyError(f"unknown normalizer {name!r}; valid names: {', '.join(NORM_NAMES)}")
    return spec


def sync_name(name: str) -> str:
    """The synchronised form of ``name`` (``ssn`` -> ``syncssn``), or ``name`` when it has none."""
    local = norm_spec(name).local
    return next((s.name for s in NORMS.values() if s.sync and s.local == local), name.lower())
