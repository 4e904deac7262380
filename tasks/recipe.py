"""The optimisation recipe of every task: SGD with the learning rate scaled linearly by the global
batch, a per-step schedule (warm-up, then cosine, step or poly), the SN/SSN ratio logits in their
own parameter group (own lr scale and decay) with their gradient norm clipped.

``NormTask.configure_optimizers`` builds a :class:`Recipe` from its hyperparameters and calls it;
the trainer-dependent quantities (global batch, steps per epoch) are the functions below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

import ssn

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "Recipe",
    "check_training_batches",
    "global_batch_size",
    "lr_factor",
    "ratio_parameters",
    "steps_per_epoch",
]


def lr_factor(
    step: int,
    total: int,
    warmup: int,
    schedule: str,
    milestones: Sequence[int],
    gamma: float,
    power: float = 0.9,
    min_factor: float = 0.0,
) -> float:
    """Learning-rate multiplier at optimizer ``step``: linear warm-up, then cosine, step decay
    (x ``gamma`` at each milestone step) or poly (mmseg's ``PolyLR``: ``(1 - t)^power`` from 1 down
    to ``min_factor``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1 - min_factor) * (1 - progress) ** power + min_factor
    return gamma ** sum(step >= m for m in milestones)


@dataclass(frozen=True)
class Recipe:
    """SGD, its schedule and the ratio group; the fields are ``NormTask``'s arguments of the same
    names (documented there), which stay the CLI's keys."""

    lr: float
    lr_batch_size: int
    momentum: float
    nesterov: bool
    weight_decay: float
    ratio_lr_scale: float
    ratio_weight_decay: float
    ratio_grad_clip: float | None
    norm_weight_decay: float | None
    schedule: Literal["cosine", "step", "poly"]
    warmup_epochs: float
    milestones: Sequence[int]
    gamma: float
    poly_power: float
    min_lr: float

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> Recipe:
        """The recipe fields of a task's hyperparameters (the other keys are ignored)."""
        return cls(**{f.name: hparams[f.name] for f in fields(cls)})

    def scaled_lr(self, global_batch: int) -> float:
        """``lr`` for the real global batch (linear scaling from ``lr_batch_size``)."""
        return self.lr * global_batch / self.lr_batch_size

    @property
    def needs_epochs(self) -> bool:
        """Whether the schedule is written in epochs (milestones, warm-up) and needs their length."""
        return self.schedule == "step" or bool(self.warmup_epochs)

    def param_groups(self, module: nn.Module, lr: float) -> list[dict[str, Any]]:
        """``ssn.param_groups``: ratio logits, norm affine parameters and the rest, each with its
        lr and decay."""
        return ssn.param_groups(
            module,
            lr=lr,
            weight_decay=self.weight_decay,
            ratio_lr_scale=self.ratio_lr_scale,
            ratio_weight_decay=self.ratio_weight_decay,
            norm_weight_decay=self.norm_weight_decay,
        )

    def optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.SGD:
        """SGD over the trainable parameters of ``groups`` (frozen ones and emptied groups left out)."""
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        return torch.optim.SGD(
            [g for g in groups if g["params"]], lr=lr, momentum=self.momentum, nesterov=self.nesterov
        )

    def scheduler(
        self, optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """The per-step schedule of every group (``steps_per_epoch`` converts the epoch-based
        warm-up and milestones)."""
        warmup = round(self.warmup_epochs * steps_per_epoch)
        milestones = [m * steps_per_epoch for m in self.milestones]

        def factor(group_lr: float) -> Callable[[int], float]:
            # NOTE: min_lr is absolute for every group (mmengine's PolyLR eta_min), so each group
            # gets its own floor as a fraction of its own lr.
            floor = min(1.0, self.min_lr / group_lr) if group_lr > 0 else 0.0
            return lambda step: lr_factor(
                step, total_steps, warmup, self.schedule, milestones, self.gamma, self.poly_power, floor
            )

        return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])

    def clip_ratio_grads(self, module: nn.Module) -> Tensor | None:
        """Clip the gradient norm of all ratio logits together to ``ratio_grad_clip``; returns the
        norm before clipping (None: no clipping, or no ratio gradient)."""
        if self.ratio_grad_clip is None:
            return None
        params = [p for p in ratio_parameters(module) if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.ratio_grad_clip) if params else None


def ratio_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The mean and variance ratio logits of every SN/SSN layer of ``module``."""
    return [p for _, m in ssn.switch_norms(module) for p in (m.mean_logits, m.var_logits)]


def global_batch_size(trainer: pl.Trainer) -> int:
    """Samples per optimizer step over all devices: the data module's per-device ``batch_size``
    x devices x nodes x gradient accumulation."""
    dm = trainer.datamodule
    per_device = getattr(dm, "batch_size", None) if dm is not None else None
    if per_device is None:
        raise ValueError("the data module must expose batch_size (per device) to scale the lr")
    if not isinstance(per_device, int) or per_device < 1:
        raise ValueError(
            f"data batch_size must be a positive number of samples per device, got {per_device!r}"
        )
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one epoch (of this rank's loader, after limit_train_batches)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what estimated_stepping_batches does, whatever max_epochs is
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError("epoch-based schedules need a sized training loader")
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def check_training_batches(trainer: pl.Trainer) -> None:
    """Refuse a training split that gives no batch, which would train nothing and still end as a
    finished run (with the test metrics of an untrained network)."""
    if trainer.train_dataloader is None:  # a max_steps run's estimate did not build it
        trainer.fit_loop.setup_data()
    if trainer.num_training_batches:
        return
    loader = trainer.train_dataloader
    loader = getattr(loader, "iterables", loader)  # Lightning's CombinedLoader around ours
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if hasattr(dataset, "__len__") else "an unknown number of"
    raise ValueError(
        f"the training split gives no batch: {size} samples (per device), batch_size "
        f"{getattr(loader, 'batch_size', None)}, drop_last={getattr(loader, 'drop_last', None)}, "
        f"limit_train_batches={trainer.limit_train_batches}: no step would train; use a smaller "
        "batch_size or more training data"
    )
