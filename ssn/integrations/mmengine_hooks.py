"""SSN in mmengine's own ``Runner`` (mmseg's ``tools/train.py``): the radius ramp, the latches, the
per-device statistics, the ratio-gradient clip and ``norm_eval``, as one registered hook.

Importing this module (``custom_imports=dict(imports=['ssn.integrations.mmengine_hooks'])``)
registers our norm layers (``norm_cfg=dict(type='SSN')``), lets mmseg import under mmcv-lite and
registers :class:`SSNRadiusHook` in mmengine's ``HOOKS``. Unlike the rest of ``ssn`` it imports
mmengine at module level: it is only imported by mmengine users.

Config (the ratio logits in their own parameter group, the authors' lr/10 and no decay)::

    custom_imports = dict(imports=['ssn.integrations.mmengine_hooks'], allow_failed_imports=False)
    custom_hooks = [dict(type='SSNRadiusHook', ratio_grad_clip=1.0)]
    optim_wrapper = dict(paramwise_cfg=dict(custom_keys=RATIO_CUSTOM_KEYS))  # the dict written out
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ..latched import LatchedNorm
from ..norm import SparseSwitchNormBase, SwitchNormBase
from ..schedule import radius_at, ramp_end
from ..surgery import switch_norms
from ..training import average_running_stats, set_radius, update_latches
from .mmcv_lite import bridge_mmcv_lite
from .mmengine import register_mmengine

__all__ = [
    "RATIO_CUSTOM_KEYS",
    "SSNRadiusHook",
    "mmengine_checkpoint_globals",
    "ratio_parameters",
    "stats_norms_to_eval",
]

log = logging.getLogger(__name__)

# mmengine's ``paramwise_cfg.custom_keys`` matches substrings of parameter names: only SN/SSN ratio
# logits are named ``mean_logits`` / ``var_logits``. The authors' recipe: lr / 10, no weight decay
# (``ssn.param_groups`` with its defaults gives the same groups).
RATIO_CUSTOM_KEYS: dict[str, dict[str, float]] = {
    "mean_logits": dict(lr_mult=0.1, decay_mult=0.0),
    "var_logits": dict(lr_mult=0.1, decay_mult=0.0),
}

_META_KEY = "ssn_radius_hook"


def mmengine_checkpoint_globals() -> list[Any]:
    """What mmengine's own checkpoints hold besides tensors and plain containers.

    mmengine 0.10 resumes with ``torch.load(path)``, which is ``weights_only`` since torch 2.6, and
    its checkpoints' ``message_hub`` holds ``HistoryBuffer`` objects (numpy arrays, and their
    statistics methods pickled as ``getattr(HistoryBuffer, 'min')``): ``resume=True`` fails with
    "Weights only load failed ... HistoryBuffer" whatever the model. These are the globals to
    allow (torch's weights-only unpickler still refuses to call anything else).
    """
    import builtins

    import numpy as np
    from mmengine.logging import HistoryBuffer

    core: Any = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    dtypes = sorted({type(np.dtype(c)) for c in codes}, key=str)  # numpy >= 1.25 pickles these classes
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        *dtypes,
        core.multiarray._reconstruct,
        core.multiarray.scalar,
        builtins.getattr,
    ]


def ratio_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mean and variance ratio logits of every SN/SSN layer of ``model``."""
    return [p for _, m in switch_norms(model) for p in (m.mean_logits, m.var_logits)]


def stats_norms_to_eval(model: nn.Module) -> int:
    """Put SN/SSN (and latched) layers in eval mode inside every module with ``norm_eval=True``.

    mmcv/mmseg backbones (``ResNet(norm_eval=True)``) freeze their norms in ``train()`` with an
    ``isinstance(m, _BatchNorm)`` check, which our layers do not pass. In eval mode they
    normalise with their running statistics (kept as they are) and do not latch, as a frozen BN
    does. Their ratio logits still learn unless their ``requires_grad`` is off (``norm_cfg``'s
    ``requires_grad=False``). Returns how many layers were switched.
    """
    count = 0
    for owner in model.modules():
        if getattr(owner, "norm_eval", False) and owner.training:
            for m in owner.modules():
                if isinstance(m, (SwitchNormBase, LatchedNorm)) and m.training:
                    m.eval()
                    count += 1
    return count


@HOOKS.register_module()
class SSNRadiusHook(Hook):
    """Drive SSN in an mmengine ``Runner`` as ``tasks.callbacks.RadiusSchedule`` and ``NormTask`` do
    in Lightning.

    Before every training iteration: backbones with ``norm_eval=True`` get their SN/SSN layers in
    eval mode (:func:`stats_norms_to_eval`, when ``norm_eval``), the radius of every SSN layer is
    set to ``ssn.radius_at(iter, ramp, start, end, delay)`` and ``ssn.update_latches`` latches
    every one-hot ratio. Before validation and before saving, per-device running statistics are
    averaged over the processes (``ssn.average_running_stats``; the saved weights get the averaged
    values). With ``ratio_grad_clip``, the ratio logits' gradient norm is clipped before each
    optimizer step (a step pre-hook on the optimizer, so under AMP it sees unscaled gradients and
    skipped steps are not clipped).

    The ramp is per iteration (``runner.iter``, mmengine's step count; with
    ``accumulative_counts > 1`` the radius moves on every micro-batch) and its length is fixed at
    the first ``before_train`` from ``runner.max_iters``. The hook's state goes into the
    checkpoint's ``meta`` and comes back on ``resume=True`` only (``load_from`` alone starts a new
    ramp); the radius and latches themselves are module buffers in ``state_dict``.

    Args:
        end: final radius (default 1.0, the authors').
        start: radius at iteration 0; default: the largest radius of the model's unlatched SSN
            layers when training starts (0 for a new model; a loaded model's inherited radius).
        ramp_fraction: fraction of the iterations over which to ramp.
        delay_fraction: fraction of the iterations spent at ``start`` first.
        ratio_grad_clip: clip the ratio logits' gradient norm (all together) to this; None: off.
            The SSN authors clip at 1.0.
        norm_eval: put SN/SSN layers in eval mode inside modules with ``norm_eval=True``.
        log_interval: log the radius to the message hub every this many iterations.
    """

    priority = "ABOVE_NORMAL"  # NOTE: before the logger and checkpoint hooks (NORMAL and below)

    def __init__(
        self,
        end: float | None = None,
        start: float | None = None,
        ramp_fraction: float = 1.0,
        delay_fraction: float = 0.0,
        ratio_grad_clip: float | None = None,
        norm_eval: bool = True,
        log_interval: int = 1,
    ) -> None:
        self.end = ramp_end(start, end, ramp_fraction, delay_fraction)
        if ratio_grad_clip is not None and not ratio_grad_clip > 0:
            raise ValueError(f"ratio_grad_clip must be > 0 or None, got {ratio_grad_clip!r}")
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        self.start_from_model = start is None
        self.start = 0.0 if start is None else float(start)
        self.ramp_fraction, self.delay_fraction = float(ramp_fraction), float(delay_fraction)
        self.ratio_grad_clip, self.norm_eval, self.log_interval = ratio_grad_clip, norm_eval, log_interval
        self.ramp_steps: int | None = None
        self.delay_steps = 0
        self.radius = self.start
        self._clip_handle: Any = None
        self._loading = contextlib.ExitStack()

    # --------------------------------------------------------------------- checkpoint loading
    def before_run(self, runner: Any) -> None:
        # NOTE: the Runner loads or resumes between before_run and before_train; mmengine's own
        # checkpoints need these globals under torch >= 2.6 (see mmengine_checkpoint_globals), and
        # they are allowed for that load only.
        if getattr(runner, "_load_from", None) or getattr(runner, "_resume", False):
            self._loading.enter_context(torch.serialization.safe_globals(mmengine_checkpoint_globals()))

    def after_run(self, runner: Any) -> None:
        self._loading.close()

    # --------------------------------------------------------------------------- training
    def before_train(self, runner: Any) -> None:
        self._loading.close()  # the checkpoint, if any, is loaded
        model = _unwrap(runner.model)
        if self.ramp_steps is None:  # not restored by a resume
            if self.start_from_model:
                radii = [
                    float(m.radius)
                    for _, m in switch_norms(model)
                    if isinstance(m, SparseSwitchNormBase) and None in m.latched
                ]
                self.start = min(max(radii, default=0.0), self.end)
            total = int(runner.max_iters)
            self.ramp_steps = max(1, round(total * self.ramp_fraction))
            self.delay_steps = round(total * self.delay_fraction)
        if self.ratio_grad_clip is not None and self._clip_handle is None:
            params = ratio_parameters(model)
            if params:
                self._clip_handle = runner.optim_wrapper.optimizer.register_step_pre_hook(
                    self._clipper(params, self.ratio_grad_clip, runner)
                )

    @staticmethod
    def _clipper(params: list[nn.Parameter], max_norm: float, runner: Any) -> Any:
        def clip(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # NOTE: inside optimizer.step(): after DDP's averaging and after GradScaler's unscale_
            # (GradScaler.step unscales, then calls step), as the authors clip after their
            # all-reduce; latched logits have a zero gradient and add nothing.
            grads = [p for p in params if p.grad is not None]
            if grads:
                norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
                runner.message_hub.update_scalar("train/ssn_ratio_grad_norm", float(norm))

        return clip

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        if self.ramp_steps is None:
            raise RuntimeError("SSNRadiusHook: the ramp is set in before_train, which did not run")
        model = _unwrap(runner.model)
        if self.norm_eval:  # NOTE: the loop calls model.train() before every iteration
            stats_norms_to_eval(model)
        self.radius = radius_at(runner.iter, self.ramp_steps, self.start, self.end, self.delay_steps)
        set_radius(model, self.radius)
        # NOTE: decided here, once per iteration for every layer, not inside each layer's forward
        # (no host synchronisation there).
        update_latches(model)
        if runner.iter % self.log_interval == 0:
            runner.message_hub.update_scalar("train/ssn_radius", self.radius)

    def after_train(self, runner: Any) -> None:
        if self._clip_handle is not None:
            self._clip_handle.remove()
            self._clip_handle = None

    # ------------------------------------------------------------ per-device statistics
    def before_val_epoch(self, runner: Any) -> None:
        average_running_stats(_unwrap(runner.model))

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        # NOTE: every rank gets here (a collective is safe); the state_dict was collected before
        # this hook, so the averaged statistics are written into it as well.
        model = _unwrap(runner.model)
        if average_running_stats(model):
            sd = checkpoint["state_dict"]
            for k, v in model.state_dict().items():
                if k.endswith(("running_mean", "running_var")) and k in sd:
                    sd[k] = v.detach().cpu().clone()
        checkpoint.setdefault("meta", {})[_META_KEY] = self.state_dict()

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        state = checkpoint.get("meta", {}).get(_META_KEY)
        # NOTE: only a resume continues the ramp (mmengine's EMAHook makes the same distinction);
        # ``load_from`` alone fine-tunes with a new ramp from the loaded radius.
        if state is not None and getattr(runner, "_resume", False):
            self.load_state_dict(state)

    _STATE = ("ramp_steps", "delay_steps", "start", "end", "ramp_fraction", "delay_fraction", "radius")

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only (the checkpoint stays loadable with ``weights_only``)."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise KeyError(f"SSNRadiusHook state lacks {missing}; it has {sorted(state)}")
        for k in self._STATE:
            setattr(self, k, state[k])


def _unwrap(model: nn.Module) -> nn.Module:
    inner = model.module if is_model_wrapper(model) else model
    if not isinstance(inner, nn.Module):
        raise TypeError(f"expected a model, got {type(inner).__name__}")
    return inner


# NOTE: what a config's custom_imports of this module should give: ``norm_cfg=dict(type='SSN')``
# builds our layers, and mmseg's models import under mmcv-lite (its ``mmcv.ops`` imports).
register_mmengine()
if importlib.util.find_spec("mmcv") is not None:
    bridge_mmcv_lite()
