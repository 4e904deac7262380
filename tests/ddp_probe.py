"""A callback the DDP test adds to a CLI run: each rank writes what it saw at the end of fit."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl

import ssn


class Probe(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = [m for _, m in ssn.switch_norms(pl_module)]
        record = {
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
