"""Fine-tuning from a pretrained checkpoint: loading the backbone (the ratio modes ``keep``,
``reopen``, ``reset``, and where the radius ramp starts), freezing parameters by name prefix (frozen
norms in eval mode), and the backbone's learning-rate scale.

``NormTask.configure_model`` calls these with its hooks (``pretrained_module``, ``map_pretrained``,
``head_prefixes``, ``pretrained_stem``), which say where a task's backbone is and how a checkpoint
maps onto it; the reading, matching and checking are ``ssn.transfer``'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

import ssn
from ssn import LatchedNorm, SparseSwitchNormBase, SwitchNormBase
from ssn.transfer import (
    RATIO_MODES,
    TransferReport,
    backbone_state,
    load_backbone,
    read_checkpoint,
    rekey_state,
    with_metadata,
)

__all__ = ["Pretrained", "freeze_backbone", "is_norm", "split_backbone_groups"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pretrained:
    """Where a backbone's weights come from and how they are taken (``NormTask``'s ``pretrained*``
    arguments, documented there).

    Attributes:
        path: the checkpoint file (``~`` expanded).
        ratios: ``keep``, ``reopen`` or ``reset`` (``ssn.transfer.RATIO_MODES``).
        radius_start: the radius a ``reopen``ed ramp starts from.
        trusted: allow unpickling arbitrary objects (off: ``weights_only``).
        head: also load the checkpoint's head when it fits.
    """

    path: str
    ratios: Literal["keep", "reopen", "reset"] = "keep"
    radius_start: float = 0.0
    trusted: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if self.ratios not in RATIO_MODES:
            raise ValueError(f"pretrained_ratios must be one of {RATIO_MODES}, got {self.ratios!r}")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], path: str | None = None) -> Pretrained:
        """From a task's ``pretrained``, ``pretrained_ratios`` ... hyperparameters (``path``
        replaces ``pretrained``; no file: an empty path)."""
        return cls(
            path=path if path is not None else hparams["pretrained"] or "",
            ratios=hparams["pretrained_ratios"],
            radius_start=hparams["pretrained_radius_start"],
            trusted=hparams["pretrained_trusted"],
            head=hparams["pretrained_head"],
        )

    def load(
        self,
        target: nn.Module,
        *,
        stem: str,
        head: tuple[str, ...],
        map_state: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]],
        owner: str,
    ) -> tuple[TransferReport, float | None]:
        """Load the checkpoint's backbone into ``target``.

        Args:
            target: the module receiving the weights (the task's ``pretrained_module``).
            stem: the key of the backbone's first convolution in the checkpoint's layout.
            head: keys of ``target`` allowed to stay new; dropped from the checkpoint unless
                :attr:`head` (a new task's labels start afresh).
            map_state: the task's mapping of a torchvision-layout state onto ``target``.
            owner: who loads (named in the log line).

        Returns:
            The transfer report and the radius the ramp starts from (``keep``: the largest radius
            still in use, None when every SSN layer latched; ``reopen``: :attr:`radius_start`;
            ``reset``: None).
        """
        path = os.path.expanduser(self.path)
        try:
            state, kind = backbone_state(read_checkpoint(path, trusted=self.trusted), stem)
            if not self.head:
                state = rekey_state(state, lambda k: None if head and k.startswith(head) else k)
            state = with_metadata(map_state(state, target), state)
            report = load_backbone(
                target, state, new_ok=head, drop_ok=("fc.", *head), ratios=self.ratios, kind=kind, stem=stem
            )
        except ValueError as e:
            raise ValueError(f"pretrained {path}: {e}" if path not in str(e) else str(e)) from e
        radius: float | None = None
        if self.ratios == "keep":  # the ramp continues from the largest radius still in use
            radius = max(
                (
                    float(m.radius)
                    for _, m in ssn.switch_norms(target)
                    if isinstance(m, SparseSwitchNormBase) and None in m.latched
                ),
                default=None,
            )
        elif self.ratios == "reopen":
            radius = self.radius_start
            ssn.set_radius(target, self.radius_start)
        log.warning("pretrained %s into %s: %s", path, owner, report.summary())
        return report, radius


def is_norm(m: nn.Module) -> bool:
    """A normalization layer: PyTorch's, a latched export, or SN/SSN."""
    return isinstance(
        m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, LatchedNorm, SwitchNormBase)
    )


def freeze_backbone(backbone: nn.Module, prefixes: list[str]) -> list[nn.Module]:
    """Freeze the parameters of ``backbone`` under each name prefix; returns the norm layers left
    with no trainable parameter, which the task keeps in eval mode as Lightning's
    ``BaseFinetuning.freeze`` does (running statistics kept, SSN layers do not latch)."""
    frozen: list[nn.Module] = []
    for prefix in prefixes:
        params = [p for n, p in backbone.named_parameters() if n.startswith(prefix)]
        if not params:
            raise ValueError(
                f"freeze: no backbone parameter starts with {prefix!r}; the backbone's top-level "
                f"names: {sorted({n.split('.')[0] for n, _ in backbone.named_parameters()})}"
            )
        for p in params:
            p.requires_grad_(False)
        frozen += [
            m
            for n, m in backbone.named_modules()
            if n.startswith(prefix) and is_norm(m) and not any(p.requires_grad for p in m.parameters())
        ]
    return frozen


def split_backbone_groups(
    groups: list[dict[str, Any]], backbone: nn.Module, *, head: tuple[str, ...], scale: float
) -> list[dict[str, Any]]:
    """Split each parameter group into its pretrained-backbone part (named ``backbone_<name>``, lr
    x ``scale``) and the rest (the new head); ratio logits keep their own lr relative to each."""
    inside_ids = {id(p) for n, p in backbone.named_parameters() if not n.startswith(head)}
    out = []
    for g in groups:
        inside = [p for p in g["params"] if id(p) in inside_ids]
        outside = [p for p in g["params"] if id(p) not in inside_ids]
        if inside:
            out.append({**g, "name": f"backbone_{g['name']}", "params": inside, "lr": g["lr"] * scale})
        if outside:
            out.append({**g, "params": outside})
    return out
