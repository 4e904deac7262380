"""The statistics the SN/SSN layers mix, and everything the layers share about them.

Per-(n, c) plane moments pool into the LN (over channels) and BN (over the batch, optionally
over processes) statistics; with the mean and variance ratios they give a per-plane affine map
``y = x * scale + shift`` (``_mixture_coeffs``, with its hand-written backward). Also here: the
running averages of the BN statistics and the input checks common to every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

STATS = ("in", "ln", "bn")
IN, LN, BN = range(3)
UNLATCHED = -1


def _moments(mu_in: Tensor, var_in: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of the pooled groups along ``dim``, from per-(n, c) moments.

    The pooled variance is the mean of the variances plus the variance of the means, which avoids
    the cancellation of ``E[x^2] - E[x]^2``.
    """
    # NOTE: not torch.var_mean, whose Welford reduction is ~4x slower on the CPU
    mu = mu_in.mean(dim, keepdim=True)
    return mu, (var_in + (mu_in - mu).square_()).mean(dim, keepdim=True)


class _Coeffs(NamedTuple):
    """The small (N, C) graph from statistics and ratios to the per-plane affine map."""

    scale: Tensor  # y = x * scale + shift
    shift: Tensor
    mean: Tensor
    rstd: Tensor
    mus: tuple[Tensor, Tensor, Tensor]  # IN (N, C), LN (N, 1), BN (1, C) means
    vars: tuple[Tensor, Tensor, Tensor]
    dev_ln: Tensor  # mu_in - mu_ln
    dev_bn: Tensor  # mu_in - mu_bn
    batch_stats: bool  # BN statistics from the batch (training) or the running buffers
    bn_share: float  # d mu_bn / d mu_in[n, c]: this plane's share of the pooled BN statistics
    group: object  # process group the BN statistics are synchronised over, or None


class _BatchStats(NamedTuple):
    mean: Tensor  # (1, C), pooled over the batch (and the processes, when synchronised)
    var: Tensor  # (1, C), biased
    count: float  # elements per channel behind them


def _batch_stats(mu_in: Tensor, var_in: Tensor, m: int, group: object) -> _BatchStats:
    """BN statistics from per-plane moments; all-reduced over ``group`` (SyncBatchNorm-style).

    Two small all-reduces (sum of means, then sum of centred second moments around the global
    mean) keep the pooled variance free of the E[x^2] - E[x]^2 cancellation.
    """
    n = mu_in.shape[0]
    if group is None:
        mean, var = _moments(mu_in, var_in, 0)
        return _BatchStats(mean, var, float(n * m))
    import torch.distributed as dist

    local = torch.cat([mu_in.sum(0) * m, mu_in.new_tensor([n * m])])
    dist.all_reduce(local, group=group)
    count = float(local[-1])
    mean = (local[:-1] / count)[None]
    second = ((var_in + (mu_in - mean) ** 2).sum(0) * m)
    dist.all_reduce(second, group=group)
    return _BatchStats(mean, (second / count)[None], count)


def _mixture_coeffs(
    mu_in: Tensor,
    var_in: Tensor,
    mean_ratio: Tensor,
    var_ratio: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    eps: float,
    m: int,
    group: object,
) -> tuple[_Coeffs, _BatchStats | None]:
    mu_ln, var_ln = _moments(mu_in, var_in, 1)
    batch_stats = bn_mean is None or bn_var is None
    stats = None
    if batch_stats:
        stats = _batch_stats(mu_in, var_in, m, group)
        bn_mean, bn_var = stats.mean, stats.var
    else:
        bn_mean, bn_var = bn_mean.to(mu_in.dtype)[None], bn_var.to(mu_in.dtype)[None]
    mus, vars_ = (mu_in, mu_ln, bn_mean), (var_in, var_ln, bn_var)
    mr, vr = mean_ratio.to(mu_in.dtype), var_ratio.to(mu_in.dtype)
    # NOTE: few ops on the (N, C) tensors: at 7x7 maps they are as large as a tenth of the
    # activation, and each one costs a dispatch; the LN and BN terms are broadcast first.
    mean = torch.addcmul(mr[LN] * mu_ln + mr[BN] * bn_mean, mu_in, mr[IN])
    var = torch.addcmul(vr[LN] * var_ln + vr[BN] * bn_var, var_in, vr[IN])
    rstd = var.add_(eps).rsqrt_()
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    shift = torch.addcmul(torch.zeros_like(scale) if bias is None else bias.to(scale.dtype), mean, scale, value=-1)
    share = m / stats.count if stats is not None else 0.0
    coeffs = _Coeffs(scale, shift, mean, rstd, mus, vars_, mu_in - mu_ln, mu_in - bn_mean, batch_stats, share, group)
    return coeffs, stats


def _mixture_coeffs_backward(
    c: _Coeffs, g_scale: Tensor, g_shift: Tensor, mean_ratio: Tensor, var_ratio: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Hand-written backward of ``_mixture_coeffs``: grads of mu_in, var_in, the ratios, the
    weight and the bias. (Autograd over these ~30 tiny ops costs more than the big passes on
    small activations.)"""
    ch = g_scale.shape[1]
    mr, vr = mean_ratio.to(g_scale.dtype), var_ratio.to(g_scale.dtype)
    mu_in, mu_ln, mu_bn = c.mus
    g_mean = torch.mul(g_shift, c.scale).neg_()
    g_sc = torch.addcmul(g_scale, g_shift, c.mean, value=-1)
    g_weight = torch.linalg.vecdot(g_sc, c.rstd, dim=0)
    r3 = c.rstd.pow(3)
    g_var = (g_sc if weight is None else g_sc * weight.to(g_sc.dtype)).mul_(r3).mul_(-0.5)
    # ratio grads: <g_mean, mu> for each statistic, the LN/BN ones reduced over their broadcast dim
    gm_n, gm_c = g_mean.sum(1, keepdim=True), g_mean.sum(0, keepdim=True)
    gv_n, gv_c = g_var.sum(1, keepdim=True), g_var.sum(0, keepdim=True)
    g_mr = torch.stack([torch.vdot(g_mean.reshape(-1), mu_in.reshape(-1)), (gm_n * mu_ln).sum(), (gm_c * mu_bn).sum()])
    var_in, var_ln, var_bn = c.vars
    g_vr = torch.stack([torch.vdot(g_var.reshape(-1), var_in.reshape(-1)), (gv_n * var_ln).sum(), (gv_c * var_bn).sum()])
    # LN statistics pool over channels: mu_ln = mean_c mu_in, var_ln = mean_c(var_in) + var_c(mu_in)
    gm_ln, gv_ln = gm_n * (mr[LN] / ch), gv_n * (vr[LN] / ch)
    g_mu_in = torch.addcmul(gm_ln, g_mean, mr[IN]).addcmul_(c.dev_ln, gv_ln, value=2)
    g_var_in = torch.addcmul(gv_ln, g_var, vr[IN])
    if c.batch_stats:  # BN statistics pool over the batch (and the processes) likewise
        g_bn = torch.cat([gm_c * mr[BN], gv_c * vr[BN]])
        if c.group is not None:
            import torch.distributed as dist

            dist.all_reduce(g_bn, group=c.group)  # the pooled statistics depend on every rank's planes
        gm_bn, gv_bn = (g_bn * c.bn_share).unbind(0)
        g_mu_in = g_mu_in.add_(gm_bn).addcmul_(c.dev_bn, gv_bn, value=2)
        g_var_in = g_var_in.add_(gv_bn)
    return g_mu_in, g_var_in, g_mr, g_vr, g_weight, g_shift.sum(0)


def _batch_momentum(module: nn.Module) -> float:
    """Weight of the current batch in the running averages (PyTorch's convention)."""
    if module.momentum is None:  # cumulative moving average, as in nn.BatchNorm
        return 1.0 / float(module.num_batches_tracked)
    return module.momentum


@torch.no_grad()
def _update_running(module: nn.Module, mean: Tensor, var: Tensor, count: float) -> None:
    """Running BN statistics after a training batch with biased pooled ``var`` over ``count``.

    NOTE: like BatchNorm, the running variance is the unbiased one; a single value per channel
    (1x1 maps at batch 1) has no unbiased estimate, so it is kept biased. With the authors'
    unbiased instance variance the pooled variance is stored as is, as their code does.
    """
    module.num_batches_tracked.add_(1)
    m = _batch_momentum(module)
    unbias = count / (count - 1) if count > 1 and not module.in_var_correction else 1.0
    # NOTE: averaged in float32 at least, as BatchNorm does: a half-precision layer's batch
    # variance may exceed 65504 while the running average (weight ``m``) stays representable.
    for buf, new in ((module.running_mean, mean), (module.running_var, var * unbias)):
        if buf.dtype in (torch.float32, torch.float64):
            buf.lerp_(new.to(buf.dtype), m)
        else:
            buf.copy_(buf.float().lerp_(new.float(), m))


def _check_input(module: nn.Module, x: Tensor, spatial_dims: int, layout: str) -> None:
    """Refuse, with what was expected, inputs the layers cannot normalise."""
    name = type(module).__name__
    want = spatial_dims + 2
    if x.dim() != want:
        raise ValueError(f"{name} expects a {want}-D input {layout}, got {x.dim()}-D of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input {layout}, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(
            f"{name} expects a non-empty batch and spatial map {layout}, got shape {tuple(x.shape)}"
        )
