"""``RunSummary``: writes the run's ``summary.json`` (the format: :mod:`tasks.summary`) when
fitting ends, with the validation history and the training throughput measured along the way."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from ssn.io import write_text_atomic

from ..summary import SUMMARY_FILE, better, finite_metrics, layer_ratios, peak_memory

__all__ = ["RunSummary"]


class RunSummary(pl.Callback):
    """Write ``<default_root_dir>/summary.json`` when fitting ends: the machine-readable record of
    the run that ``ssn-bench compare`` reads (wandb's API cannot read offline runs).

    It holds the run's identity (``NormTask.run_info``: task, dataset, arch, normalizer, per-device
    and global batch, seed...; at the top level and again under ``run_info``), the resolved config
    (the CLI's ``config.yaml`` when there is one), the hyperparameters, the final metrics and the
    best of each validation metric over the validations (``best/val/...``: max, min for losses),
    the validation history (one entry per validation while fitting, read once it has ended,
    whichever hook logged it), the training throughput (samples/s over all devices, measured over
    training batches only: data loading and the step, excluding validation and each fit's first
    batch), the peak memory (:func:`tasks.summary.peak_memory`) and the final per-layer selection
    (:func:`tasks.summary.layer_ratios`).

    ``status`` is ``fitted``; the CLI adds the test metrics after fit and sets it to ``complete``
    (a sweep re-runs anything not complete). The history and the throughput counters are saved in
    checkpoints, so a resumed run's summary covers the whole run.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.train_samples = 0
        self._mark: float | None = None
        self._first = True
        # resolved in setup (the trainer's folders, the fit's start)
        self._log_dir = Path(".")
        self._path = Path(SUMMARY_FILE)
        self._started = time.time()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # NOTE: trainer.log_dir is a collective under DDP: resolved here, on every rank.
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._path = Path(trainer.default_root_dir) / SUMMARY_FILE
        self._started = time.time()
        self._first = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = None  # validation time is not training time

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # NOTE: read here, not in on_validation_epoch_end: Lightning calls the callbacks' epoch-end
        # hooks before the module's, where a task may log its scores (segmentation's mIoU), so the
        # metrics there are the previous validation's. on_validation_end comes after every
        # epoch-end hook and after the epoch's metrics are reduced (no logging is allowed in it),
        # and before ModelCheckpoint's (Lightning runs checkpoint callbacks last), so a checkpoint
        # saved at this validation already holds it in the history.
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            values = finite_metrics(
                {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            )
            if values:
                self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **values})
        self._mark = time.perf_counter()  # training resumes (mid-epoch validation) from here

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._mark is not None and not self._first:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            n = len(x) if hasattr(x, "__len__") else getattr(trainer.datamodule, "batch_size", 0) or 0
            self.train_seconds += now - self._mark
            self.train_samples += n * trainer.world_size
        self._first = False
        self._mark = now

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "train_seconds": self.train_seconds,
            "train_samples": self.train_samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.train_seconds, self.train_samples = state_dict["train_seconds"], state_dict["train_samples"]

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = finite_metrics(trainer.callback_metrics)
        if self.history:  # a resumed run with nothing left to train validated nothing this time
            metrics = {**{k: v for k, v in self.history[-1].items() if k not in ("epoch", "step")}, **metrics}
        keys = {k for h in self.history for k in h if k not in ("epoch", "step")}
        for k in sorted(keys):
            values = [h[k] for h in self.history if k in h]
            metrics[f"best/{k}"] = better(k)(values)
        memory, memory_kind = peak_memory(pl_module.device)
        config = None
        config_file = self._log_dir / "config.yaml"
        if config_file.is_file():
            import yaml

            config = yaml.safe_load(config_file.read_text())
        info = pl_module.run_info() if hasattr(pl_module, "run_info") else {}
        return {
            **info,
            "status": "fitted",
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "ckpt_path": trainer.ckpt_path,
            "fit_seconds": time.time() - self._started,
            "train_seconds": self.train_seconds,
            "train_samples": self.train_samples,
            "throughput": self.train_samples / self.train_seconds if self.train_seconds > 0 else None,
            "peak_memory_mb": memory,
            "peak_memory_kind": memory_kind,
            "device": str(pl_module.device),
            "metrics": metrics,
            "history": self.history,
            "selection": layer_ratios(pl_module),
            "hparams": json.loads(json.dumps(dict(pl_module.hparams), default=str)),
            "config": config,
            # NOTE: the identity's keys again, apart from the measurements beside them at the top
            # level, so compare knows which top-level fields tell experiments apart.
            "run_info": json.loads(json.dumps(info, default=str)),
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        summary = self.summary(trainer, pl_module)
        if trainer.is_global_zero:
            write_text_atomic(self._path, json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
            _to_wandb(trainer, summary)


# The run's measurements that a wandb workspace compares per group (tasks/workspace.py).
WANDB_SUMMARY = {"throughput": "summary/throughput", "peak_memory_mb": "summary/peak_memory_mb"}


def _to_wandb(trainer: pl.Trainer, summary: dict[str, Any]) -> None:
    """Put the throughput and the peak memory in the wandb run's summary (offline runs too)."""
    from lightning.pytorch.loggers import WandbLogger

    values = {
        key: summary[field]
        for field, key in WANDB_SUMMARY.items()
        if isinstance(summary.get(field), (int, float))
    }
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and values:
            logger.experiment.summary.update(values)
