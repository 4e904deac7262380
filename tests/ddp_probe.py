"""A callback the DDP test adds to a CLI run: each rank writes what it saw at the end of fit."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl

import ssn


class Probe(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_step_mean = next(iter(ssn.switch_norms(pl_module)))[1].running_mean.tolist()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = [m for _, m in ssn.switch_norms(pl_module)]
        record = {
            "last_step_mean": self.last_step_mean,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "sync": [m.sync for m in layers],
            "running_mean": layers[0].running_mean.tolist(),
            "running_var": layers[-1].running_var.tolist(),
            "effective_lr": pl_module.effective_lr(),
            "global_batch_size": pl_module.global_batch_size(),
        }
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


class ScheduleProbe(pl.Callback):
    """Records, per optimizer step: the lr of the first group, the radius, the ratio-logit gradient
    norm before and after the task's clipping, the latched layers, and the final-epochs crop flag."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the module's hook
        grads = [p.grad for p in pl_module.ratio_parameters() if p.grad is not None]
        self._pre = float(sum(g.square().sum() for g in grads) ** 0.5) if grads else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.ratio_parameters() if p.grad is not None]
        layers = [m for _, m in ssn.switch_norms(pl_module)]
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "lr": self._lr,
                "radius": float(layers[0].radius),
                "pre": self._pre,
                "post": float(sum(g.square().sum() for g in grads) ** 0.5) if grads else 0.0,
                "latched": sum(all(m.latched) for m in layers),
                "layers": len(layers),
                "final_crop": bool(trainer.datamodule._final.value),
            }
        )
