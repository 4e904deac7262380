"""Backbone transfer between networks: any checkpoint we or the authors write -> a target network.

The interchange format is torchvision's ResNet layout (``conv1.weight``, ``bn1.running_mean``,
``layer1.0.bn1.mean_logits``, ``layer1.0.downsample.1.weight``, ``fc.*``), which our classifier,
mmseg's ``ResNet`` backbone (with SN/SSN named ``bn``) and the native export all share. Loading
maps norms the way :func:`ssn.convert_norm` converts a model (affine parameters and running
statistics copied; ratios, latches and radius carried between SN/SSN layers, restored from a native
export's recorded selection), refuses a missing backbone key by name, and lets only the head be new.
Pure functions, testable without any task.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .norm import STATS, UNLATCHED, LatchedNorm, SparseSwitchNormBase, SwitchNormBase

__all__ = [
    "RATIO_MODES",
    "TransferReport",
    "backbone_state",
    "load_backbone",
    "read_checkpoint",
    "record_norms",
    "rekey_state",
    "with_metadata",
]

log = logging.getLogger(__name__)

RATIO_MODES = ("keep", "reopen", "reset")
SWITCH_KEYS = ("mean_logits", "var_logits", "radius", "mean_latch", "var_latch")
STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")
_META = "ssn_stats"  # state_dict metadata entry of a native export: the statistics a layer latched to


def read_checkpoint(
    path: str | os.PathLike, *, trusted: bool = False, allow_hint: str = "pretrained_trusted: true"
) -> dict[str, Any]:
    """``torch.load`` a checkpoint safely (``weights_only`` unless ``trusted``), with clear errors.

    ``allow_hint``: how the caller's user allows an untrusted file, for the refusal's message.

    Raises:
        FileNotFoundError: no file. ValueError: an empty, corrupt or non-PyTorch file, or one that
            needs unpickling arbitrary objects (named; only ``trusted=True`` loads those).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a checkpoint")
    if _is_exported_program(path):
        raise ValueError(
            f"{path} is a torch.export program (the native export, for inference), not weights to "
            f"load: pass the state_dict saved beside it, {path.with_suffix('.state_dict.pt')}"
        )
    try:
        # NOTE: torchvision's reference scripts save their argparse options beside the weights
        # (`{"model": ..., "args": Namespace(...)}`); a Namespace only holds plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if "global" in str(e) or "GLOBAL" in str(e):
            raise ValueError(
                f"{path}: refused: it needs unpickling objects besides tensors and plain containers, which "
                f"can execute code ({str(e).splitlines()[0][:200]}); only if you trust the file, allow it "
                f"({allow_hint})"
            ) from e
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from e
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def _is_exported_program(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (``*.pt2``)."""
    if path.suffix == ".pt2":
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("serialized_exported_program.json") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def rekey_state(sd: dict[str, Any], rename: Callable[[str], str | None]) -> OrderedDict[str, Any]:
    """``sd`` with every key (and every module name of its state_dict metadata) passed through
    ``rename``; ``None`` drops it. The metadata carries a native export's recorded selection."""
    out: OrderedDict[str, Any] = OrderedDict(
        (new, v) for k, v in sd.items() if (new := rename(k)) is not None
    )
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((new, v) for k, v in meta.items() if (new := rename(k)) is not None)  # type: ignore[attr-defined]
    return out


def with_metadata(state: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """``state`` carrying ``source``'s state_dict metadata when it has none of its own (e.g. after a
    task's key mapping built a new dict)."""
    meta = getattr(source, "_metadata", None)
    if meta is None or getattr(state, "_metadata", None) is not None:
        return state
    out = OrderedDict(state)
    out._metadata = meta  # type: ignore[attr-defined]
    return out


def _is_authors(sd: dict[str, Any]) -> bool:
    return any(k.endswith("sn1.mean_weight") for k in sd)


def backbone_state(obj: dict[str, Any], stem: str = "conv1.weight") -> tuple[dict[str, Tensor], str]:
    """A checkpoint of any supported kind -> (state_dict in torchvision's ResNet layout, kind).

    ``stem``: the key of the network's first convolution in that layout, which locates the backbone
    under any prefix (a timm EfficientNet's is ``conv_stem.weight``, a deep-stem ResNet's
    ``conv1.0.weight``).

    Kinds: a Lightning checkpoint of any of our tasks (``state_dict`` under the task's prefix, e.g.
    ``net.`` or ``model.backbone.``), the authors' checkpoint (``ssn.authors`` format), a plain
    state_dict (torchvision ResNet, or our native export ``*.state_dict.pt``; DDP's ``module.``
    prefix is any prefix), torchvision's reference-script checkpoint (``{"model": state_dict, ...}``).

    Raises:
        ValueError: nothing that looks like a ResNet backbone, naming a few keys found.
    """
    kind = "state_dict"
    sd = obj
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        kind = "lightning" if "pytorch-lightning_version" in obj else "state_dict"
    elif isinstance(
        obj.get("model"), dict
    ):  # torchvision's reference scripts: {"model": sd, "optimizer": ...}
        sd, kind = obj["model"], "torchvision reference checkpoint"
    if _is_authors(sd):
        from .authors import convert_authors_state_dict

        return convert_authors_state_dict(sd), "authors"
    # NOTE: LatchedNorm keeps its selection as extra state (a dict); the metadata carries it here.
    others = [k for k, v in sd.items() if not isinstance(v, Tensor) and not k.endswith("_extra_state")]
    if others:
        raise ValueError(f"not a state_dict: values of {others[:3]} are not tensors")
    sd = rekey_state(sd, lambda k: None if k.endswith("_extra_state") else k)
    # NOTE: the stem convolution is the shallowest of its name: the shortest prefix wins
    # (``net.`` over ``net.layer1.0.``), whatever the task's attribute path.
    prefixes = sorted(
        {k[: -len(stem)] for k in sd if (k == stem or k.endswith("." + stem)) and sd[k].dim() >= 4}, key=len
    )
    if not prefixes:
        what = "ResNet backbone" if stem == "conv1.weight" else "backbone"
        blocks = " and blocks like 'layer1.0.conv1.weight'" if stem == "conv1.weight" else ""
        raise ValueError(
            f"no {what} in the checkpoint: expected a stem convolution '{stem}'{blocks} (under any "
            f"prefix); found e.g. {sorted(sd)[:6]}"
        )
    prefix = prefixes[0]
    return rekey_state(sd, lambda k: k[len(prefix) :] if k.startswith(prefix) else None), kind


def record_norms(native: nn.Module, state: dict[str, Tensor], selection: dict[str, tuple[int, int]]) -> None:
    """Record in ``state``'s metadata which statistics each exported layer latched to, so that a
    native export loaded back into an SN/SSN network restores its latches (see :func:`load_backbone`).
    ``selection`` maps layer names to (mean, var) statistic indices. Plain loaders ignore it."""
    meta = getattr(state, "_metadata", None)
    if meta is None:
        return
    for name, (mean, var) in selection.items():
        meta.setdefault(name, {})[_META] = f"{STATS[mean]}/{STATS[var]}"


@dataclass
class TransferReport:
    """What :func:`load_backbone` did, for the log."""

    kind: str = ""
    loaded: int = 0
    new: list[str] = field(default_factory=list)  # target keys left at initialisation (the head)
    dropped: list[str] = field(default_factory=list)  # source keys without a place (the source head)
    converted: list[str] = field(default_factory=list)  # norms whose type differs between source and target
    adapted: list[str] = field(default_factory=list)  # weights reshaped (input channels)
    latched: int = 0
    switch_layers: int = 0

    def summary(self) -> str:
        parts = [f"{self.kind}: {self.loaded} tensors loaded"]
        if self.switch_layers:
            parts.append(f"{self.latched}/{self.switch_layers} SN/SSN layers latched")
        if self.new:
            parts.append(f"new (initialised): {_brief(self.new)}")
        if self.dropped:
            parts.append(f"not used: {_brief(self.dropped)}")
        if self.converted:
            parts.append(
                f"the normalizer differs from the checkpoint's in {len(self.converted)} layers, converted as "
                f"ssn.convert_norm does (affine and running statistics copied): {_brief(self.converted)}"
            )
        if self.adapted:
            parts.append(f"adapted: {', '.join(self.adapted)}")
        return "; ".join(parts)


def _brief(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _adapt_input_conv(w: Tensor, in_channels: int) -> Tensor:
    """An RGB stem for ``in_channels`` inputs: summed for one channel, else tiled and rescaled
    (as timm's ``adapt_input_conv``), so a constant input gives the same response."""
    if in_channels == 1:
        return w.sum(1, keepdim=True)
    reps = -(-in_channels // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels)


def _norm_owner(key: str, norms: dict[str, nn.Module]) -> tuple[str, str] | None:
    mod, _, leaf = key.rpartition(".")
    return (mod, leaf) if mod in norms else None


_NORM_STATE = SWITCH_KEYS + STAT_KEYS  # a norm's keys that may exist on one side only (BN <-> SSN)


@dataclass
class _Match:
    """The source tensors that go into the target, and what does not fit (see :func:`_match`)."""

    values: dict[str, Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bad_shape: list[str] = field(default_factory=list)
    converted: set[str] = field(default_factory=set)


def _match(
    own: dict[str, Tensor],
    state: dict[str, Tensor],
    norms: dict[str, nn.Module],
    report: TransferReport,
    *,
    new_ok: tuple[str, ...],
    drop_ok: tuple[str, ...],
    stem: str,
) -> _Match:
    """Pair every target key with its source tensor (the stem adapted to the input channels); a
    norm state one side lacks marks the norm as converted, a head key as new or dropped."""
    found = _Match()
    for key, dst in own.items():
        owner = _norm_owner(key, norms)
        src = state.get(key)
        if src is None:
            if owner and owner[1] in _NORM_STATE:
                found.converted.add(owner[0])  # e.g. a BN source for an SSN target: logits stay uniform
            elif key.startswith(new_ok):
                report.new.append(key)
            else:
                found.missing.append(key)
            continue
        if src.shape != dst.shape:
            if (
                key == stem
                and src.dim() == 4
                and src.shape[0] == dst.shape[0]
                and src.shape[2:] == dst.shape[2:]
            ):
                src = _adapt_input_conv(src, dst.shape[1])
                report.adapted.append(
                    f"{stem[: -len('.weight')]} {tuple(state[key].shape)} -> {tuple(dst.shape)}"
                )
            elif key.startswith(new_ok):
                report.new.append(key)
                continue
            else:
                found.bad_shape.append(f"{key}: {tuple(src.shape)} vs {tuple(dst.shape)}")
                continue
        found.values[key] = src
    for key in state:
        if key in own:
            continue
        owner = _norm_owner(key, norms)
        if owner and (owner[1] in _NORM_STATE or owner[1] == "_extra_state"):
            found.converted.add(owner[0])  # e.g. an SSN source for a BN/GN target: its ratios are dropped
        elif key.startswith(drop_ok):
            report.dropped.append(key)
        else:
            found.unexpected.append(key)
    return found


def _recorded_selection(
    norms: dict[str, nn.Module], state: dict[str, Tensor], meta: dict[str, Any], name: str
) -> str | None:
    """The ``mean/var`` statistics a native export recorded for SN/SSN layer ``name`` (None when
    the source holds the layer's own latches, or records nothing)."""
    if not isinstance(norms[name], SwitchNormBase) or f"{name}.mean_latch" in state:
        return None
    return (meta.get(name) or {}).get(_META)


def _validate(
    found: _Match, norms: dict[str, nn.Module], state: dict[str, Tensor], meta: dict[str, Any], ratios: str
) -> None:
    """Refuse, before anything is loaded: keys that do not fit, NaN/Inf tensors, and ``reopen``
    from a native export (which holds a selection, not ratios)."""
    if found.missing or found.unexpected or found.bad_shape:
        raise ValueError(
            "the pretrained backbone does not fit this network: "
            + "; ".join(
                f"{what} ({len(keys)}): {_brief(keys)}"
                for what, keys in (
                    ("missing", found.missing),
                    ("unexpected", found.unexpected),
                    ("shape mismatch", found.bad_shape),
                )
                if keys
            )
        )
    nonfinite = [
        k for k, v in found.values.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if nonfinite:
        raise ValueError(
            f"the pretrained tensors hold NaN/Inf values in {len(nonfinite)} of them: {_brief(nonfinite)} "
            "(saved after the source diverged?); use an earlier checkpoint of the source"
        )
    recorded = [name for name in norms if _recorded_selection(norms, state, meta, name)]
    if recorded and ratios == "reopen":
        raise ValueError(
            "pretrained_ratios 'reopen' starts from the source's ratios, but this native export holds "
            f"only the selection of its {len(recorded)} layers (e.g. {recorded[0]}), not ratios: use "
            "'keep' (the recorded latches), 'reset', or 'reopen' from the Lightning checkpoint "
            "(last.ckpt) the export was made from"
        )


def _apply_ratios(
    norms: dict[str, nn.Module],
    state: dict[str, Tensor],
    meta: dict[str, Any],
    ratios: str,
    found: _Match,
    report: TransferReport,
) -> None:
    """Per SN/SSN layer after the tensors are in: restore a native export's recorded latches, then
    the ``ratios`` mode (``reopen``: latches cleared, radius 0; ``reset``: logits uniform too)."""
    for name, m in norms.items():
        if not isinstance(m, SwitchNormBase):
            continue
        recorded = _recorded_selection(norms, state, meta, name)
        if recorded:  # a native export: restore its selection
            mean, var = recorded.split("/")
            m.latch(mean, var)
            found.converted.discard(name)
        if ratios != "keep":
            m.latch(None, None)
            if isinstance(m, SparseSwitchNormBase):
                m.radius.zero_()
        if ratios == "reset":
            m.mean_logits.zero_()
            m.var_logits.zero_()
        m._refresh_latches()
        report.switch_layers += 1
        report.latched += UNLATCHED not in m._latches()


@torch.no_grad()
def load_backbone(
    target: nn.Module,
    state: dict[str, Tensor],
    *,
    new_ok: Iterable[str] = (),
    drop_ok: Iterable[str] = ("fc.",),
    ratios: str = "keep",
    kind: str = "state_dict",
    stem: str = "conv1.weight",
) -> TransferReport:
    """Load a torchvision-layout backbone ``state`` into ``target`` (in place).

    Args:
        target: the network (or backbone) receiving the weights.
        state: source tensors, keys in the target's naming (see :func:`backbone_state`).
        new_ok: key prefixes of the target allowed to stay at initialisation (its new head).
        drop_ok: key prefixes of the source allowed to go unused (its old head).
        ratios: ``keep`` (ratios, latches and radius inherited), ``reopen`` (logits inherited,
            latches cleared; the caller restarts the radius ramp), ``reset`` (logits uniform,
            latches cleared, radius 0). Running statistics and affine parameters load in every mode.
        kind: the source's kind, for the report.
        stem: the first convolution's key, whose input channels may be adapted (e.g. RGB -> gray).

    Raises:
        ValueError: a missing backbone key or an unexpected source key (both named), a shape
            mismatch outside the head, or a NaN/Inf in a tensor to load (named; nothing is loaded).
    """
    if ratios not in RATIO_MODES:
        raise ValueError(f"pretrained_ratios must be one of {RATIO_MODES}, got {ratios!r}")
    report = TransferReport(kind=kind)
    norms: dict[str, nn.Module] = {
        n: m
        for n, m in target.named_modules()
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, SwitchNormBase, LatchedNorm))
    }
    own = target.state_dict()
    meta = getattr(state, "_metadata", None) or {}
    found = _match(own, state, norms, report, new_ok=tuple(new_ok), drop_ok=tuple(drop_ok), stem=stem)
    _validate(found, norms, state, meta, ratios)
    for key, src in found.values.items():
        own[key].copy_(src.to(own[key].dtype))
    report.loaded = len(found.values)
    _apply_ratios(norms, state, meta, ratios, found, report)
    report.converted = sorted(found.converted)
    return report
