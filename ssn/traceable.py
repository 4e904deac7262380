"""The mixture in plain differentiable ops: what ``torch.compile`` traces instead of the fused path.

The fused ``autograd.Function`` (``fused.py``) saves work in eager mode with native-kernel tricks
and a hand-written backward; a compiler gains nothing from those and cannot see through them.
Written here as plain tensor ops, the whole layer (statistics, ratios, affine map, running
averages) is one graph that inductor fuses into a few reductions and one elementwise pass, with
autograd deriving the backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import BN, IN, LN, _moments, float32_at_least


def mixture(
    x: Tensor,
    mean_ratio: Tensor,
    var_ratio: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    eps: float,
    correction: int,
    groups: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
    """``(y, batch_mean, batch_var, count)``: the same arithmetic as the fused path.

    Solves: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with ``mean`` and ``var`` the
    ratio-weighted IN, LN and BN statistics; the BN ones from the batch when ``bn_mean`` is None
    (returned, biased, over ``count`` elements per channel, for the running averages), else the
    given running statistics. With ``groups`` virtual devices the batch statistics are each
    device's (``N/G`` samples; returned ``(G, C)``, ``count`` per device).
    """
    xs = float32_at_least(x)
    spatial = tuple(range(2, x.dim()))
    m = math.prod(x.shape[2:])
    var_in, mu_in = torch.var_mean(xs, spatial, correction=0, keepdim=True)
    if correction:
        var_in = var_in * (m / max(m - correction, 1))
    mu_ln, var_ln, _ = _moments(mu_in, var_in, 1)
    batch_mean = batch_var = None
    n = x.shape[0]
    if bn_mean is None or bn_var is None:
        if groups == 1:
            mu_bn, var_bn, _ = _moments(mu_in, var_in, 0)
            batch_mean, batch_var = mu_bn, var_bn
        else:  # per device (G, 1, C, 1...), repeated over each device's samples
            mu_g, var_g, _ = _moments(mu_in.unflatten(0, (groups, -1)), var_in.unflatten(0, (groups, -1)), 1)
            batch_mean, batch_var = mu_g.reshape(groups, -1), var_g.reshape(groups, -1)
            n //= groups
            mu_bn = mu_g.expand((groups, n) + mu_g.shape[2:]).reshape(mu_in.shape)
            var_bn = var_g.expand((groups, n) + var_g.shape[2:]).reshape(var_in.shape)
    else:
        shape = (1, -1) + (1,) * len(spatial)
        mu_bn, var_bn = bn_mean.to(xs.dtype).view(shape), bn_var.to(xs.dtype).view(shape)
    mr, vr = mean_ratio.to(xs.dtype), var_ratio.to(xs.dtype)
    mean = mr[IN] * mu_in + mr[LN] * mu_ln + mr[BN] * mu_bn
    var = vr[IN] * var_in + vr[LN] * var_ln + vr[BN] * var_bn
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(xs.dtype).view((1, -1) + (1,) * len(spatial))
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(xs.dtype).view((1, -1) + (1,) * len(spatial))
    y = (xs * scale + shift).to(x.dtype)
    if batch_mean is None or batch_var is None:
        return y, None, None, 0
    if groups == 1:
        batch_mean, batch_var = batch_mean.reshape(-1), batch_var.reshape(-1)
    return y, batch_mean.detach(), batch_var.detach(), n * m
