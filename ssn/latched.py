"""LatchedNorm: what an SSN layer whose mean and variance latched to different statistics exports to."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import traceable
from .fused import _dof, _SwitchNormFn
from .stats import BN, IN, STATS, _check_input, _update_running, float32_at_least
from .virtual import check_virtual_devices, device_batch

__all__ = ["LatchedNorm"]


class LatchedNorm(nn.Module):
    """A normaliser whose mean and variance use fixed, possibly different, statistics.

    What ``ssn.export_norm`` turns an SSN layer into when its mean and variance latched to
    different statistics (e.g. mean from BN, variance from IN): no logits, no ratios, only the
    selected statistics, the same arithmetic as the layer it replaces.
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        mean_stat: str,
        var_stat: str,
        *,
        spatial_dims: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        in_var_correction: int = 0,
        virtual_devices: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for s in (mean_stat, var_stat):
            if s not in STATS:
                raise KeyError(f"unknown statistic {s!r}; valid: {', '.join(STATS)}")
        self.num_features, self.spatial_dims = num_features, spatial_dims
        self.eps, self.momentum, self.affine = eps, momentum, affine
        self.in_var_correction = in_var_correction
        # NOTE: per-device batch statistics over G batch groups in training (``ssn.virtual``)
        self.virtual_devices = check_virtual_devices(virtual_devices)
        dd: dict[str, Any] = {
            "device": device,
            "dtype": dtype,
        }  # PyTorch's factory keywords, as nn.BatchNorm2d
        self.weight = nn.Parameter(torch.ones(num_features, **dd)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **dd)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features, **dd))
        self.register_buffer("running_var", torch.ones(num_features, **dd))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # NOTE: plain ints (kept in the state_dict as extra state), so torch.export and
        # torch.compile see constants rather than data-dependent tensor reads.
        self.mean_stat, self.var_stat = STATS.index(mean_stat), STATS.index(var_stat)

    def get_extra_state(self) -> dict[str, str]:
        return {"mean": STATS[self.mean_stat], "var": STATS[self.var_stat]}

    def set_extra_state(self, state: dict[str, str]) -> None:
        self.mean_stat, self.var_stat = STATS.index(state["mean"]), STATS.index(state["var"])

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, self.spatial_dims, "(N, C, ...)")
        if not self.training:
            return self._eval(x)
        ratios = torch.eye(len(STATS), device=x.device)[[self.mean_stat, self.var_stat]]
        rest = (self.weight, self.bias, None, None, self.eps, self.in_var_correction)
        groups = self.virtual_devices
        if groups > 1:
            device_batch(x.shape[0], groups, type(self).__name__)
        if torch.compiler.is_compiling():  # plain ops: one graph (see ssn/traceable.py)
            y, batch_mean, batch_var, count = traceable.mixture(x, ratios[0], ratios[1], *rest, groups)
        else:
            y, batch_mean, batch_var, count = _SwitchNormFn.apply(x, ratios, *rest, None, groups)
        assert batch_mean is not None and batch_var is not None  # training: the batch's statistics
        _update_running(self, batch_mean, batch_var, float(count))
        return y

    def _eval(self, x: Tensor) -> Tensor:
        """Only the selected statistics, in plain ops (exportable with a dynamic batch)."""
        sp = tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * len(sp)
        xs = float32_at_least(x)
        # NOTE: mean and variance differ here, so at least one needs the per-plane moments; the
        # variance uses the layer's degrees of freedom (no NaN for 1x1 maps when unbiased).
        m = math.prod(x.shape[2:])
        var_in, mu_in = torch.var_mean(xs, sp, correction=0, keepdim=True)
        var_in = var_in * (m / _dof(m, self.in_var_correction))
        if self.mean_stat == BN:
            mean = self.running_mean.to(xs.dtype).view(shape)
        else:
            mean = mu_in if self.mean_stat == IN else mu_in.mean(1, keepdim=True)
        if self.var_stat == BN:
            var = self.running_var.to(xs.dtype).view(shape)
        elif self.var_stat == IN:
            var = var_in
        else:  # LN pooled from the planes, as the layer defines it
            var = var_in.mean(1, keepdim=True) + mu_in.var(1, correction=0, keepdim=True)
        y = (xs - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:  # affine: both or neither
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, mean={STATS[self.mean_stat]}, var={STATS[self.var_stat]}, eps={self.eps}"
        return s + (f", virtual_devices={self.virtual_devices}" if self.virtual_devices > 1 else "")
