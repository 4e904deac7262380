"""RadiusSchedule in real Lightning runs: the ramp, latching at the end, exact resume."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ssn
from ssn.schedule import radius_at
from tasks.callbacks import RadiusSchedule, RunSummary

from helpers import cityscapes_args, write_cityscapes

STEPS_PER_EPOCH = 6


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            ssn.SparseSwitchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            ssn.SparseSwitchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(ssn.param_groups(self, lr=0.1, weight_decay=1e-4), lr=0.1, momentum=0.9)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.radii: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.radii.append(float(pl_module.net[1].radius))


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True  # a run cut off here; the checkpoint is its last state


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS_PER_EPOCH * 4, 1, 10, 10, generator=g)
    y = torch.randint(0, 3, (STEPS_PER_EPOCH * 4,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def _trainer(tmp_path, callbacks, epochs=2) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def test_radius_at():
    # the authors' schedule: radius = step / total, linear from 0 to 1.0 (train_imagenet.py)
    total = 1000
    assert [radius_at(s, total, 0.0, 1.0) for s in (0, 500, 999, 2000)] == [0.0, 0.5, 0.999, 1.0]
    assert radius_at(2, 4, 0.0, 0.8, delay=3) == 0.0
    assert radius_at(5, 4, 0.0, 0.8, delay=3) == pytest.approx(0.4)
    assert radius_at(7, 4, 0.2, 0.8, delay=3) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        RadiusSchedule(ramp_fraction=0.6, delay_fraction=0.5)
    with pytest.raises(ValueError):
        RadiusSchedule(ramp_fraction=0.0)


def test_ramp_over_the_run_latches_every_layer_and_resume_is_exact(tmp_path):
    record = Record()
    full = Tiny()
    _trainer(tmp_path / "full", [RadiusSchedule(), record]).fit(full, _loader())
    total = 2 * STEPS_PER_EPOCH
    assert record.radii == pytest.approx([s / total for s in range(total)])  # the authors' ramp to 1.0
    assert all(m.latched[0] and m.latched[1] for _, m in ssn.switch_norms(full))  # one-hot from 0.816 on

    # the same run, cut off after the first epoch and resumed from its last checkpoint
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first, rec1 = Tiny(), Record()
    _trainer(tmp_path / "a", [RadiusSchedule(), rec1, ckpt, StopAfterEpoch(1)]).fit(first, _loader())
    assert len(rec1.radii) == STEPS_PER_EPOCH
    second, rec2 = Tiny(), Record()
    _trainer(tmp_path / "b", [RadiusSchedule(), rec2]).fit(
        second, _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert rec1.radii + rec2.radii == pytest.approx(record.radii, abs=0, rel=0)
    for (name, a), b in zip(full.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_delayed_partial_ramp(tmp_path):
    record = Record()
    _trainer(tmp_path, [RadiusSchedule(end=0.5, ramp_fraction=0.5, delay_fraction=0.25), record]).fit(
        Tiny(), _loader()
    )
    assert record.radii[:4] == [0.0, 0.0, 0.0, 0.0]  # 12 steps: 3 at zero, then 6 of ramp
    assert record.radii[9] == pytest.approx(0.5) and record.radii[8] < 0.5
    assert record.radii[-1] == pytest.approx(0.5)


class LogsAtEpochEnd(pl.LightningModule):
    """Logs its score in its own on_validation_epoch_end, as SemanticSegmenter logs mIoU: after
    the callbacks' epoch-end hooks. The score is known: 10 * epoch + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def on_validation_epoch_end(self):
        self.log("val/score", 10.0 * self.current_epoch + 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_run_summary_records_every_validation_whichever_hook_logs_it(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[RunSummary(), ckpt],
        num_sanity_val_steps=1,
    )  # the sanity check's validation is not recorded
    trainer.fit(LogsAtEpochEnd(), data, data)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [h["epoch"] for h in s["history"]] == [0, 1, 2]
    assert [h["val/score"] for h in s["history"]] == [1.0, 11.0, 21.0]  # each its own, in order
    assert all("val/loss" in h for h in s["history"])
    assert s["metrics"]["val/score"] == 21.0 and s["metrics"]["best/val/score"] == 21.0
    # the checkpoint saved at the last validation already holds it (resume keeps the whole history)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]["RunSummary"]
    assert [h["val/score"] for h in saved["history"]] == [1.0, 11.0, 21.0]


@pytest.mark.slow
def test_segmentation_summary_history_holds_each_validations_miou(tmp_path):
    """The real task: SemanticSegmenter logs mIoU in its on_validation_epoch_end."""
    pytest.importorskip("mmseg")

    from tasks.cli import main

    root, out = write_cityscapes(tmp_path / "cs"), str(tmp_path / "out")
    cli = main(
        [
            "fit",
            *cityscapes_args(root, out, "ssn", "--trainer.val_check_interval=1"),
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={out}",
            "--export=false",
        ]
    )
    history = json.loads((tmp_path / "out" / "summary.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2] and all("val/mIoU" in h for h in history)
    assert history[-1]["val/mIoU"] == pytest.approx(float(cli.trainer.callback_metrics["val/mIoU"]))
