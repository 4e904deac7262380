"""Faults to inject into an ``ssn-bench`` run (used by ``benchmarks/fault_injection.py`` and the tests).

    ssn-bench fit ... --trainer.callbacks+=faults.KillAt --trainer.callbacks.step=40

(with ``benchmarks/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAt(pl.Callback):
    """SIGKILLs the process once optimizer step ``step`` is done: at the start of the next batch,
    after every checkpoint of that step (Lightning runs ``ModelCheckpoint`` after other callbacks)
    and any validation and epoch end in between."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNInputAt(pl.Callback):
    """Puts a NaN into the input of the batch trained at optimizer step ``step`` (a diverging loss)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, *args: object
    ) -> None:
        if trainer.global_step == self.step:
            batch[0].view(-1)[0] = float("nan")  # type: ignore[index]
