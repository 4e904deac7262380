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
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import traceable
from .functional import PROJECTIONS, authors_sparsestmax, max_radius, sparsestmax
from .fused import _dof, _plane_affine, _plane_sums_eval, _SwitchNormFn
from .latched import LatchedNorm
from .stats import (  # noqa: F401  (BN, IN, LN re-exported: ssn.norm.BN)
    BN,
    IN,
    LN,
    STATS,
    UNLATCHED,
    _batch_momentum,
    _check_input,
    _update_running,
    float32_at_least,
)
from .virtual import check_virtual_devices, device_batch, grouped_batch_norm

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "STATS",
    "LatchedNorm",
    "SparseSwitchNormBase",
    "SwitchNormBase",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
]


class SwitchNormBase(nn.Module):
    """Every SN/SSN layer (``isinstance(m, ssn.SwitchNormBase)``); subclasses fix the input rank
    and the ratio mapping."""

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
        process_group: ProcessGroup | None = None,
        in_var_correction: int = 0,
        virtual_devices: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
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
            virtual_devices: G > 1 splits a training batch into G equal groups and takes the BN
                statistics of each, as G processes with per-device layers would (``ssn.virtual``);
                the running statistics are the average of the G devices'. Not with ``sync``.
            device, dtype: where and in which floating type parameters and buffers are created,
                PyTorch's factory keywords (``nn.BatchNorm2d`` takes them; timm passes them).
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
        if check_virtual_devices(virtual_devices) > 1 and sync:
            raise ValueError(
                f"virtual_devices={virtual_devices} takes per-device statistics; sync=True all-reduces "
                "them: choose one"
            )
        self.virtual_devices = virtual_devices
        self.num_features = num_features
        self.sync = sync
        self.process_group = process_group
        self.in_var_correction = in_var_correction
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        # NOTE: zero logits mean equal ratios (uniform), the paper's initialisation.
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.mean_logits = nn.Parameter(torch.zeros(len(STATS), **dd))
        self.var_logits = nn.Parameter(torch.zeros(len(STATS), **dd))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **dd))
            self.bias = nn.Parameter(torch.zeros(num_features, **dd))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **dd))
        self.register_buffer("running_var", torch.ones(num_features, **dd))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # NOTE: SN keeps radius and latches too, so SN and SSN checkpoints share one layout. The
        # radius is a floating buffer like the others: dtype= gives what .to(dtype) would.
        self.register_buffer("radius", torch.tensor(float(radius), **dd))
        self.register_buffer("mean_latch", torch.tensor(UNLATCHED, dtype=torch.long, device=device))
        self.register_buffer("var_latch", torch.tensor(UNLATCHED, dtype=torch.long, device=device))
        # NOTE: the mirror filled from the start, so a compiled forward reads constants; keyed on
        # the new buffers without reading them (their value is known: no device sync, and a layer
        # built on the meta device, as timm's factory keywords allow, has none to read).
        self._latch_key: tuple[int, ...] | None = None
        self._latch_state: tuple[int, int] = (UNLATCHED, UNLATCHED)
        self._mirror_latches(self._latch_state)
        self._fold: tuple[tuple[Any, ...], dict[Any, Any]] | None = None  # dense eval constants

    # ----------------------------------------------------------------------------- ratios
    def _map_logits(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def _latches(self) -> tuple[int, int]:
        # NOTE: mirrored on the host so the latched fast path needs no device sync and
        # torch.compile sees plain ints. The mirror is keyed on the buffers' identity and version
        # counters, so any in-place write (DDP's buffer broadcast, an EMA copy_, load_state_dict
        # on any module, a direct fill_) or replacement (.to(), assign=True) re-reads it. The key
        # and the values are separate attributes: a compiled forward is guarded on the values only,
        # so every layer in the same state shares one graph (no recompile per layer or per .to()).
        if torch.compiler.is_compiling():
            return self._latch_state
        ml, vl = self.mean_latch, self.var_latch
        key = (id(ml), ml._version, id(vl), vl._version)
        if self._latch_key != key:
            self._latch_state = (int(ml), int(vl))
            self._latch_key = key
        return self._latch_state

    def _refresh_latches(self) -> None:
        """Re-read the latch buffers into the host-side mirror."""
        self._latch_key = None
        self._latches()

    def _mirror_latches(self, state: tuple[int, int]) -> None:
        """Set the host-side mirror to the latch values the caller just wrote (no device read)."""
        ml, vl = self.mean_latch, self.var_latch
        self._latch_state = state
        self._latch_key = (id(ml), ml._version, id(vl), vl._version)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # NOTE: a NaN radius would make every ratio NaN; a latch outside the statistics would index
        # nothing. Both are refused here, with the key, rather than failing obscurely later.
        radius = state_dict.get(prefix + "radius")
        if isinstance(radius, Tensor) and not bool(torch.isfinite(radius).all() and (radius >= 0).all()):
            error_msgs.append(f"{prefix}radius must be a finite non-negative number, got {radius.tolist()}")
            return
        for key in ("mean_latch", "var_latch"):
            latch = state_dict.get(prefix + key)
            if isinstance(latch, Tensor) and int(latch) not in (UNLATCHED, *range(len(STATS))):
                error_msgs.append(
                    f"{prefix}{key} must be -1 (unlatched) or 0-2 (IN, LN, BN), got {int(latch)}"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
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

    def _ratio_rows(self) -> Tensor:
        """The mean and variance ratios stacked, ``(2, 3)`` (IN, LN, BN)."""
        ml, vl = self._latches()
        logits = torch.stack([self.mean_logits, self.var_logits])
        if ml == vl == UNLATCHED:  # one call for both rows: the ratio maps are many tiny ops
            return self._map_logits(logits)
        eye = torch.eye(len(STATS), dtype=logits.dtype, device=logits.device)
        return torch.stack(
            [
                eye[latch] if latch != UNLATCHED else self._map_logits(row)
                for row, latch in zip(logits, (ml, vl), strict=True)
            ]
        )

    def ratios(self) -> tuple[Tensor, Tensor]:
        """The mean and variance importance ratios, probabilities in IN, LN, BN order."""
        rows = self._ratio_rows()
        return rows[0], rows[1]

    @property
    def latched(self) -> tuple[str | None, str | None]:
        """The statistic each of mean and variance has latched to (``None`` while dense)."""
        return tuple(STATS[i] if i != UNLATCHED else None for i in self._latches())  # type: ignore[return-value]

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
        # NOTE: latches are decided outside the forward (ssn.update_latches, once per optimizer
        # step for the whole network), so the forward reads no device value: a ratio that is
        # one-hot but not latched yet gives the same output through the mixture.
        if not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            return self._folded_eval(x)
        ratios = self._ratio_rows()
        tie = self._tie_unused()
        if tie is not None:
            ratios = ratios + tie
        return self._mixture(x, ratios)

    def _sync_group(self) -> ProcessGroup | None:
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

        InstanceNorm refuses a single spatial element, GroupNorm a single value in all and, in
        training, BatchNorm a single value per channel (DeepLab's image pooling at batch 1);
        synchronised BN statistics and the unbiased instance variance have no native kernel here.
        The mixture path covers all of these (zero variance rather than NaN).
        """
        if stat == BN and not self.training:
            return True
        if self.in_var_correction or (stat == BN and self._sync_group() is not None):
            return False
        if stat == IN:
            return math.prod(x.shape[2:]) > 1
        if stat == BN:
            return x.numel() // x.shape[1] // self.virtual_devices > 1  # per (virtual) device
        return x.numel() > 1  # LN: group_norm refuses a single value

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
        weight: Tensor | None = self.weight
        tie = self._tie_unused()
        if tie is not None:
            weight = (weight if weight is not None else x.new_ones(self.num_features)) + tie.to(x.dtype)
        bias = self.bias
        if weight is not None and bias is None:
            bias = x.new_zeros(self.num_features)  # F.instance_norm / group_norm take both or neither
        if stat == BN:
            if self.training:
                self.num_batches_tracked.add_(1)
                if self.virtual_devices > 1:
                    return grouped_batch_norm(
                        x,
                        self.running_mean,
                        self.running_var,
                        weight,
                        bias,
                        _batch_momentum(self),
                        self.eps,
                        self.virtual_devices,
                    )
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                weight,
                bias,
                self.training,
                _batch_momentum(self) if self.training else 0.0,
                self.eps,
            )
        if stat == IN:
            return F.instance_norm(x, weight=weight, bias=bias, eps=self.eps)
        return F.group_norm(x, 1, weight, bias, self.eps)

    def _mixture(self, x: Tensor, ratios: Tensor) -> Tensor:
        training = self.training
        bn_mean = None if training else self.running_mean
        bn_var = None if training else self.running_var
        group = self._sync_group()
        groups = self.virtual_devices if training else 1
        if groups > 1:
            device_batch(x.shape[0], groups, type(self).__name__)
        if torch.compiler.is_compiling() and group is None:
            # NOTE: plain ops the compiler traces into one graph (the fused Function would break it)
            y, batch_mean, batch_var, count = traceable.mixture(
                x,
                ratios[0],
                ratios[1],
                self.weight,
                self.bias,
                bn_mean,
                bn_var,
                self.eps,
                self.in_var_correction,
                groups,
            )
        else:
            y, batch_mean, batch_var, count = _SwitchNormFn.apply(
                x,
                ratios,
                self.weight,
                self.bias,
                bn_mean,
                bn_var,
                self.eps,
                self.in_var_correction,
                group,
                groups,
            )
        if training:
            assert batch_mean is not None and batch_var is not None  # training: the batch's statistics
            _update_running(self, batch_mean, batch_var, float(count))
        return y

    # ------------------------------------------------------------------------- dense eval
    def _fold_key(self, dtype: torch.dtype) -> tuple[Any, ...]:
        tensors = (
            self.mean_logits,
            self.var_logits,
            self.radius,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.mean_latch,
            self.var_latch,
        )
        # NOTE: identity and version counter of every input of the fold: any in-place write
        # (optimizer step, load_state_dict, EMA copy_) or replacement (.to()) refolds.
        versions = tuple(None if t is None else (id(t), t._version) for t in tensors)
        return (dtype, self.eps, getattr(self, "projection", None), versions)

    def _make_fold(self, dtype: torch.dtype) -> dict[Any, Any]:
        r = self._ratio_rows().to(dtype)
        bn = torch.stack([self.running_mean, self.running_var]).to(dtype).mul_(r[:, BN, None])
        bn[1].add_(self.eps)
        # NOTE: the IN and LN ratios as Python numbers (one host read per fold): scalar operands of
        # the per-call ops, which then need no broadcasting of their own.
        return {"ratios": r[:, :BN].tolist(), "bn": bn}

    def _folded_affine(self, fold: dict[Any, Any], n: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Per plane for ``n`` samples (cached in the fold): the weight and the bias repeated, and
        the zeros and ones the plane sums take (``fused._plane_sums``)."""
        if n not in fold:
            ones = torch.ones(self.num_features, dtype=dtype, device=self.running_mean.device)
            weight = ones if self.weight is None else self.weight.to(dtype)
            bias = torch.zeros_like(ones) if self.bias is None else self.bias.to(dtype)
            fold[n] = (
                *torch.stack([weight, bias]).repeat(1, n),
                ones.new_zeros(n * ones.numel()),
                ones.repeat(n),
            )
        return fold[n]

    @torch.no_grad()
    def _folded_eval(self, x: Tensor) -> Tensor:
        """Dense evaluation: the ratios and the BN terms are constants, folded once (per eval(),
        refolded when a parameter or buffer changes); per call only the per-plane moments (one
        pass over ``x`` where they do not cancel, ``fused._plane_sums_eval``), a few (N, C) ops
        and one affine pass.
        """
        xs = float32_at_least(x)
        key = self._fold_key(xs.dtype)
        if self._fold is None or self._fold[0] != key:
            self._fold = (key, self._make_fold(xs.dtype))
        fold = self._fold[1]
        (m_in, m_ln), (v_in, v_ln) = fold["ratios"]
        weight, bias, zeros, ones = self._folded_affine(fold, x.shape[0], xs.dtype)
        s1, ss = _plane_sums_eval(xs, (zeros, ones))
        # NOTE: from the sums, with the 1/M, the degrees of freedom and the 1/C of the LN pooling
        # folded into the scalars: mu_in = s1 / M, var_in = k ss (k = 1 / dof); LN pooled as in
        # training (``stats._moments``: the mean of the variances plus the variance of the means,
        # from the deviations), mean_c(var_in + (mu_in - mu_ln)^2) = k / C sum_c(ss + d^2 / (k M^2))
        # with d = M (mu_in - mu_ln).
        ch, m = x.shape[1], math.prod(x.shape[2:])
        k = 1 / _dof(m, self.in_var_correction)
        s_ln = s1.sum(1, keepdim=True)
        d = torch.sub(s1, s_ln, alpha=1 / ch)
        var_ln = torch.addcmul(ss, d, d, value=1 / (k * m * m)).sum(1, keepdim=True)
        mean = torch.add(fold["bn"][0], s_ln, alpha=m_ln / (ch * m)).add_(s1, alpha=m_in / m)
        var = torch.add(fold["bn"][1], var_ln, alpha=v_ln * k / ch).add_(ss, alpha=v_in * k)
        if not xs.is_contiguous():  # e.g. channels_last: broadcast ops keep the layout
            scale = var.rsqrt_().mul_(weight.view_as(var))
            return _plane_affine(xs, scale, torch.addcmul(bias.view_as(scale), mean, scale, value=-1)).to(
                x.dtype
            )
        # NOTE: the native eval kernel normalises each plane by its own mixed mean and variance
        # (eps is already in it) and applies the per-plane weight and bias, in one pass.
        flat = xs.view(1, -1, math.prod(x.shape[2:]))
        y = F.batch_norm(flat, mean.view(-1), var.view(-1), weight, bias, False, 0.0, 0.0)
        return y.view_as(x).to(x.dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        if self.sync:
            s += ", sync=True"
        if self.in_var_correction:
            s += ", in_var_correction=1"
        if self.virtual_devices > 1:
            s += f", virtual_devices={self.virtual_devices}"
        if getattr(self, "projection", "exact") != "exact":
            s += f", projection={self.projection}"
        ml, vl = self.latched
        if ml or vl:
            s += f", latched=(mean={ml}, var={vl})"
        return s


class _Softmax(SwitchNormBase):
    def _map_logits(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)


class SparseSwitchNormBase(SwitchNormBase):
    """Every SSN layer: ratios by SparsestMax at the layer's ``radius``, latching when one-hot."""

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


class SparseSwitchNorm1d(SparseSwitchNormBase):
    """Sparse Switchable Normalization over (N, C, L) inputs: SparsestMax ratios over IN, LN, BN."""

    spatial_dims = 1
    _layout = "(N, C, L)"


class SparseSwitchNorm2d(SparseSwitchNormBase):
    """Sparse Switchable Normalization over (N, C, H, W) inputs: SparsestMax ratios over IN, LN, BN."""

    spatial_dims = 2
    _layout = "(N, C, H, W)"


class SparseSwitchNorm3d(SparseSwitchNormBase):
    """Sparse Switchable Normalization over (N, C, T, H, W) inputs: SparsestMax ratios."""

    spatial_dims = 3
    _layout = "(N, C, T, H, W)"
