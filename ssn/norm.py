"""Switchable Normalization (SN) and Sparse Switchable Normalization (SSN) layers.

Both normalise with a mixture of instance (IN), layer (LN) and batch (BN) statistics, with separate
learned importance ratios for the means and the variances:

    mean = m_in * mu_in + m_ln * mu_ln + m_bn * mu_bn
    var  = v_in * var_in + v_ln * var_ln + v_bn * var_bn
    y    = (x - mean) / sqrt(var + eps) * weight + bias

SN maps the ratio logits with a softmax, SSN with SparsestMax at the layer's ``radius``. Once an SSN
ratio is one-hot it latches: the choice is kept in the state_dict, the logits stop mattering, and
the layer computes only the statistics it selected (through the native kernel when mean and
variance agree, so a fully latched layer costs what ``BatchNorm``/``InstanceNorm``/``GroupNorm(1, C)``
costs).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import PROJECTIONS, authors_sparsestmax, max_radius, sparsestmax

__all__ = [
    "STATS",
    "LatchedNorm",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
]

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


_BLOCK_ELEMS = 1 << 20  # elements of the temporary in _plane_moments (4 MB in float32)


def _flat(x: Tensor) -> Tensor | None:
    """``x`` as a (1, N*C, M) view, each (n, c) plane a 'channel' of the native BN kernels."""
    return x.view(1, x.shape[0] * x.shape[1], -1) if x.is_contiguous() else None


def _plane_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with per-(n, c) coefficients, in one fused pass where possible.

    NOTE: on a contiguous input this runs the native eval-mode batch-norm kernel with zero mean,
    unit variance and eps 0, which is exactly an affine map and ~1.5x faster on the CPU than
    ``mul`` + ``add_`` (and than ``addcmul``, whose broadcast ``self`` takes a slow path).
    """
    flat = _flat(x)
    if flat is None:
        view = scale.shape + (1,) * (x.dim() - 2)
        return torch.mul(x, scale.view(view)).add_(shift.view(view))
    s, b = scale.reshape(-1), shift.reshape(-1)
    ones = torch.ones_like(s)
    y = F.batch_norm(flat, torch.zeros_like(s), ones, s, b, False, 0.0, 0.0)
    # NOTE: detach() drops the view relation, so the layer's output can be modified in place
    # (torchvision's ReLU(inplace=True)); there is no graph inside the autograd.Function anyway.
    return y.view_as(x).detach()


def _plane_moments(x: Tensor, correction: int = 0) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and variance over the spatial dims (biased unless ``correction`` is 1).

    NOTE: two passes (mean, then the centred squares) are exact where E[x^2] - E[x]^2 is not,
    and on the CPU ~3x faster than torch.var_mean's Welford reduction. The centred values are
    formed a block of planes at a time, so the temporary stays in cache instead of costing a
    fresh activation-sized allocation (page faults and zeroing) on every call.
    """
    spatial = tuple(range(2, x.dim()))
    mu = x.mean(spatial)
    flat = _flat(x)
    if flat is None:
        xc = x - mu.view(mu.shape + (1,) * len(spatial))
        return mu, (xc * xc).sum(spatial) / _dof(math.prod(x.shape[2:]), correction)
    planes, m = flat.shape[1], flat.shape[2]
    rows, mu_rows = flat[0], mu.view(-1, 1)
    var = torch.empty_like(mu).view(-1)
    step = max(1, _BLOCK_ELEMS // m)
    for i in range(0, planes, step):
        xc = rows[i : i + step] - mu_rows[i : i + step]
        torch.sum(xc.square_(), -1, out=var[i : i + step])
    return mu, (var / _dof(m, correction)).view_as(mu)


def _dof(m: int, correction: int) -> int:
    # NOTE: a single element has no unbiased variance; use 0 rather than NaN (1x1 maps).
    return max(m - correction, 1)


def _plane_grad_sums(g: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum(g * (x - mu))`` and ``sum(g)`` over the spatial dims, in one pass."""
    gf, xf = _flat(g), _flat(x)
    if gf is None or xf is None:
        spatial = tuple(range(2, x.dim()))
        g_sum = g.sum(spatial)
        return (g * x).sum(spatial) - mu * g_sum, g_sum
    # NOTE: the native batch-norm backward with unit inverse std computes exactly these two
    # reductions (its grad_weight and grad_bias) in one fused pass over g and x.
    ones = torch.ones_like(mu.reshape(-1))
    _, g_xc, g_sum = torch.ops.aten.native_batch_norm_backward(
        gf, xf, None, None, None, mu.reshape(-1), ones, True, 0.0, [False, True, True]
    )
    return g_xc.view_as(mu), g_sum.view_as(mu)


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


class _SwitchNormFn(torch.autograd.Function):
    """Mixture normalisation with a hand-written backward over the activation.

    Autograd through the naive formula reads and writes the activation ~9 times in the backward;
    here it is one fused reduction and two elementwise passes, while the small (N, C) graph from
    the statistics, ratios and affine parameters to the per-plane scale and shift is
    differentiated by autograd inside.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        mean_ratio: Tensor,
        var_ratio: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        bn_mean: Tensor | None,
        bn_var: Tensor | None,
        eps: float,
        correction: int,
        group: object,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # NOTE: statistics in float32 at least (fp16/bf16 inputs under autocast).
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        m = math.prod(xs.shape[2:])
        mu_in, var_in = _plane_moments(xs, correction)
        c, stats = _mixture_coeffs(
            mu_in, var_in, mean_ratio, var_ratio, weight, bias, bn_mean, bn_var, eps, m, group
        )
        y = _plane_affine(xs, c.scale, c.shift)
        ctx.save_for_backward(xs, mean_ratio, var_ratio, weight)
        ctx.coeffs = c
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.dof = _dof(m, correction)
        if stats is None:
            empty = mu_in.new_empty(0)
            batch = (empty, empty, mu_in.new_tensor(0.0))
        else:
            batch = (stats.mean.squeeze(0), stats.var.squeeze(0), mu_in.new_tensor(stats.count))
        ctx.mark_non_differentiable(*batch)
        return (y.to(x.dtype), *batch)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor, *_: Tensor):  # type: ignore[override]
        xs, mean_ratio, var_ratio, weight = ctx.saved_tensors
        c: _Coeffs = ctx.coeffs
        mu = c.mus[IN]
        g = grad_y.to(xs.dtype)
        g_xc, g_shift = _plane_grad_sums(g, xs, mu)
        g_scale = g_xc + mu * g_shift  # sum(g * x)
        g_mu, g_var, g_mr, g_vr, g_w, g_b = _mixture_coeffs_backward(c, g_scale, g_shift, mean_ratio, var_ratio, weight)
        # d mu_in / dx = 1/M and d var_in / dx = 2 (x - mu_in) / dof, so
        # grad_x = g * scale + g_mu / M + (x - mu_in) * 2 g_var / dof: one affine + one addcmul.
        m = math.prod(xs.shape[2:])
        c2 = g_var * (2 / ctx.dof)
        grad_x = _plane_affine(xs, c2, g_mu / m - c2 * mu)
        grad_x = grad_x.addcmul_(g, c.scale.view(c.scale.shape + (1,) * (xs.dim() - 2)))
        need = ctx.needs_input_grad
        return (
            grad_x.to(grad_y.dtype),
            g_mr.to(mean_ratio.dtype) if need[1] else None,
            g_vr.to(var_ratio.dtype) if need[2] else None,
            g_w.to(weight.dtype) if need[3] and weight is not None else None,
            g_b.to(ctx.bias_dtype) if need[4] else None,
            None,
            None,
            None,
            None,
            None,
        )


class _SwitchNorm(nn.Module):
    """Common implementation; subclasses fix the input rank and the ratio mapping."""

    spatial_dims: ClassVar[int]
    _layout: ClassVar[str]
    # NOTE: mmcv's build_norm_layer names the module after this: "bn" gives an mmcv ResNet
    # torchvision's keys (bn1, bn2, downsample.1), so classification checkpoints load into it.
    _abbr_: ClassVar[str] = "bn"

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    radius: Tensor
    mean_latch: Tensor
    var_latch: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        radius: float = 0.0,
        sync: bool = False,
        process_group: object = None,
        in_var_correction: int = 0,
    ) -> None:
        """
        Args:
            num_features: channels C.
            eps: added to the variance.
            momentum: weight of the new batch in the running BN statistics (PyTorch's
                convention), or None for a cumulative average.
            affine: learn a per-channel ``weight`` and ``bias``.
            radius: initial SparsestMax radius (SSN only; SN keeps it for a shared layout).
            sync: all-reduce the BN statistics over ``process_group`` (the default group when
                None) in training, like ``nn.SyncBatchNorm``; a no-op without a process group.
            in_var_correction: 0 for the biased instance variance of ``InstanceNorm`` (default),
                1 for the unbiased one of the authors' released layers (imported checkpoints).
        """
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1] (PyTorch's convention: the weight of the new batch), "
                f"got {momentum}"
            )
        if momentum is not None and momentum > 0.5:
            warnings.warn(
                f"momentum={momentum} weighs the new batch (PyTorch's convention); the SSN paper's "
                f"code uses the weight of the old value (0.997), which is momentum={1 - momentum:.3g} here",
                stacklevel=2,
            )
        if in_var_correction not in (0, 1):
            raise ValueError(f"in_var_correction must be 0 or 1, got {in_var_correction!r}")
        self.num_features = num_features
        self.sync = sync
        self.process_group = process_group
        self.in_var_correction = in_var_correction
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        # NOTE: zero logits mean equal ratios (uniform), the paper's initialisation.
        self.mean_logits = nn.Parameter(torch.zeros(len(STATS)))
        self.var_logits = nn.Parameter(torch.zeros(len(STATS)))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # NOTE: SN keeps radius and latches too, so SN and SSN checkpoints share one layout.
        self.register_buffer("radius", torch.tensor(float(radius)))
        self.register_buffer("mean_latch", torch.tensor(UNLATCHED, dtype=torch.long))
        self.register_buffer("var_latch", torch.tensor(UNLATCHED, dtype=torch.long))
        self._latch_cache: tuple[tuple[int, ...], tuple[int, int]] | None = None

    # ----------------------------------------------------------------------------- ratios
    def _map_logits(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def _latches(self) -> tuple[int, int]:
        # NOTE: mirrored on the host so the latched fast path needs no device sync and
        # torch.compile sees plain ints. The mirror is keyed on the buffers' identity and version
        # counters, so any in-place write (DDP's buffer broadcast, an EMA copy_, load_state_dict
        # on any module, a direct fill_) or replacement (.to(), assign=True) re-reads it.
        if torch.compiler.is_compiling():
            return self._latch_cache[1] if self._latch_cache else (int(self.mean_latch), int(self.var_latch))
        ml, vl = self.mean_latch, self.var_latch
        key = (id(ml), ml._version, id(vl), vl._version)
        if self._latch_cache is None or self._latch_cache[0] != key:
            self._latch_cache = (key, (int(ml), int(vl)))
        return self._latch_cache[1]

    def _refresh_latches(self) -> None:
        """Re-read the latch buffers into the host-side mirror."""
        self._latch_cache = None
        self._latches()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[no-untyped-def]
        # NOTE: a NaN radius would make every ratio NaN; a latch outside the statistics would index
        # nothing. Both are refused here, with the key, rather than failing obscurely later.
        radius = state_dict.get(prefix + "radius")
        if isinstance(radius, Tensor) and not bool(torch.isfinite(radius).all() and (radius >= 0).all()):
            error_msgs.append(f"{prefix}radius must be a finite non-negative number, got {radius.tolist()}")
            return
        for key in ("mean_latch", "var_latch"):
            latch = state_dict.get(prefix + key)
            if isinstance(latch, Tensor) and int(latch) not in (UNLATCHED, *range(len(STATS))):
                error_msgs.append(f"{prefix}{key} must be -1 (unlatched) or 0-2 (IN, LN, BN), got {int(latch)}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._refresh_latches()

    @torch.no_grad()
    def latch(self, mean: str | None, var: str | None) -> None:
        """Fix the mean and/or variance to one statistic (``'in'``, ``'ln'``, ``'bn'``; None
        unlatches), as training does when a ratio becomes one-hot."""
        for buf, stat in ((self.mean_latch, mean), (self.var_latch, var)):
            if stat is not None and stat not in STATS:
                raise KeyError(f"unknown statistic {stat!r}; valid: {', '.join(STATS)}")
            buf.fill_(UNLATCHED if stat is None else STATS.index(stat))
        self._refresh_latches()

    def _ratio(self, logits: Tensor, latch: int) -> Tensor:
        if latch != UNLATCHED:
            return F.one_hot(torch.tensor(latch, device=logits.device), len(STATS)).to(logits.dtype)
        return self._map_logits(logits)

    def ratios(self) -> tuple[Tensor, Tensor]:
        """The mean and variance importance ratios, probabilities in IN, LN, BN order."""
        ml, vl = self._latches()
        if ml == vl == UNLATCHED:  # one batched call for both: the ratio maps are many tiny ops
            both = self._map_logits(torch.stack([self.mean_logits, self.var_logits]))
            return both[0], both[1]
        return self._ratio(self.mean_logits, ml), self._ratio(self.var_logits, vl)

    @property
    def latched(self) -> tuple[str | None, str | None]:
        """The statistic each of mean and variance has latched to (``None`` while dense)."""
        return tuple(STATS[i] if i != UNLATCHED else None for i in self._latches())  # type: ignore[return-value]

    def _maybe_latch(self, mean_ratio: Tensor, var_ratio: Tensor) -> tuple[int, int]:
        """Latch the ratios that are exactly one-hot; SN's softmax never latches."""
        return self._latches()

    # ---------------------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        _check_input(self, x, self.spatial_dims, self._layout)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels "
                f"(input shape {tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        ml, vl = self._latches()
        if ml == vl != UNLATCHED and self._native_ok(x, ml):
            return self._native(x, ml)
        mean_ratio, var_ratio = self.ratios()
        if self.training and UNLATCHED in (ml, vl):
            # NOTE: a ratio that just became one-hot has a zero Jacobian, so the ratios computed
            # before latching are reused as they are.
            ml, vl = self._maybe_latch(mean_ratio, var_ratio)
            if ml == vl != UNLATCHED and self._native_ok(x, ml):
                return self._native(x, ml)
        tie = self._tie_unused()
        if tie is not None:
            mean_ratio = mean_ratio + tie
        return self._mixture(x, mean_ratio, var_ratio)

    def _sync_group(self) -> object:
        """The process group to synchronise BN statistics over, or None (no sync this call)."""
        if not (self.sync and self.training):
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _native_ok(self, x: Tensor, stat: int) -> bool:
        """Whether the native kernel computes exactly this layer on ``x``.

        InstanceNorm refuses a single spatial element and, in training, BatchNorm a single value
        per channel (DeepLab's image pooling at batch 1); synchronised BN statistics and the
        unbiased instance variance have no native kernel here. The mixture path covers all of
        these (zero variance rather than NaN).
        """
        if stat == BN and not self.training:
            return True
        if self.in_var_correction or (stat == BN and self._sync_group() is not None):
            return False
        if stat == IN:
            return math.prod(x.shape[2:]) > 1
        if stat == BN:
            return x.numel() // x.shape[1] > 1
        return True

    def _tie_unused(self) -> Tensor | None:
        """Under DDP, a zero tied to both ratio logits, for outputs whose graph may miss them.

        NOTE: DistributedDataParallel without find_unused_parameters fails when a parameter gets
        no gradient: a latched ratio is a constant, and a fully latched layer without affine
        parameters uses no parameter at all. Adding this zero to a tensor the output depends on
        gives every logit a zero gradient (no update). A single process leaves the grads None.
        """
        if not (self.training and torch.is_grad_enabled() and torch.distributed.is_available()):
            return None
        if not torch.distributed.is_initialized():
            return None
        if self._latches() == (UNLATCHED, UNLATCHED):
            return None  # both ratios come from the logits: every logit is in the graph
        return 0.0 * (self.mean_logits.sum() + self.var_logits.sum())

    def _native(self, x: Tensor, stat: int) -> Tensor:
        """Fully latched: the native kernel of the selected normaliser."""
        weight, tie = self.weight, self._tie_unused()
        if tie is not None:
            weight = (weight if weight is not None else x.new_ones(self.num_features)) + tie.to(x.dtype)
        bias = self.bias
        if weight is not None and bias is None:
            bias = x.new_zeros(self.num_features)  # F.instance_norm / group_norm take both or neither
        if stat == BN:
            if self.training:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(
                x, self.running_mean, self.running_var, weight, bias,
                self.training, _batch_momentum(self) if self.training else 0.0, self.eps,
            )
        if stat == IN:
            return F.instance_norm(x, weight=weight, bias=bias, eps=self.eps)
        return F.group_norm(x, 1, weight, bias, self.eps)

    def _mixture(self, x: Tensor, mean_ratio: Tensor, var_ratio: Tensor) -> Tensor:
        training = self.training
        bn_mean = None if training else self.running_mean
        bn_var = None if training else self.running_var
        y, batch_mean, batch_var, count = _SwitchNormFn.apply(
            x, mean_ratio, var_ratio, self.weight, self.bias, bn_mean, bn_var, self.eps,
            self.in_var_correction, self._sync_group(),
        )
        if training:
            _update_running(self, batch_mean, batch_var, float(count))
        return y

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        if self.sync:
            s += ", sync=True"
        if self.in_var_correction:
            s += ", in_var_correction=1"
        if getattr(self, "projection", "exact") != "exact":
            s += f", projection={self.projection}"
        ml, vl = self.latched
        if ml or vl:
            s += f", latched=(mean={ml}, var={vl})"
        return s


class _Softmax(_SwitchNorm):
    def _map_logits(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)


class _Sparsest(_SwitchNorm):
    def __init__(self, num_features: int, *, projection: str = "exact", **kwargs: Any) -> None:
        """
        Args:
            num_features, **kwargs: as for the SN layers (eps, momentum, affine, radius, sync, ...).
            projection: ``"exact"``: the Euclidean projection (:func:`ssn.sparsestmax`);
                ``"authors"``: the released code's approximation (:func:`ssn.authors_sparsestmax`),
                to rebuild exactly a network their code saved before every layer was fixed.
        """
        super().__init__(num_features, **kwargs)
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        self.projection = projection

    def _map_logits(self, logits: Tensor) -> Tensor:
        if self.projection == "authors":
            return authors_sparsestmax(logits, self.radius.to(logits.dtype))
        return sparsestmax(logits, self.radius.to(logits.dtype))

    def _maybe_latch(self, mean_ratio: Tensor, var_ratio: Tensor) -> tuple[int, int]:
        latches = list(self._latches())
        with torch.no_grad():
            ratios = torch.stack([mean_ratio, var_ratio])
            hot, which = ratios.max(-1)
            state = torch.cat([hot == 1, which]).tolist()  # one host sync for both
        for i, buf in enumerate((self.mean_latch, self.var_latch)):
            if latches[i] == UNLATCHED and state[i]:
                buf.fill_(state[2 + i])
                latches[i] = state[2 + i]
        self._latch_cache = None
        return self._latches()

    @property
    def max_radius(self) -> float:
        """The radius at which every ratio is one-hot, ``sqrt(2/3)`` for three statistics."""
        return max_radius(len(STATS))


class SwitchNorm1d(_Softmax):
    """Switchable Normalization over (N, C, L) inputs: softmax ratios over IN, LN, BN."""

    spatial_dims = 1
    _layout = "(N, C, L)"


class SwitchNorm2d(_Softmax):
    """Switchable Normalization over (N, C, H, W) inputs: softmax ratios over IN, LN, BN."""

    spatial_dims = 2
    _layout = "(N, C, H, W)"


class SwitchNorm3d(_Softmax):
    """Switchable Normalization over (N, C, T, H, W) inputs: softmax ratios over IN, LN, BN."""

    spatial_dims = 3
    _layout = "(N, C, T, H, W)"


class SparseSwitchNorm1d(_Sparsest):
    """Sparse Switchable Normalization over (N, C, L) inputs: SparsestMax ratios over IN, LN, BN."""

    spatial_dims = 1
    _layout = "(N, C, L)"


class SparseSwitchNorm2d(_Sparsest):
    """Sparse Switchable Normalization over (N, C, H, W) inputs: SparsestMax ratios over IN, LN, BN."""

    spatial_dims = 2
    _layout = "(N, C, H, W)"


class SparseSwitchNorm3d(_Sparsest):
    """Sparse Switchable Normalization over (N, C, T, H, W) inputs: SparsestMax ratios."""

    spatial_dims = 3
    _layout = "(N, C, T, H, W)"


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
    ) -> None:
        super().__init__()
        for s in (mean_stat, var_stat):
            if s not in STATS:
                raise KeyError(f"unknown statistic {s!r}; valid: {', '.join(STATS)}")
        self.num_features, self.spatial_dims = num_features, spatial_dims
        self.eps, self.momentum, self.affine = eps, momentum, affine
        self.in_var_correction = in_var_correction
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
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
        eye = torch.eye(len(STATS), device=x.device)
        y, batch_mean, batch_var, count = _SwitchNormFn.apply(
            x, eye[self.mean_stat], eye[self.var_stat], self.weight, self.bias, None, None,
            self.eps, self.in_var_correction, None,
        )
        _update_running(self, batch_mean, batch_var, float(count))
        return y

    def _eval(self, x: Tensor) -> Tensor:
        """Only the selected statistics, in plain ops (exportable with a dynamic batch)."""
        sp = tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * len(sp)
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
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
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, mean={STATS[self.mean_stat]}, var={STATS[self.var_stat]}, eps={self.eps}"
