"""timm support: SN/SSN norm+act layers and their registration in timm's norm factories.

timm builds most CNN families' norms through ``timm.layers.get_norm_layer`` (a class, a name or
a partial) and its norm+act families (EfficientNet, MobileNetV3, RegNet, ...) through
``get_norm_act_layer``, which maps a norm class to a norm+act class by the class name
(``BatchNorm2d`` -> ``BatchNormAct2d``). :func:`register_timm` adds our layers to those maps, so
``timm.create_model(name, norm_layer=ssn.get_norm_layer("ssn"))``, ``norm_layer=ssn.SparseSwitchNorm2d``
and ``norm_layer="ssn"`` build every family that takes a norm layer.

timm is imported lazily (in :func:`register_timm` and when a norm+act layer creates its activation),
so ``ssn`` still needs nothing but torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .norm import SparseSwitchNorm2d, SwitchNorm2d
from .registry import NORMS

__all__ = ["SparseSwitchNormAct2d", "SwitchNormAct2d", "register_timm"]


class _NormAct(nn.Module):
    """The norm, then ``drop``, then ``act``: what timm's ``BatchNormAct2d`` adds to BatchNorm2d.

    A subclass of the norm (not a wrapper holding one), as timm's are: the state_dict keys are the
    norm's, so checkpoints move between the norm and the norm+act form.
    """

    drop: nn.Module
    act: nn.Module

    def __init__(
        self,
        num_features: int,
        *,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_features, **kwargs: as for the norm (``eps``, ``momentum``, ``radius``, ``device``, ...).
            apply_act, act_layer, act_kwargs, inplace, drop_layer: as timm's ``BatchNormAct2d``
                (``act_layer`` a class, a timm name such as ``"silu"``, or None for no activation).
        """
        super().__init__(num_features, **kwargs)  # the norm's __init__ (MRO)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act = None
        if apply_act and act_layer is not None:
            from timm.layers import create_act_layer

            act = create_act_layer(act_layer, **{"inplace": inplace, **(act_kwargs or {})})
        self.act = nn.Identity() if act is None else act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class SwitchNormAct2d(_NormAct, SwitchNorm2d):
    """:class:`ssn.SwitchNorm2d` followed by timm's drop and activation (timm's norm+act form)."""


class SparseSwitchNormAct2d(_NormAct, SparseSwitchNorm2d):
    """:class:`ssn.SparseSwitchNorm2d` followed by timm's drop and activation (timm's norm+act form)."""


NORM_ACT = {SwitchNorm2d: SwitchNormAct2d, SparseSwitchNorm2d: SparseSwitchNormAct2d}
# timm's string names (``norm_layer="ssn"``): lower case, as timm looks them up
_TIMM_NAMES = {n: s.layers[2] for n, s in NORMS.items() if s.switch and not s.sync}  # sn, ssn


def register_timm() -> None:
    """Make timm's norm factories resolve our layers (idempotent).

    timm 1.0 has no registration API for norm layers: its factories read module-level dicts
    (``timm.layers.create_norm._NORM_MAP``, ``create_norm_act._NORM_ACT_MAP``,
    ``_NORM_TO_NORM_ACT_MAP``) and sets (``_NORM_ACT_TYPES``, ``_NORM_ACT_REQUIRES_ARG``). We add
    entries to them, as timm's own layers are listed there; nothing of timm's is replaced. After
    this, ``SwitchNorm2d``/``SparseSwitchNorm2d`` (or a keyword partial of them, or ``"sn"``/``"ssn"``)
    map to :class:`SwitchNormAct2d`/:class:`SparseSwitchNormAct2d` in the norm+act families.
    ``ssn.get_norm_layer`` calls this when timm is already imported.
    """
    from timm.layers import create_norm, create_norm_act

    for name, cls in _TIMM_NAMES.items():
        create_norm._NORM_MAP.setdefault(name, cls)
        create_norm_act._NORM_ACT_MAP.setdefault(name, NORM_ACT[cls])
    for cls, act_cls in NORM_ACT.items():
        create_norm._NORM_MAP.setdefault(cls.__name__.lower(), cls)
        create_norm_act._NORM_ACT_MAP.setdefault(cls.__name__.lower(), act_cls)
        create_norm_act._NORM_TO_NORM_ACT_MAP.setdefault(cls.__name__.lower(), act_cls)
        # NOTE: a norm+act class passed as norm_layer is used as it is; REQUIRES_ARG makes timm bind
        # the model's act_layer (without it, every activation would silently be the default).
        create_norm_act._NORM_ACT_TYPES.add(act_cls)
        create_norm_act._NORM_ACT_REQUIRES_ARG.add(act_cls)
