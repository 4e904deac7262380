"""A callback the sweep test adds to its runs: SIGKILL the run's own process at a given step (no
clean-up, no checkpoint: what a node failure or an OOM killer does)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAt(pl.Callback):
    def __init__(self, step: int, norm: str) -> None:
        self.step, self.norm = step, norm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.norm == self.norm and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
