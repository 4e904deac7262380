"""Registration with other frameworks; imported lazily so ``ssn`` needs nothing but torch."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any, Callable

from torch import nn

from .factory import NORM_NAMES, create_norm
from .norm import (
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
)

__all__ = ["MmcvOpUnavailable", "bridge_mmcv_lite", "mm_norm_cfg", "register_mmengine"]

log = logging.getLogger(__name__)

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
    for name in NORM_NAMES:
        MODELS.register_module(name=_MM_PREFIX + name, module=_factory_builder(name), force=True)


# ------------------------------------------------------------------ our names in mmcv norm_cfg
_MM_PREFIX = "ssn:"


def _factory_builder(name: str) -> type:
    """A class mmcv's ``build_norm_layer`` can take that builds ``create_norm(name, C, **cfg)``.

    NOTE: ``build_norm_layer`` needs a class (it reads ``_abbr_`` from it to name the module) and
    calls it as ``cls(C, eps=..., **cfg)``. ``__new__`` returns the factory's layer itself, so the
    module is exactly what every other task builds (no wrapper in the state_dict), and ``_abbr_``
    is ``bn`` for every normalizer so an mmcv ResNet's keys are torchvision's (``bn1``, ``bn2``,
    ``downsample.1``) whichever normalizer it uses.
    """

    def __new__(cls: type, num_features: int, **kw: Any) -> nn.Module:  # noqa: N807
        return create_norm(name, num_features, **kw)

    return type(f"MMNorm_{name}", (), {"_abbr_": "bn", "norm_name": name, "__new__": __new__,
                                       "__doc__": f"mmcv builder of ``ssn.create_norm({name!r}, C)``."})


def mm_norm_cfg(name: str, **kwargs: Any) -> dict[str, Any]:
    """The mmcv ``norm_cfg`` that builds ``ssn.create_norm(name, C, **kwargs)`` (registers first).

    ``mm_norm_cfg('gn', groups=32)`` -> ``{'type': 'ssn:gn', 'groups': 32, 'requires_grad': True}``;
    mmcv's ``build_norm_layer`` / ``ConvModule`` then build our layer for each of ``NORM_NAMES``,
    named ``bn{postfix}``.

    Raises:
        KeyError: an unknown normalizer name (the message lists the valid ones).
    """
    if not isinstance(name, str) or name.lower() not in NORM_NAMES:
        raise KeyError(f"unknown normalizer {name!r}; valid names: {', '.join(NORM_NAMES)}")
    register_mmengine()
    return {"type": _MM_PREFIX + name.lower(), **kwargs, "requires_grad": True}


# --------------------------------------------------------------------------- mmcv-lite bridge
MMCV_INSTALL = (
    "install full mmcv (compiled ops): pip install 'setuptools<81' && pip install --no-build-isolation "
    "mmcv==2.1.0 (builds from source, about 10 minutes on 2 cores)"
)


class MmcvOpUnavailable(RuntimeError):
    """A compiled mmcv op was called while only mmcv-lite (no ``mmcv._ext``) is installed."""


class _MissingExt(types.ModuleType):
    """Stand-in for ``mmcv._ext``: every op exists (so ``mmcv.ops`` imports) and raises when called."""

    STANDIN = True

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("__"):
            raise AttributeError(op)

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise MmcvOpUnavailable(
                f"mmcv op {op!r} needs mmcv's compiled extension (mmcv._ext), which mmcv-lite does not "
                f"have; {MMCV_INSTALL}"
            )

        unavailable.__name__ = unavailable.__qualname__ = op
        return unavailable


def bridge_mmcv_lite() -> bool:
    """Let ``mmcv.ops`` (imported by mmsegmentation at import time) load under ``mmcv-lite``.

    mmcv-lite is mmcv without its compiled extension ``mmcv._ext``; mmseg 1.2.2 imports
    ``mmcv.ops`` (for ``point_sample``) when ``mmseg.models`` is imported, and ``mmcv.ops`` only
    checks that the op names exist in ``mmcv._ext``. This puts a stand-in ``mmcv._ext`` in
    ``sys.modules`` whose ops raise :class:`MmcvOpUnavailable` naming the op and how to install
    full mmcv when they are called. Nothing returns a made-up result: pure-PyTorch code in
    ``mmcv.ops`` keeps working, and a model that really needs a compiled op fails at its first
    call. Call it before importing ``mmseg.models``; idempotent; a no-op (returns False) when
    full mmcv is installed.

    Returns:
        True when the stand-in is (now or already) in place.
    """
    current = sys.modules.get("mmcv._ext")
    if current is not None:
        return bool(getattr(current, "STANDIN", False))
    if importlib.util.find_spec("mmcv") is None:
        raise ModuleNotFoundError("mmcv is not installed: pip install mmcv-lite==2.1.0 (or full mmcv)")
    if importlib.util.find_spec("mmcv._ext") is not None:
        return False  # full mmcv
    ext = _MissingExt("mmcv._ext", "stand-in for mmcv's compiled ops (ssn.integrations.bridge_mmcv_lite)")
    # NOTE: a spec without a loader, so mmcv's check_ops_exist() still says "no compiled ops".
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)
    sys.modules["mmcv._ext"] = ext
    log.warning("mmcv-lite: compiled mmcv ops are unavailable (a stand-in mmcv._ext raises when one is "
                "called); to use them, %s", MMCV_INSTALL)
    return True


# ----------------------------------------------------------------- pytorchvideo / torchvision
def bridge_pytorchvideo() -> bool:
    """Make ``pytorchvideo.transforms`` (0.1.5) importable beside torchvision >= 0.17 (idempotent).

    pytorchvideo imports ``torchvision.transforms.functional_tensor``, which torchvision 0.17
    renamed ``_functional_tensor`` (pytorchvideo uses only its ``affine``). The renamed module is
    registered under the old name when the old one does not exist. Call before importing
    ``pytorchvideo.transforms``.

    Returns:
        True when the bridge was installed by this call, False when nothing was needed.
    """
    import importlib.util
    import sys

    old = "torchvision.transforms.functional_tensor"
    if old in sys.modules or importlib.util.find_spec(old) is not None:
        return False
    sys.modules[old] = importlib.import_module("torchvision.transforms._functional_tensor")
    return True
