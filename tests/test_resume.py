"""Exact resume: a run killed with SIGKILL (a second process) and resumed with ``--ckpt_path last``
ends bit-identical to the uninterrupted run: weights, running statistics, latches, metrics."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.seed import seed_everything
from torch.utils.data import Dataset

from datamodules.resumable import ResumableLoader
from tasks.checkpointing import AtomicCheckpointIO
from tasks.cli import main

from helpers import BASE, QUIET, ROOT, fmnist, needs_fmnist

CKPT_EVERY_STEP = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 1}
"""


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    cfg = tmp_path / "every_step.yaml"
    cfg.write_text(CKPT_EVERY_STEP)
    out = str(tmp_path / out)
    return [
        "--config",
        BASE,
        *fmnist("ssn"),
        "--config",
        str(cfg),
        "--config",
        QUIET,
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=2",
        "--trainer.max_epochs=2",
        "--data.batch_size=16",
        "--export=false",
        *extra,
    ]


def _state(cli) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    full = main(["fit", *_args(tmp_path_factory.mktemp("full"), "full")])
    assert full.trainer.global_step == 10
    assert isinstance(
        full.trainer.strategy.checkpoint_io, AtomicCheckpointIO
    )  # from configs/base/trainer.yaml
    return _state(full), {k: float(v) for k, v in full.trainer.callback_metrics.items()}


@pytest.mark.slow
@needs_fmnist
@pytest.mark.timeout(400)
@pytest.mark.parametrize("kill_at", [3, 5])  # mid-epoch; at the epoch's end (checkpoint before validation)
def test_sigkilled_run_resumes_bit_identical(tmp_path, kill_at, uninterrupted):
    expected, metrics = uninterrupted

    # NOTE: without this process's wandb service: each child starts its own, as a real run does (a
    # killed child's run would stay registered in a shared service)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)])
    cli = [sys.executable, "-m", "tasks.cli", "fit", *_args(tmp_path, "cut")]
    killed = subprocess.run(
        [*cli, "--trainer.callbacks+=faults.KillAt", f"--trainer.callbacks.step={kill_at}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # it really died, by SIGKILL
    last = tmp_path / "cut/checkpoints/last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == kill_at

    # NOTE: resumed in a new process, as a user would (and wandb allows one run id per process)
    resumed = subprocess.run(
        [*cli, "--ckpt_path=last"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 10
    got = final["state_dict"]
    assert got.keys() == expected.keys()
    for name, value in expected.items():  # bit-identical: weights, ratios, running stats, latches
        assert torch.equal(got[name], value), name
    summary = json.loads((tmp_path / "cut/summary.json").read_text())
    for key in ("val/acc1", "val/loss"):
        assert summary["metrics"][key] == metrics[key], key
    runs = sorted((tmp_path / "cut/wandb").glob("offline-run-*"))
    assert (
        len(runs) == 2 and runs[0].name.rsplit("-", 1)[1] == runs[1].name.rsplit("-", 1)[1]
    )  # one wandb run id
    assert runs[0].name.rsplit("-", 1)[1] == saved["logger_versions"]["WandbLogger"]


class _Noisy(Dataset):
    """Each sample draws from torch, numpy and random, as an augmentation pipeline does."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item(), np.random.rand(), random.random()])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_mid_epoch_with_the_same_samples_and_augmentation(workers):
    def batches(loader: ResumableLoader, epoch: int, n: int | None = None) -> list[torch.Tensor]:
        loader.sampler.set_epoch(epoch)
        out = []
        for b in loader:
            out.append(b)
            if n is not None and len(out) == n:
                break
        return out

    seed_everything(1)
    loader = ResumableLoader(_Noisy(), batch_size=4, seed=7, num_workers=workers)
    whole = batches(loader, 3)
    seed_everything(1)
    cut = ResumableLoader(_Noisy(), batch_size=4, seed=7, num_workers=workers)
    head = batches(cut, 3, n=2)
    state = cut.state_dict()
    assert (state["epoch"], state["batches"]) == (3, 2)
    (
        torch.rand(5),
        random.random(),
        np.random.rand(),
    )  # the killed process's streams move on; the checkpoint holds them as they were

    again = ResumableLoader(_Noisy(), batch_size=4, seed=7, num_workers=workers)
    again.load_state_dict(state)
    tail = batches(again, 3)
    assert len(tail) == len(whole) - 2
    for a, b in zip(whole, head + tail, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(whole[0][:, 0], batches(again, 4)[0][:, 0])  # a new epoch, a new order
    with pytest.raises(ValueError, match="seeded with 7"):
        ResumableLoader(_Noisy(), batch_size=4, seed=8).load_state_dict(state)
