"""Model surgery: swap normalisers, export latched SSN to native layers.

Each function walks ``named_children()`` recursively and returns the (possibly new) module, in the
style of timm's ``convert_sync_batchnorm``.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .factory import create_norm
from .norm import BN, IN, LN, STATS, UNLATCHED, LatchedNorm, SparseSwitchNormBase, SwitchNormBase
from .registry import NORMS, norm_spec, sync_name
from .stats import selected_stat
from .timm_norm import NORM_ACT, _NormAct

__all__ = ["convert_norm", "export_norm", "switch_norms"]

_BN_DIMS = {cls: d for d, cls in NORMS["bn"].layers.items()}


def switch_norms(model: nn.Module) -> Iterator[tuple[str, SwitchNormBase]]:
    """Every SN/SSN layer of ``model`` with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, SwitchNormBase):
            yield name, m


def _source_dim(m: nn.Module, default: int) -> int:
    if isinstance(m, SwitchNormBase):
        return m.spatial_dims
    for cls, d in _BN_DIMS.items():  # isinstance: timm's BatchNormAct2d is a BatchNorm2d
        if isinstance(m, cls):
            return d
    return default  # SyncBatchNorm: the rank is only known at run time


# NOTE: exact types, not isinstance: a subclass may compute something else (timm's BatchNormAct2d
# applies an activation after the norm), and a converter must never silently change a network.
# The layers with running BN statistics: BatchNorm{1,2,3}d, SyncBatchNorm, SN and SSN.
_PLAIN = {cls for spec in NORMS.values() if spec.running_stats for cls in spec.layers.values()}


def _timm_norm_act_types() -> tuple[type, ...]:
    """timm's BatchNorm + drop + activation layers, if timm is loaded (a model holding them loaded it)."""
    mod = sys.modules.get("timm.layers.norm_act")
    return () if mod is None else (mod.BatchNormAct2d, mod.SyncBatchNormAct)


def _convertible(m: nn.Module, qualname: str) -> str | None:
    """``"norm"``, ``"act"`` (a norm followed by ``m.drop`` and ``m.act``), or None (not a
    normaliser convert_norm replaces).

    Raises:
        ValueError: a BatchNorm-like layer (a ``_BatchNorm`` subclass, a ``running_var`` buffer or
            BatchNorm in its class name) that is none of these, named: frozen statistics, fused
            activations or other arithmetic a plain norm would drop.
    """
    t = type(m)
    if t in _PLAIN:
        return "norm"
    if t in NORM_ACT.values() or t in _timm_norm_act_types():
        return "act"
    if isinstance(m, (_BatchNorm, SwitchNormBase)) or (
        not isinstance(m, (LatchedNorm, _InstanceNorm))
        and ("batchnorm" in t.__name__.lower() or isinstance(getattr(m, "running_var", None), torch.Tensor))
    ):
        hint = (
            " (unfreeze it first, e.g. timm.layers.unfreeze_batch_norm_2d)"
            if "frozen" in t.__name__.lower()
            else ""
        )
        raise ValueError(
            f"convert_norm: layer {qualname or '<root>'} is a {t.__module__}.{t.__qualname__}, "
            f"a BatchNorm-like layer it does not know{hint}; replacing it with a plain norm could change "
            "what the network computes. Known: torch's BatchNorm1d/2d/3d and SyncBatchNorm, timm's "
            "BatchNormAct2d and SyncBatchNormAct, and ssn's layers"
        )
    return None


@torch.no_grad()
def _with_act(new: nn.Module, src: nn.Module) -> nn.Module:
    """``new`` (a plain norm in ``src``'s state) followed by ``src``'s drop and activation.

    The norm+act form of ``new``'s class where there is one (timm's ``BatchNormAct2d``,
    ``SyncBatchNormAct``, ``GroupNormAct``, ``GroupNorm1Act``; ours), with the same state_dict
    keys; otherwise ``Sequential(norm, drop, act)``, which computes the same.
    """
    t = type(new)
    twin: nn.Module | None = None
    if isinstance(new, SwitchNormBase) and t in NORM_ACT:
        extra: dict[str, Any] = (
            {"projection": new.projection} if isinstance(new, SparseSwitchNormBase) else {}
        )
        twin = NORM_ACT[t](
            new.num_features,
            eps=new.eps,
            momentum=new.momentum,
            affine=new.affine,
            sync=new.sync,
            process_group=new.process_group,
            in_var_correction=new.in_var_correction,
            apply_act=False,
            **extra,
        )
    elif t in (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm):
        from timm.layers import norm_act as na  # the source is timm's: timm is installed

        if isinstance(new, nn.BatchNorm2d):
            twin = na.BatchNormAct2d(
                new.num_features,
                eps=new.eps,
                momentum=new.momentum,  # type: ignore[arg-type]  # None (a cumulative average) goes to BatchNorm2d
                affine=new.affine,
                track_running_stats=new.track_running_stats,
                apply_act=False,
            )
        elif isinstance(new, nn.SyncBatchNorm):
            twin = na.SyncBatchNormAct(
                new.num_features,
                new.eps,
                new.momentum,
                new.affine,
                new.track_running_stats,
                process_group=new.process_group,
            )
        elif isinstance(new, nn.GroupNorm) and new.num_groups == 1:
            twin = na.GroupNorm1Act(new.num_channels, eps=new.eps, affine=new.affine, apply_act=False)
        elif isinstance(new, nn.GroupNorm):
            twin = na.GroupNormAct(
                new.num_channels, num_groups=new.num_groups, eps=new.eps, affine=new.affine, apply_act=False
            )
    drop, act = src.get_submodule("drop"), src.get_submodule("act")
    if twin is None:
        return nn.Sequential(OrderedDict(norm=new, drop=drop, act=act))
    twin.load_state_dict(new.state_dict())
    twin.drop, twin.act = drop, act
    ref = next(t for t in (*new.parameters(), *new.buffers()) if t.is_floating_point())
    return twin.to(device=ref.device, dtype=ref.dtype).train(new.training)


@torch.no_grad()
def _convert_one(m: _BatchNorm | SwitchNormBase, name: str, dim: int, kw: dict[str, Any]) -> nn.Module:
    sync = isinstance(m, nn.SyncBatchNorm) or getattr(m, "sync", False)
    target = sync_name(name) if sync else name.lower()  # a synchronised model stays synchronised
    args: dict[str, Any] = {"eps": m.eps, "momentum": m.momentum, "affine": m.affine, **kw}
    if not getattr(m, "track_running_stats", True) and norm_spec(target).local == "bn":
        args.setdefault("track_running_stats", False)  # batch statistics in eval too, as the source
    new = create_norm(target, m.num_features, dim=_source_dim(m, dim), **args)
    if m.affine and getattr(new, "weight", None) is not None:
        _copy_tensors(new, m, ("weight", "bias"))
    if getattr(m, "running_mean", None) is not None and getattr(new, "running_mean", None) is not None:
        _copy_tensors(new, m, ("running_mean", "running_var", "num_batches_tracked"))
    if isinstance(m, SwitchNormBase) and isinstance(new, SwitchNormBase):
        for key in ("mean_logits", "var_logits", "radius", "mean_latch", "var_latch"):
            getattr(new, key).copy_(getattr(m, key))
        new._refresh_latches()
    if (
        isinstance(m, SparseSwitchNormBase)
        and isinstance(new, SparseSwitchNormBase)
        and "projection" not in kw
    ):
        new.projection = m.projection
    ref = next(t for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())
    return new.to(device=ref.device, dtype=ref.dtype).train(m.training)


def convert_norm(model: nn.Module, name: str, *, dim: int = 2, **kw: Any) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d / SyncBatchNorm / SN / SSN layer with normaliser ``name``.

    Affine parameters and running statistics are copied (and logits, radius and latches between
    SN/SSN layers); eps and momentum are kept unless given in ``kw``. A SyncBatchNorm (or a
    synchronised SN/SSN) becomes the synchronised variant of ``bn``/``sn``/``ssn``.

    Norm+act layers (timm's ``BatchNormAct2d``/``SyncBatchNormAct``, ``ssn``'s ``SwitchNormAct2d``/
    ``SparseSwitchNormAct2d``) keep their activation and drop: the norm+act form of the new norm
    (timm's ``BatchNormAct2d``, ``GroupNormAct``, ``GroupNorm1Act``, ours), or
    ``Sequential(norm, drop, act)`` for ``in``. ``convert_norm(model, "bn")`` computes what the
    model computed.

    Args:
        model: any module; returned converted (the root itself may be replaced).
        name: a name of ``ssn.create_norm`` (``ssn``, ``sn``, ``bn``, ``gn``, ...).
        dim: spatial rank assumed for SyncBatchNorm, whose rank the module does not record.
        **kw: passed to the new layers (e.g. ``groups`` for ``gn``, ``radius``).

    Raises:
        ValueError: a BatchNorm-like layer it does not know (any other ``_BatchNorm`` subclass,
            torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``, ...), named; the
            model is left unchanged.
    """
    # NOTE: every layer is checked before any is replaced, so a refusal leaves the model as it was.
    for qualname, m in model.named_modules():
        _convertible(m, qualname)

    def walk(module: nn.Module, prefix: str) -> nn.Module:
        kind = _convertible(module, prefix)
        if kind is not None:
            assert isinstance(module, (_BatchNorm, SwitchNormBase))  # what _convertible accepts
            new = _convert_one(module, name, dim, kw)
            return _with_act(new, module) if kind == "act" else new
        for child_name, child in module.named_children():
            new = walk(child, f"{prefix}.{child_name}" if prefix else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    return walk(model, "")


_NATIVE = {BN: NORMS["bn"].layers, IN: NORMS["in"].layers}


def _copy_tensors(dst: nn.Module, src: nn.Module, names: tuple[str, ...]) -> None:
    """Copy ``src``'s parameters or buffers ``names`` into ``dst``'s, in place."""
    for name in names:
        getattr(dst, name).copy_(getattr(src, name))


@torch.no_grad()
def _export_one(m: SwitchNormBase, qualname: str, force: bool) -> nn.Module:
    latches = list(m._latches())
    if UNLATCHED in latches:
        if not force:
            raise ValueError(
                f"layer {qualname or '<root>'} ({type(m).__name__}) is not latched (ratios "
                f"{[r.tolist() for r in m.ratios()]}); train until every ratio is one-hot, or "
                f"pass force=True to export the argmax of its ratios"
            )
        latches = [selected_stat(latch, r) for latch, r in zip(latches, m.ratios(), strict=True)]
    mean_stat, var_stat = latches
    dim, c = m.spatial_dims, m.num_features
    # NOTE: with the authors' unbiased instance variance, IN and LN have no native equivalent;
    # BN in eval uses the running statistics only, so BatchNorm stays exact there.
    native_ok = mean_stat == var_stat and not (m.in_var_correction and mean_stat != BN)
    if native_ok and mean_stat == BN:
        new: nn.Module = _NATIVE[BN][dim](c, eps=m.eps, momentum=m.momentum, affine=m.affine)
    elif native_ok and mean_stat == IN:
        new = _NATIVE[IN][dim](c, eps=m.eps, affine=m.affine)
    elif native_ok and mean_stat == LN:
        new = nn.GroupNorm(1, c, eps=m.eps, affine=m.affine)
    else:
        new = LatchedNorm(
            c,
            STATS[mean_stat],
            STATS[var_stat],
            spatial_dims=dim,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            in_var_correction=m.in_var_correction,
        )
    if m.affine:
        _copy_tensors(new, m, ("weight", "bias"))
    if getattr(new, "running_mean", None) is not None:
        _copy_tensors(new, m, ("running_mean", "running_var", "num_batches_tracked"))
    new = new.to(device=m.running_mean.device, dtype=m.running_mean.dtype).train(m.training)
    # NOTE: a norm+act layer exports to timm's own (BatchNormAct2d, GroupNorm1Act), so a timm model
    # latched to BN exports to the plain timm model
    return _with_act(new, m) if isinstance(m, _NormAct) else new


def export_norm(model: nn.Module, *, force: bool = False) -> nn.Module:
    """Replace every latched SN/SSN layer with the cheapest exact equivalent.

    Both ratios on BN -> ``BatchNorm{1,2,3}d`` (with the running statistics), on IN ->
    ``InstanceNorm{1,2,3}d(affine=True)``, on LN -> ``GroupNorm(1, C)``; mean and variance on
    different statistics -> :class:`ssn.LatchedNorm`. A ResNet whose layers all chose BN exports
    to a plain torchvision ResNet (same state_dict keys; BN folds into the convolutions). The
    norm+act layers of timm models keep their activation and drop: BN -> timm's ``BatchNormAct2d``,
    LN -> ``GroupNorm1Act``, otherwise ``Sequential(norm, drop, act)``.

    Raises:
        ValueError: a layer that has not latched, named, unless ``force=True`` (then its ratios'
            argmax is exported, which is not exact).
    """

    def walk(module: nn.Module, prefix: str) -> nn.Module:
        if isinstance(module, SwitchNormBase):
            return _export_one(module, prefix, force)
        for child_name, child in module.named_children():
            new = walk(child, f"{prefix}.{child_name}" if prefix else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    return walk(model, "")
