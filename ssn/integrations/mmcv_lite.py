"""mmcv-lite: let ``mmcv.ops`` (imported by mmsegmentation) load without mmcv's compiled extension."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["MMCV_INSTALL", "MmcvOpUnavailable", "bridge_mmcv_lite"]

log = logging.getLogger(__name__)

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
    log.warning(
        "mmcv-lite: compiled mmcv ops are unavailable (a stand-in mmcv._ext raises when one is "
        "called); to use them, %s",
        MMCV_INSTALL,
    )
    return True
