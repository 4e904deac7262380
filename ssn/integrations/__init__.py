"""Registration with other frameworks, each behind lazy imports so ``ssn`` needs nothing but torch.

- :mod:`.mmengine`: our layers in mmengine's ``MODELS`` (``norm_cfg=dict(type="SSN")``) and every
  normalizer name as an mmcv ``norm_cfg`` (:func:`mm_norm_cfg`);
- :mod:`.mmcv_lite`: ``mmcv.ops`` importable under mmcv-lite (:func:`bridge_mmcv_lite`);
- :mod:`.pytorchvideo`: ``pytorchvideo.transforms`` importable beside torchvision >= 0.17.
- :mod:`.mmengine_hooks` (imported only on request, e.g. by a config's ``custom_imports``; it
  imports mmengine): ``SSNRadiusHook`` drives the radius, latches and statistics in mmengine's Runner.

timm's registration is :func:`ssn.register_timm` (its norm+act layers live in ``ssn.timm_norm``).
"""

from .mmcv_lite import MMCV_INSTALL, MmcvOpUnavailable, bridge_mmcv_lite
from .mmengine import MM_NAMES, mm_norm_cfg, register_mmengine
from .pytorchvideo import bridge_pytorchvideo

__all__ = [
    "MMCV_INSTALL",
    "MM_NAMES",
    "MmcvOpUnavailable",
    "bridge_mmcv_lite",
    "bridge_pytorchvideo",
    "mm_norm_cfg",
    "register_mmengine",
]
