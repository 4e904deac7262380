"""The statistics the SN/SSN layers mix, and everything the layers share about them.

Per-(n, c) plane moments pool into the LN (over channels) and BN (over the batch, optionally
over processes) statistics; with the mean and variance ratios they give a per-plane affine map
``y = x * scale + shift`` (``_mixture_coeffs``, with its hand-written backward). Also here: the
running averages of the BN statistics and the input checks common to every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

STATS = ("in", "ln", "bn")
IN, LN, BN = range(3)
UNLATCHED = -1
_WIDE = (torch.float32, torch.float64)  # the dtypes statistics are computed in


def float32_at_least(x: Tensor) -> Tensor:
    """``x`` itself in float32/float64, else widened to float32: statistics of fp16/bf16 inputs
    (autocast) are computed in float32, as BatchNorm does."""
    return x if x.dtype in _WIDE else x.float()


def selected_stat(latch: int | str | None, ratios: Tensor | Sequence[float]) -> int:
    """The statistic (index into ``STATS``) a mean or variance uses: its latch, or while it is not
    latched (``UNLATCHED``, ``None`` or ``""``) the argmax of its ratios (the first on a tie)."""
    if isinstance(latch, str) and latch:
        return STATS.index(latch)
    if isinstance(latch, int) and latch != UNLATCHED:
        return latch
    if isinstance(ratios, Tensor):
        return int(ratios.argmax())
    values = list(ratios)
    return values.index(max(values))


def _moments(mu_in: Tensor, var_in: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and (biased) variance of the pooled groups along ``dim``, from per-(n, c) moments, and
    the deviations ``mu_in - mean`` (what the backward needs).

    The pooled variance is the mean of the variances plus the variance of the means, which avoids
    the cancellation of ``E[x^2] - E[x]^2``.
    """
    # NOTE: not torch.var_mean, whose Welford reduction is ~4x slower on the CPU
    mu = mu_in.mean(dim, keepdim=True)
    dev = mu_in - mu
    return mu, torch.addcmul(var_in, dev, dev).mean(dim, keepdim=True), dev


class _Coeffs(NamedTuple):
    """The small (N, C) graph from statistics and ratios to the per-plane affine map.

    Statistics are stacked mean-over-variance, ``(2, ...)``, so that one op serves both.
    """

    scale: Tensor  # y = x * scale + shift, (N, C)
    shift: Tensor
    mix: Tensor  # (2, N, C): the mixed mean and the mixed variance + eps
    rstd: Tensor  # (N, C)
    planes: Tensor  # (2, N, C): IN mean and variance
    ln: Tensor  # (2, N, 1): LN mean and variance
    # (2, 1, C): BN mean and variance (the batch's or the running ones); (2, G, 1, C) per virtual device
    bn: Tensor
    dev_ln: Tensor  # mu_in - mu_ln
    dev_bn: Tensor | None  # mu_in - mu_bn (batch statistics only)
    bn_share: float  # d mu_bn / d mu_in[n, c]: this plane's share of the pooled BN statistics (0: running)
    group: ProcessGroup | None  # process group the BN statistics are synchronised over, or None
    groups: int  # virtual devices the batch statistics are pooled per (1: the whole batch; running: 1)


def _grouped(t: Tensor, groups: int) -> Tensor:
    """``(..., N, C)`` as ``(..., G, N/G, C)``: the batch dim split per virtual device (a view); ``t``
    itself for one group, so the single-device arithmetic is untouched."""
    return t if groups == 1 else t.unflatten(-2, (groups, -1))


def _bn_ratio(r: Tensor, bn: Tensor) -> Tensor:
    """The ``(2, 1, ...)`` BN ratio column ``r`` shaped to broadcast against ``bn`` (``(2, 1, C)``,
    or ``(2, G, 1, C)`` per virtual device)."""
    return r.view((2,) + (1,) * (bn.dim() - 1))


def _pool(planes: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``_moments`` of the stacked ``(2, N, C)`` planes: pooled mean and variance stacked, and the
    deviations."""
    mu, var, dev = _moments(planes[0], planes[1], dim)
    return torch.stack([mu, var]), dev


def _batch_pool(
    planes: Tensor, m: int, group: ProcessGroup | None, groups: int = 1
) -> tuple[Tensor, Tensor, float]:
    """BN statistics ``(2, 1, C)`` from the planes, their deviations and the element count;
    all-reduced over ``group`` (SyncBatchNorm-style) when one is given; per virtual device,
    ``(2, G, 1, C)`` over each device's ``N/G`` samples, when ``groups`` > 1.

    Two small all-reduces (sum of means, then sum of centred second moments around the global
    mean) keep the pooled variance free of the E[x^2] - E[x]^2 cancellation.
    """
    n = planes.shape[1]
    if groups > 1:  # (2, G, N/G, C): each device's samples pooled alone
        assert group is None, "virtual devices pool per device: no process group"
        bn, dev = _pool(_grouped(planes, groups), 1)
        return bn, dev.flatten(0, 1), float(n // groups * m)
    if group is None:
        bn, dev = _pool(planes, 0)
        return bn, dev, float(n * m)
    import torch.distributed as dist

    mu, var = planes[0], planes[1]
    local = torch.cat([mu.sum(0) * m, mu.new_tensor([n * m])])
    dist.all_reduce(local, group=group)
    count = float(local[-1])  # NOTE: a host read, as SyncBatchNorm's
    mean = (local[:-1] / count)[None]
    dev = mu - mean
    second = torch.addcmul(var, dev, dev).sum(0) * m
    dist.all_reduce(second, group=group)
    return torch.stack([mean, (second / count)[None]]), dev, count


def _mixture_coeffs(
    planes: Tensor,
    ratios: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    eps: float,
    m: int,
    group: ProcessGroup | None,
    groups: int = 1,
) -> tuple[_Coeffs, float]:
    """The per-plane affine map of the mixture, and the BN element count (0 with running stats;
    per device with virtual devices).

    Args:
        planes: ``(2, N, C)`` per-plane means and variances.
        ratios: ``(2, 3)``: the mean and the variance ratios, IN, LN, BN.
        groups: virtual devices the batch statistics are pooled per (``ssn.virtual``).
    """
    ln, dev_ln = _pool(planes, 1)
    if bn_mean is None or bn_var is None:
        bn, dev_bn, count = _batch_pool(planes, m, group, groups)
    else:
        bn, dev_bn, count = torch.stack([bn_mean, bn_var]).to(planes.dtype)[:, None], None, 0.0
        groups = 1  # the running statistics are the same for every sample
    # NOTE: few ops on the (N, C) tensors (at 7x7 maps as large as a tenth of the activation, and
    # each one a dispatch): the mean and the variance are mixed together, (3, 2, 1, 1) ratios.
    r = ratios.to(planes.dtype).t()[..., None, None]
    mix = torch.mul(planes, r[IN]).addcmul_(ln, r[LN])
    _grouped(mix, groups).addcmul_(bn, _bn_ratio(r[BN], bn))  # (in place through the view)
    rstd = mix[1].add_(eps).rsqrt()
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    shift = (
        torch.mul(mix[0], scale).neg_()
        if bias is None
        else torch.addcmul(bias.to(scale.dtype), mix[0], scale, value=-1)
    )
    share = m / count if count else 0.0
    return _Coeffs(scale, shift, mix, rstd, planes, ln, bn, dev_ln, dev_bn, share, group, groups), count


def _mixture_coeffs_backward(
    c: _Coeffs, g_xc: Tensor, g_shift: Tensor, ratios: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Hand-written backward of ``_mixture_coeffs``.

    Args:
        g_xc, g_shift: per plane ``sum(g * (x - mu_in))`` and ``sum(g)`` (g: the output's grad).

    Returns:
        Grads of the planes ``(2, N, C)`` (mean, variance), of the ratios ``(2, 3)``, of the
        weight and of the bias. (Autograd over these tiny ops costs more than the big passes on
        small activations.)
    """
    ch = g_xc.shape[1]
    mean, ve = c.mix[0], c.mix[1]
    # sum(g * (x - mean)): the grad of scale before the weight
    g_sc = torch.addcmul(g_xc, g_shift, c.planes[0] - mean)
    g_weight = None if weight is None else torch.linalg.vecdot(g_sc, c.rstd, dim=0)
    # grads of the mixed mean and variance (y = (x - mean) * scale, scale = weight / sqrt(ve))
    g_mix = torch.empty_like(c.planes)
    torch.mul(g_shift, c.scale, out=g_mix[0]).neg_()
    torch.mul(g_sc, c.scale, out=g_mix[1]).div_(ve).mul_(-0.5)
    # what reaches LN and BN (per virtual device: each device's samples)
    g_n, g_c = g_mix.sum(2, keepdim=True), _grouped(g_mix, c.groups).sum(-2, keepdim=True)
    flat = lambda t: t.flatten(1)  # noqa: E731
    g_ratios = torch.stack(
        [
            torch.linalg.vecdot(flat(g_mix), flat(c.planes)),
            torch.linalg.vecdot(flat(g_n), flat(c.ln)),
            torch.linalg.vecdot(flat(g_c), flat(c.bn)),
        ],
        1,
    )
    r = ratios.to(g_mix.dtype).t()[..., None, None]
    # LN statistics pool over channels: mu_ln = mean_c mu_in, var_ln = mean_c(var_in) + var_c(mu_in);
    # BN statistics likewise over the batch (and the processes)
    g_ln = g_n * (r[LN] / ch)
    g_planes = torch.mul(g_mix, r[IN]).add_(g_ln)
    g_planes[0].addcmul_(c.dev_ln, g_ln[1], value=2)
    if c.dev_bn is not None:
        g_bn = g_c * _bn_ratio(r[BN], g_c)
        if c.group is not None:
            import torch.distributed as dist

            dist.all_reduce(g_bn, group=c.group)  # the pooled statistics depend on every rank's planes
        g_bn = g_bn.mul_(c.bn_share)
        _grouped(g_planes, c.groups).add_(g_bn)
        _grouped(g_planes[0], c.groups).addcmul_(_grouped(c.dev_bn, c.groups), g_bn[1], value=2)
    return g_planes, g_ratios, g_weight, g_shift.sum(0)


class _RunningStats(Protocol):
    """What the running-statistics updates read and write: an SN/SSN layer, a LatchedNorm."""

    momentum: float | None
    in_var_correction: int
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor


def _batch_momentum(module: _RunningStats) -> float:
    """Weight of the current batch in the running averages (PyTorch's convention)."""
    if module.momentum is None:  # cumulative moving average, as in nn.BatchNorm
        return 1.0 / float(module.num_batches_tracked)
    return module.momentum


@torch.no_grad()
def _update_running(module: _RunningStats, mean: Tensor, var: Tensor, count: float) -> None:
    """Running BN statistics after a training batch with biased pooled ``var`` over ``count``.

    ``mean`` and ``var`` are ``(C,)``, or ``(G, C)`` per virtual device (``count`` then per device):
    each device's copy of the buffers is updated with its own statistics and the copies averaged,
    as :func:`ssn.average_running_stats` averages real devices' buffers.

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
        if new.dim() == 2:  # per virtual device: (G, C) copies, averaged in float64
            wide = buf.dtype in _WIDE
            per = (buf if wide else buf.float()).lerp(new.to(buf.dtype if wide else torch.float32), m)
            buf.copy_(per.to(buf.dtype).to(torch.float64).mean(0))
        elif buf.dtype in _WIDE:
            buf.lerp_(new.to(buf.dtype), m)
        else:
            buf.copy_(buf.float().lerp_(new.float(), m))


def _check_input(module: nn.Module, x: Tensor, spatial_dims: int, layout: str) -> None:
    """Refuse, with what was expected, inputs the layers cannot normalise."""
    name = type(module).__name__
    want = spatial_dims + 2
    if x.dim() != want:
        raise ValueError(
            f"{name} expects a {want}-D input {layout}, got {x.dim()}-D of shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input {layout}, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(
            f"{name} expects a non-empty batch and spatial map {layout}, got shape {tuple(x.shape)}"
        )
