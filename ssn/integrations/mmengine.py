"""mmengine / mmcv: our layers in mmengine's ``MODELS`` registry and our names in mmcv ``norm_cfg``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..factory import create_norm
from ..registry import NORM_NAMES, NORMS, norm_spec

__all__ = ["MM_NAMES", "mm_norm_cfg", "register_mmengine"]

# ``norm_cfg=dict(type="SSN")`` is the 2-D layer; ``SSN1d``/``SSN2d``/``SSN3d`` name the rank.
MM_NAMES: dict[str, type[nn.Module]] = {
    f"{spec.mm_name}{suffix}": spec.layers[dim]
    for spec in NORMS.values()
    if spec.mm_name
    for suffix, dim in (("", 2), ("1d", 1), ("2d", 2), ("3d", 3))
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
    for name in NORM_NAMES:
        MODELS.register_module(name=_MM_PREFIX + name, module=_factory_builder(name), force=True)


_MM_PREFIX = "ssn:"


def _factory_builder(name: str) -> type:
    """A class mmcv's ``build_norm_layer`` can take that builds ``create_norm(name, C, **cfg)``.

    NOTE: ``build_norm_layer`` needs a class (it reads ``_abbr_`` from it to name the module) and
    calls it as ``cls(C, eps=..., **cfg)``. ``__new__`` returns the factory's layer itself, so the
    module is exactly what every other task builds (no wrapper in the state_dict), and ``_abbr_``
    is ``bn`` for every normalizer so an mmcv ResNet's keys are torchvision's (``bn1``, ``bn2``,
    ``downsample.1``) whichever normalizer it uses.
    """

    def __new__(cls: type, num_features: int, **kw: Any) -> nn.Module:
        return create_norm(name, num_features, **kw)

    return type(
        f"MMNorm_{name}",
        (),
        {
            "_abbr_": "bn",
            "norm_name": name,
            "__new__": __new__,
            "__doc__": f"mmcv builder of ``ssn.create_norm({name!r}, C)``.",
        },
    )


def mm_norm_cfg(name: str, **kwargs: Any) -> dict[str, Any]:
    """The mmcv ``norm_cfg`` that builds ``ssn.create_norm(name, C, **kwargs)`` (registers first).

    ``mm_norm_cfg('gn', groups=32)`` -> ``{'type': 'ssn:gn', 'groups': 32, 'requires_grad': True}``;
    mmcv's ``build_norm_layer`` / ``ConvModule`` then build our layer for each of ``NORM_NAMES``,
    named ``bn{postfix}``.

    Raises:
        KeyError: an unknown normalizer name (the message lists the valid ones).
    """
    spec = norm_spec(name)
    register_mmengine()
    return {"type": _MM_PREFIX + spec.name, **kwargs, "requires_grad": True}
