"""The fused eager path of the mixture: one ``autograd.Function`` with a hand-written backward
over the activation, built from per-plane kernels (moments, affine map, gradient sums) that run
the native batch-norm kernels on a (1, N*C, M) view of a contiguous input, and broadcast ops on
an (N, M, C) view of a channels-last one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import _Coeffs, _mixture_coeffs, _mixture_coeffs_backward, float32_at_least

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# NOTE: the blocked loops' temporaries: 256 KB in float32, so a block and its temporary stay in
# a core's L2 instead of spilling to L3 and evicting what the next convolution reads; at most
# _MAX_BLOCKS per call, so large activations do not pay the per-op cost of hundreds of blocks.
_BLOCK_ELEMS = 1 << 16
_MAX_BLOCKS = 32


def _block_step(rows: int, row_elems: int) -> int:
    """Rows per block: ~``_BLOCK_ELEMS`` elements, at most ``_MAX_BLOCKS`` blocks."""
    return max(1, _BLOCK_ELEMS // row_elems, -(-rows // _MAX_BLOCKS))


def _flat(x: Tensor) -> Tensor | None:
    """``x`` as a (1, N*C, M) view, each (n, c) plane a 'channel' of the native BN kernels."""
    return x.view(1, x.shape[0] * x.shape[1], -1) if x.is_contiguous() else None


def _nhwc(x: Tensor) -> Tensor | None:
    """A channels-last ``x`` (memory ordered N, spatial..., C) as an (N, M, C) view.

    NOTE: in this layout the per-plane ops broadcast over the middle dim with the channels
    contiguous innermost, which the CPU's elementwise and reduction kernels vectorise: one
    ``addcmul`` is the whole affine map, where the generic strided path needs two passes.
    """
    t = x.permute(0, *range(2, x.dim()), 1)
    return t.view(x.shape[0], -1, x.shape[1]) if t.is_contiguous() else None


def _from_nhwc(y: Tensor, like: Tensor) -> Tensor:
    """The (N, M, C) ``y`` as a tensor of ``like``'s shape (and channels-last strides)."""
    n, c = like.shape[:2]
    return y.view((n,) + like.shape[2:] + (c,)).permute(0, like.dim() - 1, *range(1, like.dim() - 1))


def _plane_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with per-(n, c) coefficients, in one fused pass where possible.

    NOTE: on a contiguous input this runs the native eval-mode batch-norm kernel with zero mean,
    unit variance and eps 0, which is exactly an affine map and ~1.5x faster on the CPU than
    ``mul`` + ``add_`` (and than ``addcmul``, whose broadcast ``self`` takes a slow path).
    """
    flat = _flat(x)
    if flat is None:
        xv = _nhwc(x)
        if xv is not None:  # (detach(): see below)
            return _from_nhwc(torch.addcmul(shift[:, None], xv, scale[:, None]), x).detach()
        view = scale.shape + (1,) * (x.dim() - 2)
        return torch.mul(x, scale.view(view)).add_(shift.view(view))
    s, b = scale.reshape(-1), shift.reshape(-1)
    y = F.batch_norm(flat, torch.zeros_like(s), torch.ones_like(s), s, b, False, 0.0, 0.0)
    # NOTE: detach() drops the view relation, so the layer's output can be modified in place
    # (torchvision's ReLU(inplace=True)); there is no graph inside the autograd.Function anyway.
    return y.view_as(x).detach()


def _cache_blocked(x: Tensor) -> bool:
    """Whether ``x`` takes the CPU kernels (cache-blocked loops, native-kernel tricks).

    NOTE: on the CPU the blocked centred-variance loop keeps its temporary in cache; on a GPU its
    many small launches cost more than one Welford reduction (``torch.var_mean``), which is
    exact and a single kernel there. Tests flip this to run the device path on the CPU.
    """
    return x.device.type == "cpu"


def _plane_moments(x: Tensor, correction: int = 0) -> Tensor:
    """Per-(n, c) mean and variance over the spatial dims (biased unless ``correction`` is 1),
    stacked: ``(2, N, C)``.

    NOTE: on the CPU, two passes (mean, then the centred squares) are exact where E[x^2] - E[x]^2
    is not, and ~3x faster than torch.var_mean's Welford reduction. The centred values are
    formed a block of planes at a time, so the temporary stays in cache instead of costing a
    fresh activation-sized allocation (page faults and zeroing) on every call. Elsewhere (CUDA):
    one var_mean kernel.
    """
    spatial = tuple(range(2, x.dim()))
    m = math.prod(x.shape[2:])
    if not _cache_blocked(x):
        var, mu = torch.var_mean(x, spatial, correction=0)
        return torch.stack([mu, var if correction == 0 else var * (m / _dof(m, correction))])
    out = x.new_empty((2,) + x.shape[:2])
    mu, var = out[0], out[1]
    flat = _flat(x)
    xv = None if flat is not None else _nhwc(x)
    if flat is not None:
        torch.mean(x, spatial, out=mu)
        rows, mu_rows, var_rows = flat[0], mu.view(-1, 1), var.view(-1)
        step = _block_step(rows.shape[0], m)
        for i in range(0, rows.shape[0], step):
            xc = rows[i : i + step] - mu_rows[i : i + step]
            torch.sum(xc.square_(), -1, out=var_rows[i : i + step])
    elif xv is not None:  # channels-last: reductions over the (N, M, C) view's middle dim
        # NOTE: not blocked: reductions over the middle dim of a few samples vectorise poorly (the
        # blocked loop measured 4-6x slower than one activation-sized temporary)
        torch.mean(xv, 1, out=mu)
        torch.sum((xv - mu[:, None]).square_(), 1, out=var)
    else:
        torch.mean(x, spatial, out=mu)
        xc = x - mu.view(mu.shape + (1,) * len(spatial))
        torch.sum(xc.square_(), spatial, out=var)
    var.div_(_dof(m, correction))
    return out


def _plane_sums(x: Tensor, unit: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum(x)`` and ``sum(x * x)`` over the spatial dims of a contiguous ``x``, ``(N, C)``
    each, in one read: the raw moments (no backward; see ``_plane_sums_eval`` for when they
    serve).

    NOTE: the native batch-norm backward with zero mean and unit inverse std returns both sums of
    every plane from one fused read of ``x`` (its grad_weight and grad_bias), where two-pass
    moments read it twice; small maps (7x7, 14x14) gain most. ``unit``: those zeros and ones,
    ``(N*C,)`` each, when the caller keeps them.
    """
    flat = x.view(1, x.shape[0] * x.shape[1], -1)
    zeros, ones = unit if unit is not None else (x.new_zeros(flat.shape[1]), x.new_ones(flat.shape[1]))
    _, sq, total = torch.ops.aten.native_batch_norm_backward(
        flat, flat, None, None, None, zeros, ones, True, 0.0, [False, True, True]
    )
    return total.view(x.shape[:2]), sq.view(x.shape[:2])


# NOTE: raw moments give a plane's variance as s2/M - mu^2, whose float32 rounding error is about
# c * eps * (mu^2 + var) (c: the summation's growth, ~1-10 here): relative to var, c * eps * (1 + r^2)
# with r = |mu| / std. Against float64 (benchmarks/precision.py), a layer fed raw moments stays
# within a few times the native InstanceNorm's output error up to r = 1, and the error grows as r^2
# beyond (0.46 at r = 1000 on a 28x28 map); so raw moments serve only the planes with mu^2 <= var.


def _plane_sums_eval(x: Tensor, unit: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum(x)`` and centred ``sum((x - mu)^2)``, ``(N, C)`` each, as exact as the
    two-pass moments, for evaluation (no backward), in one read where the data allows. (Sums, not
    means: the caller folds the 1/M and the degrees of freedom into its own constants.)

    NOTE: on the CPU the raw sums (one read: ``_plane_sums``, or two reductions over a channels-last
    input's (N, M, C) view) serve every plane whose mean is within one standard deviation of zero
    (the activations of a normalised network, mostly). The planes whose raw variance could cancel
    (large means, constant planes) are recomputed two-pass: gathered, when they are a minority of a
    contiguous input's, so a layer pays for exactness in proportion to the planes that need it;
    otherwise the whole input. CUDA: ``_plane_moments`` (one exact var_mean kernel).
    """
    m = math.prod(x.shape[2:])
    flat = _flat(x)
    xv = None if flat is not None else _nhwc(x)
    if not _cache_blocked(x) or (flat is None and xv is None):
        total, centred = _plane_moments(x).mul_(m)  # (mean, variance) * M
        return total, centred
    s1, s2 = _plane_sums(x, unit) if xv is None else (xv.sum(1), xv.square().sum(1))
    ss = s2.addcmul_(s1, s1, value=-1 / m)  # (a fresh output of the sums: modified in place)
    # var < mu^2, i.e. ss < s1^2 / M (an all-zero plane passes: its raw moments are exact)
    margin = torch.addcmul(ss, s1, s1, value=-1 / m)
    if float(margin.min()) < 0:  # NOTE: a host read, which costs no sync on the CPU
        bad = margin.view(-1).lt_(0).nonzero().view(-1)
        if flat is None or 2 * bad.numel() > s1.numel():
            total, centred = _plane_moments(x).mul_(m)
            return total, centred
        rows = flat[0].index_select(0, bad)
        s1_bad = rows.sum(1, keepdim=True)
        s1.view(-1).index_copy_(0, bad, s1_bad.view(-1))
        ss.view(-1).index_copy_(0, bad, rows.sub_(s1_bad, alpha=1 / m).square_().sum(1))
    return s1, ss


def _dof(m: int, correction: int) -> int:
    # NOTE: a single element has no unbiased variance; use 0 rather than NaN (1x1 maps).
    return max(m - correction, 1)


def _plane_grad_sums(g: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum(g * (x - mu))`` and ``sum(g)`` over the spatial dims, in one pass."""
    gf, xf = _flat(g), _flat(x)
    if gf is None or xf is None:
        gv, xv = _nhwc(g), _nhwc(x)
        if gv is not None and xv is not None:  # channels-last (as in _plane_moments)
            return (xv - mu[:, None]).mul_(gv).sum(1), gv.sum(1)
        spatial = tuple(range(2, x.dim()))
        g_sum = g.sum(spatial)
        return (g * x).sum(spatial) - mu * g_sum, g_sum
    # NOTE: the native batch-norm backward with unit inverse std computes exactly these two
    # reductions (its grad_weight and grad_bias) in one fused pass over g and x.
    mu = mu.reshape(-1)
    _, g_xc, g_sum = torch.ops.aten.native_batch_norm_backward(
        gf, xf, None, None, None, mu, torch.ones_like(mu), True, 0.0, [False, True, True]
    )
    return g_xc.view(x.shape[:2]), g_sum.view(x.shape[:2])


def _centre_first(mu: Tensor, var: Tensor) -> bool:
    """Whether the backward's variance term ``(x - mu) * c2`` must be formed from the centred
    input rather than as ``x * c2 - mu * c2``.

    NOTE: the affine form rounds at ``eps * |mu * c2|``, the centred one at ``eps * |x - mu| * |c2|``
    (what the native batch-norm backward does); the two agree within 64x while a plane's mean is
    within 64 standard deviations of zero. Beyond (constant planes, large means with a tiny spread,
    where ``c2`` grows as the mixed variance falls below eps), the centred input costs one extra
    pass over the activation. One host read (free on the CPU).
    """
    return bool(torch.addcmul(var, mu, mu, value=-1 / 4096).min() < 0)


class _SwitchNormFn(torch.autograd.Function):
    """Mixture normalisation with a hand-written backward.

    Autograd through the naive formula reads and writes the activation ~9 times in the backward;
    here it is one fused reduction and two elementwise passes. The small (N, C) graph from the
    statistics, ratios and affine parameters to the per-plane scale and shift has a hand-written
    backward too (``stats._mixture_coeffs_backward``), in few ops: on small maps (7x7 at batch 8)
    the dispatch of each op costs as much as a pass over the activation.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        ratios: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        bn_mean: Tensor | None,
        bn_var: Tensor | None,
        eps: float,
        correction: int,
        group: ProcessGroup | None,
        groups: int = 1,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(y, batch_mean, batch_var, count)``; ``ratios`` is ``(2, 3)``: mean and variance
        ratios over IN, LN, BN. The batch statistics (biased, over ``count`` elements per channel,
        a CPU tensor so reading it syncs nothing) are empty with running statistics; with
        ``groups`` virtual devices they are ``(G, C)``, each device's, over its ``count``."""
        # NOTE: statistics in float32 at least (fp16/bf16 inputs under autocast).
        xs = float32_at_least(x)
        m = math.prod(xs.shape[2:])
        planes = _plane_moments(xs, correction)
        c, count = _mixture_coeffs(planes, ratios, weight, bias, bn_mean, bn_var, eps, m, group, groups)
        y = _plane_affine(xs, c.scale, c.shift)
        # NOTE: the input is saved as it came (fp16/bf16 under autocast) and widened again in the
        # backward: saving the float32 copy would double the activation memory of the network.
        ctx.save_for_backward(x, ratios, weight)
        ctx.coeffs = c
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.dof = _dof(m, correction)
        if c.dev_bn is None:
            batch_mean = batch_var = planes.new_empty(0)
        else:
            batch_mean, batch_var = c.bn[0, ..., 0, :], c.bn[1, ..., 0, :]  # (C,), or (G, C)
        n = torch.tensor(count)
        ctx.mark_non_differentiable(batch_mean, batch_var, n)
        return y.to(x.dtype), batch_mean, batch_var, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, ratios, weight = ctx.saved_tensors
        xs = float32_at_least(x)
        c: _Coeffs = ctx.coeffs
        mu = c.planes[0]
        g = grad_y.to(xs.dtype)
        g_xc, g_shift = _plane_grad_sums(g, xs, mu)
        g_planes, g_ratios, g_w, g_b = _mixture_coeffs_backward(c, g_xc, g_shift, ratios, weight)
        # d mu_in / dx = 1/M and d var_in / dx = 2 (x - mu_in) / dof, so
        # grad_x = g * scale + g_mu / M + (x - mu_in) * 2 g_var / dof: one affine + one addcmul.
        m = math.prod(xs.shape[2:])
        c2 = g_planes[1].mul_(2 / ctx.dof)
        g_mu = g_planes[0].div_(m)
        if m == 1:  # a single element is its own mean: the variance path contributes exactly 0
            grad_x = _plane_affine(xs, c2.zero_(), g_mu)
        elif _centre_first(mu, c.planes[1]):
            grad_x = _plane_affine(xs - mu.view(mu.shape + (1,) * (xs.dim() - 2)), c2, g_mu)
        else:
            grad_x = _plane_affine(xs, c2, g_mu.addcmul_(c2, mu, value=-1))
        grad_x = grad_x.addcmul_(g, c.scale.view(c.scale.shape + (1,) * (xs.dim() - 2)))
        need = ctx.needs_input_grad
        return (
            grad_x.to(grad_y.dtype),
            g_ratios.to(ratios.dtype) if need[1] else None,
            g_w.to(weight.dtype) if need[2] and g_w is not None else None,
            g_b.to(ctx.bias_dtype) if need[3] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
