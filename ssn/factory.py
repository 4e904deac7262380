"""One name -> one normaliser: ``create_norm('ssn', 64)``, ``get_norm_layer('gn', groups=32)``.

Every normaliser takes the channel count first and accepts ``eps`` and ``momentum`` keywords, so
they are interchangeable in torchvision (``norm_layer(C)``), pytorchvideo
(``norm(num_features=C, eps=..., momentum=...)``) and mmcv (``build_norm_layer``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from .registry import NORM_NAMES, NormSpec, norm_spec
from .virtual import VIRTUAL_BN, check_virtual_devices

__all__ = ["NORM_NAMES", "create_norm", "get_norm_layer"]


def _check_dim(dim: int) -> None:
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (spatial dimensions), got {dim!r}")


def _virtual_devices(spec: NormSpec, dim: int, kw: dict[str, Any]) -> type[nn.Module] | None:
    """Resolve ``kw``'s ``virtual_devices`` for ``spec`` (``ssn.virtual``): the layer class that
    replaces the name's (``bn`` -> ``VirtualBatchNorm``), or None; removes it where it means nothing.

    NOTE: one setting serves every normalizer of a study (``norm_kwargs: {virtual_devices: 8}``):
    the per-sample ones (``gn``, ``in``, ``ln``) have no batch statistics and ignore it.
    """
    if "virtual_devices" not in kw:
        return None
    groups = check_virtual_devices(kw["virtual_devices"])
    if groups > 1 and spec.sync:
        raise ValueError(
            f"{spec.name}: virtual_devices={groups} takes per-device statistics, {spec.name} all-reduces "
            f"them; use {spec.local!r}"
        )
    if spec.switch:
        return None  # the SN/SSN layers take it
    if groups > 1 and spec.running_stats:
        return VIRTUAL_BN[dim]  # which takes it
    del kw["virtual_devices"]
    return None


def create_norm(name: str, num_features: int, dim: int = 2, **kw: Any) -> nn.Module:
    """Build the normaliser ``name`` for ``num_features`` channels of a ``dim``-D spatial input.

    Args:
        name: one of ``bn``, ``syncbn``, ``gn``, ``in``, ``ln``, ``sn``, ``ssn``, and ``syncsn``,
            ``syncssn`` (BN statistics all-reduced across processes), in any case.
        num_features: channel count C.
        dim: spatial dimensions of the input: 1 for (N, C, L), 2 for (N, C, H, W), 3 for
            (N, C, T, H, W).
        **kw: passed to the layer: ``eps``, ``momentum``, ``affine``; ``groups`` for ``gn``
            (default 32); ``radius`` for ``sn``/``ssn``. GroupNorm-based ``gn`` and ``ln`` keep no
            running statistics and ignore ``momentum``. ``virtual_devices=G``: per-device batch
            statistics over G batch groups (``ssn.virtual``; ``bn`` builds ``VirtualBatchNorm``,
            ``gn``/``in``/``ln`` ignore it, the ``sync`` names refuse it).

    Raises:
        KeyError: an unknown name (the message lists the valid ones).
        ValueError: a bad ``dim`` or a channel count that ``groups`` does not divide.
    """
    spec = norm_spec(name)
    _check_dim(dim)
    kw = dict(kw)
    virtual = _virtual_devices(spec, dim, kw)
    if not spec.layers:  # the nn.GroupNorm forms: groups first
        kw.pop("momentum", None)
        groups = spec.groups or kw.pop("groups", 32)
        if num_features % groups:
            raise ValueError(f"gn: {groups} groups do not divide {num_features} channels; pass groups=")
        return nn.GroupNorm(
            groups, num_features, eps=kw.pop("eps", 1e-5), affine=kw.pop("affine", True), **kw
        )
    # NOTE: the name's keywords: a user's ``affine`` wins over ``in``'s default, ``sync`` is the name's
    kw = {**spec.defaults, **kw, **({"sync": True} if spec.sync and spec.switch else {})}
    return (virtual or spec.layers[dim])(num_features, **kw)


def _named_norm(num_features: int, *, name: str, dim: int = 2, **kw: Any) -> nn.Module:
    """``create_norm`` with the name as a keyword, for the layers that are not one class (gn, ln)."""
    return create_norm(name, num_features, dim=dim, **kw)


def get_norm_layer(
    name: str | type[nn.Module] | Callable[..., nn.Module], dim: int = 2, **defaults: Any
) -> Callable[..., nn.Module]:
    """A ``norm_layer`` callable: ``get_norm_layer('ssn')(64)`` builds ``SparseSwitchNorm2d(64)``.

    A name gives the layer's class itself (``SparseSwitchNorm2d``, ``nn.BatchNorm2d``), or a
    ``functools.partial`` that binds keywords only (``sync=True``, ``affine=True``, ``defaults``):
    timm's ``get_norm_layer`` unbinds a partial, keeps its keywords and drops its positional
    arguments, and its norm+act families map the class to a norm+act class
    (``ssn.register_timm``). ``gn`` and ``ln`` (``nn.GroupNorm`` takes the groups first) are a
    keyword-only partial of a function. A class or callable is returned as it is (with
    ``defaults`` bound), as in timm. Unknown names fail here, not when the model is built.
    """
    if isinstance(name, str):
        spec = norm_spec(name)
        _check_dim(dim)
        if not spec.layers:
            return functools.partial(_named_norm, name=spec.name, dim=dim, **defaults)
        defaults = dict(defaults)
        virtual = _virtual_devices(spec, dim, defaults)
        defaults = {**spec.defaults, **defaults}
        cls: Callable[..., nn.Module] = virtual or spec.layers[dim]
        _register_timm_if_loaded()
        return functools.partial(cls, **defaults) if defaults else cls
    if callable(name):
        _register_timm_if_loaded()
        return functools.partial(name, **defaults) if defaults else name
    raise TypeError(f"norm layer must be a name, a class or a callable, got {type(name).__name__}")


def _register_timm_if_loaded() -> None:
    # NOTE: a norm layer asked for after timm is imported is usually for timm.create_model: its
    # norm+act families find our layers only once registered (cheap and idempotent; timm is never
    # imported from here).
    if "timm" in sys.modules:
        from .timm_norm import register_timm

        register_timm()
