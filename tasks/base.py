"""What every task shares: the normalizer choice and the paper's optimisation recipe."""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

import ssn

__all__ = ["NormTask", "lr_factor"]


def lr_factor(step: int, total: int, warmup: int, schedule: str, milestones: list[int], gamma: float) -> float:
    """Learning-rate multiplier at optimizer ``step``: linear warm-up, then cosine or step decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return gamma ** sum(step >= m for m in milestones)


class NormTask(pl.LightningModule):
    """Base of the task modules.

    Args:
        norm: normalizer name for every norm layer of the network (``bn``, ``syncbn``, ``gn``,
            ``in``, ``ln``, ``sn``, ``ssn``; see ``ssn.create_norm``).
        norm_kwargs: extra arguments of the norm layers (e.g. ``{"groups": 32}`` for ``gn``).
        lr: learning rate for a global batch of ``lr_batch_size``; scaled linearly with the real
            global batch (per-device batch x devices x nodes x gradient accumulation).
        lr_batch_size: the reference batch of ``lr`` (the paper: 0.1 for 256).
        momentum, nesterov, weight_decay: SGD.
        ratio_lr_scale, ratio_weight_decay: SN/SSN ratio logits train at ``lr * ratio_lr_scale``
            without decay (the paper's recipe).
        norm_weight_decay: weight decay of the norm affine parameters (None: ``weight_decay``).
        schedule: ``cosine`` or ``step`` (x ``gamma`` at each epoch of ``milestones``).
        warmup_epochs: linear warm-up length (fractions allowed).
        sync_norm: under multi-process training, synchronise BN statistics (BN -> SyncBatchNorm,
            SN/SSN -> ``sync=True``).
        radius_ramp_fraction, radius_delay_fraction, radius_end: the SSN radius stays 0 for the
            delay fraction of the optimizer steps, then ramps to ``radius_end`` (default sqrt(2/3):
            every layer one-hot) over the ramp fraction (``ssn.callbacks.RadiusSchedule``, added
            automatically when the network has SSN layers).
        monitor_ratios: log per-layer ratios, heatmaps and the final selection
            (``tasks.callbacks.NormRatioMonitor``) when the network has SN/SSN layers.
    """

    def __init__(
        self,
        norm: str = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        lr_batch_size: int = 256,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        ratio_lr_scale: float = 0.1,
        ratio_weight_decay: float = 0.0,
        norm_weight_decay: float | None = None,
        schedule: Literal["cosine", "step"] = "cosine",
        warmup_epochs: float = 0.0,
        milestones: list[int] = [30, 60, 90],  # noqa: B006 (jsonargparse needs the literal)
        gamma: float = 0.1,
        sync_norm: bool = True,
        radius_ramp_fraction: float = 1.0,
        radius_delay_fraction: float = 0.0,
        radius_end: float | None = None,
        monitor_ratios: bool = True,
    ) -> None:
        super().__init__()
        # NOTE: collects the subclass's arguments too (Lightning walks the __init__ frames).
        self.save_hyperparameters()
        ssn.get_norm_layer(norm)  # an unknown name fails now, with the valid ones listed
        self.norm = norm
        self.norm_kwargs = dict(norm_kwargs or {})

    def norm_layer(self, dim: int = 2):  # noqa: ANN201
        return ssn.get_norm_layer(self.norm, dim=dim, **self.norm_kwargs)

    # ------------------------------------------------------------------------- optimisation
    def global_batch_size(self) -> int:
        dm = self.trainer.datamodule
        per_device = getattr(dm, "batch_size", None) if dm is not None else None
        if per_device is None:
            raise ValueError("the data module must expose batch_size (per device) to scale the lr")
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def effective_lr(self) -> float:
        return self.hparams.lr * self.global_batch_size() / self.hparams.lr_batch_size

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = self.effective_lr()
        groups = ssn.param_groups(self, lr=lr, weight_decay=hp.weight_decay, ratio_lr_scale=hp.ratio_lr_scale,
                                  ratio_weight_decay=hp.ratio_weight_decay, norm_weight_decay=hp.norm_weight_decay)
        opt = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        per_epoch = max(1, total // epochs)
        warmup = round(hp.warmup_epochs * per_epoch)
        milestones = [m * per_epoch for m in hp.milestones]

        def factor(step: int) -> float:
            return lr_factor(step, total, warmup, hp.schedule, milestones, hp.gamma)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        from ssn.callbacks import RadiusSchedule
        from ssn.norm import _Sparsest

        from .callbacks import NormRatioMonitor

        layers = [m for _, m in ssn.switch_norms(self)]
        callbacks: list[pl.Callback] = []
        if any(isinstance(m, _Sparsest) for m in layers):
            callbacks.append(RadiusSchedule(end=self.hparams.radius_end, ramp_fraction=self.hparams.radius_ramp_fraction,
                                            delay_fraction=self.hparams.radius_delay_fraction))
        if layers and self.hparams.monitor_ratios:
            callbacks.append(NormRatioMonitor())
        return callbacks

    # ----------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self.hparams.sync_norm and self.trainer.world_size > 1:
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
            for _, m in ssn.switch_norms(self):
                m.sync = True

    def on_fit_start(self) -> None:
        # What dashboards group and compare runs by.
        dm = self.trainer.datamodule
        summary = {
            "task": type(self).__name__,
            "dataset": type(dm).__name__ if dm is not None else None,
            "arch": getattr(self.hparams, "arch", None),
            "norm": self.norm,
            "batch_size": getattr(dm, "batch_size", None),
            "global_batch_size": self.global_batch_size(),
            "effective_lr": self.effective_lr(),
            "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
            "world_size": self.trainer.world_size,
        }
        for logger in self.loggers:
            logger.log_hyperparams(summary)

    def on_train_epoch_end(self) -> None:
        skipped = getattr(self.trainer.datamodule, "skipped_images", None)
        if skipped is not None:
            self.log("data/skipped_images", float(skipped), sync_dist=True, reduce_fx="sum")
