"""pytorchvideo 0.1.5 beside torchvision >= 0.17."""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["bridge_pytorchvideo"]


def bridge_pytorchvideo() -> bool:
    """Make ``pytorchvideo.transforms`` (0.1.5) importable beside torchvision >= 0.17 (idempotent).

    pytorchvideo imports ``torchvision.transforms.functional_tensor``, which torchvision 0.17
    renamed ``_functional_tensor`` (pytorchvideo uses only its ``affine``). The renamed module is
    registered under the old name when the old one does not exist. Call before importing
    ``pytorchvideo.transforms``.

    Returns:
        True when the bridge was installed by this call, False when nothing was needed.
    """
    old = "torchvision.transforms.functional_tensor"
    if old in sys.modules or importlib.util.find_spec(old) is not None:
        return False
    sys.modules[old] = importlib.import_module("torchvision.transforms._functional_tensor")
    return True
