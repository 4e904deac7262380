"""What a training loop calls: the radius, latch updates, optimizer groups, running-statistic averaging.

Model rewriting (convert, export) lives in :mod:`ssn.surgery`; these functions change state inside
the layers only, never the module tree.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .functional import sparsestmax
from .norm import UNLATCHED, LatchedNorm, SparseSwitchNormBase, SwitchNormBase
from .surgery import switch_norms

__all__ = ["average_running_stats", "param_groups", "set_radius", "update_latches"]


@torch.no_grad()
def set_radius(model: nn.Module, radius: float) -> int:
    """Set the SparsestMax radius of every SSN layer; returns how many layers were set."""
    if not radius >= 0:
        raise ValueError(f"radius must be a non-negative number, got {radius!r}")
    count = 0
    for _, m in switch_norms(model):
        if isinstance(m, SparseSwitchNormBase):
            m.radius.fill_(radius)
            count += 1
    return count


@torch.no_grad()
def update_latches(model: nn.Module) -> int:
    """Latch every SSN ratio of ``model`` that is exactly one-hot; call once per optimizer step.

    A layer in training mode whose mean or variance ratio (SparsestMax of its logits at its
    radius) is exactly one-hot keeps that statistic from then on: the latch never flips back and
    is saved in the state_dict. Called before the step's forward (after the radius is set), it
    gives the latches the layers took inside their forward before: the forward itself reads no
    device value (no host synchronisation, no graph break under torch.compile). SN layers (softmax)
    and layers in eval mode never latch. Layers with ``projection="authors"`` latch where the
    authors' layer fixed its ratio (``max - min >= 1``, which their rounding near one-hot decides).

    The ratios of all exact-projection layers sharing a device and dtype come from one batched
    SparsestMax call, and all layers' verdicts from one host read.

    Returns:
        How many ratios latched in this call.
    """
    groups: dict[tuple[Any, ...], list[SparseSwitchNormBase]] = {}
    for _, m in switch_norms(model):
        if isinstance(m, SparseSwitchNormBase) and m.training and UNLATCHED in m._latches():
            key = (m.mean_logits.device, m.mean_logits.dtype, m.projection)
            groups.setdefault(key, []).append(m)
    if not groups:
        return 0
    layers, verdicts = [], []
    for (_, _, projection), ms in groups.items():
        if projection == "exact":  # (L, 2, 3) logits, (L, 1) radii: one call for the group
            logits = torch.stack([torch.stack([m.mean_logits, m.var_logits]) for m in ms])
            radius = torch.stack([m.radius for m in ms]).to(logits.dtype).unsqueeze(-1)
            ratios = sparsestmax(logits, radius)
        else:  # the authors' projection maps one row at a time anyway
            ratios = torch.stack([m._map_logits(torch.stack([m.mean_logits, m.var_logits])) for m in ms])
        hot, which = ratios.max(-1)
        # NOTE: the authors' layer fixes a ratio when ``max - min >= 1`` in float32: near one-hot
        # their SparsestMax can give 1.0000001 (fixed) or 1 - 6e-8 (not fixed), and ``== 1`` would
        # get both wrong.
        fixed = hot == 1 if projection == "exact" else hot - ratios.amin(-1) >= 1
        layers += ms
        verdicts.append(torch.cat([fixed.long(), which], dim=1))
    # one host read for every layer: (L, 4) hot_m, hot_v, which_m, which_v
    state = torch.cat([v.cpu() for v in verdicts]).tolist()
    latched = 0
    for m, (hot_m, hot_v, which_m, which_v) in zip(layers, state, strict=True):
        new = list(m._latches())
        for i, (buf, hot, which) in enumerate(
            ((m.mean_latch, hot_m, which_m), (m.var_latch, hot_v, which_v))
        ):
            if new[i] == UNLATCHED and hot:
                buf.fill_(which)
                new[i] = which
                latched += 1
        m._mirror_latches((new[0], new[1]))  # NOTE: the values just written: no read back per layer
    return latched


_NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, SwitchNormBase, LatchedNorm)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    ratio_lr_scale: float = 0.1,
    ratio_weight_decay: float = 0.0,
    norm_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups following the paper's recipe.

    Groups: the SN/SSN ratio logits (``lr * ratio_lr_scale``, ``ratio_weight_decay``; the paper
    uses lr/10 and no decay), the affine parameters of every normaliser (``norm_weight_decay``,
    ``weight_decay`` when None), and everything else. Empty groups are left out; each group has a
    ``name`` for logging and schedulers.
    """
    ratios, norms, rest = [], [], []
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, SwitchNormBase) and pname in ("mean_logits", "var_logits"):
                ratios.append(p)
            elif isinstance(module, _NORM_TYPES):
                norms.append(p)
            else:
                rest.append(p)
    groups = [
        {"name": "params", "params": rest, "lr": lr, "weight_decay": weight_decay},
        {
            "name": "norm",
            "params": norms,
            "lr": lr,
            "weight_decay": weight_decay if norm_weight_decay is None else norm_weight_decay,
        },
        {"name": "ratios", "params": ratios, "lr": lr * ratio_lr_scale, "weight_decay": ratio_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def _per_device(m: nn.Module) -> TypeGuard[_BatchNorm | SwitchNormBase | LatchedNorm]:
    """A layer that keeps running BN statistics of its own device's batches (not synchronised)."""
    if isinstance(m, nn.SyncBatchNorm) or getattr(m, "sync", False):
        return False
    return (
        isinstance(m, (_BatchNorm, SwitchNormBase, LatchedNorm))
        and getattr(m, "running_mean", None) is not None
    )


@torch.no_grad()
def average_running_stats(model: nn.Module, group: Any = None) -> int:
    """Average the running statistics of per-device layers over the processes of ``group``.

    Per-device BN/SN/SSN layers (``bn``, ``sn``, ``ssn``) each see only their own device's batches,
    so their running statistics differ between processes. Like the authors' ``sync_bn_stat``,
    averaging them before evaluating or saving makes every rank evaluate and save the same model.
    Synchronised layers are left alone (theirs are equal already). A collective: every process
    must call it. Returns the number of layers averaged (0 without a multi-process group).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return 0
    layers = [m for m in model.modules() if _per_device(m)]
    tensors = [t for m in layers for t in (m.running_mean, m.running_var) if t is not None]
    if not tensors:
        return 0
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return len(layers)
