"""The classification task and the ssn-bench CLI: smoke runs, resume, learning on real data, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ssn
from tasks import ImageClassifier
from tasks.base import lr_factor
from tasks.cli import main

from helpers import BASE, QUIET, ROOT, fmnist_args, imagenet_fixture, needs_fmnist


def test_lr_factor_warmup_cosine_and_step():
    assert lr_factor(0, 100, 10, "cosine", [], 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", [], 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", [], 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", [], 0.1) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", [], 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(29, 100, 0, "step", [30, 60], 0.1) == 1.0
    assert lr_factor(30, 100, 0, "step", [30, 60], 0.1) == pytest.approx(0.1)
    assert lr_factor(75, 100, 0, "step", [30, 60], 0.1) == pytest.approx(0.01)
    # mmseg's PolyLR: (base - min) * (1 - t)^0.9 + min, as a factor of base
    assert lr_factor(50, 100, 0, "poly", [], 0.1, power=0.9, min_factor=0.01) == pytest.approx(
        0.99 * 0.5**0.9 + 0.01
    )
    assert lr_factor(100, 100, 0, "poly", [], 0.1, power=0.9, min_factor=0.01) == pytest.approx(0.01)


@pytest.mark.parametrize("arch", ["resnet_small", "resnet18", "resnet50"])
def test_classifier_builds_with_zero_init_and_groups(arch):
    model = ImageClassifier(
        arch=arch, num_classes=10, in_channels=1 if arch == "resnet_small" else 3, norm="ssn"
    )
    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    last = [b.bn3 if hasattr(b, "bn3") else b.bn2 for b in blocks]
    assert last and all(not n.weight.any() for n in last)
    names = {g["name"] for g in ssn.param_groups(model, 0.1, 1e-4)}
    assert names == {"params", "norm", "ratios"}
    with pytest.raises(KeyError, match="valid names"):
        ImageClassifier(arch=arch, norm="batchnorm")
    with pytest.raises(KeyError, match="unknown arch"):
        ImageClassifier(arch="vgg", norm="bn")


@pytest.mark.parametrize("norm", ["ssn", "bn"])
def test_channels_last_switch_changes_the_layout_not_the_result(norm):
    """``channels_last: true`` stores the weights and feeds the input channels-last; outputs and
    gradients are those of the contiguous twin (same weights)."""
    torch.manual_seed(0)
    a = ImageClassifier(
        arch="resnet_small", num_classes=10, in_channels=1, norm=norm, zero_init_residual=False
    )
    b = ImageClassifier(
        arch="resnet_small",
        num_classes=10,
        in_channels=1,
        norm=norm,
        zero_init_residual=False,
        channels_last=True,
    )
    b.load_state_dict(a.state_dict())
    a.configure_model()
    b.configure_model()
    conv = "layers.0.0.conv1.weight"  # (16, 16, 3, 3): the two layouts differ
    assert b.net.get_parameter(conv).is_contiguous(memory_format=torch.channels_last)
    assert not a.net.get_parameter(conv).is_contiguous(memory_format=torch.channels_last)
    seen = []
    b.net.layers[0][0].bn1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(8, 1, 28, 28)
    ya, yb = a(x), b(x)
    assert seen == [True]
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
@needs_fmnist
def test_cli_fit_writes_checkpoint_dashboards_and_export(tmp_path, capsys):
    cli = main(["fit", *fmnist_args(tmp_path, "ssn", "--trainer.max_epochs=1")])
    out = tmp_path / "out"
    assert cli.trainer.global_step == 6 and cli.model.hparams.num_classes == 10  # linked from data
    assert (out / "ssn" / "selection.json").is_file() and list((out / "ssn").glob("heatmap-epoch*.png"))
    rows = json.loads((out / "ssn" / "selection.json").read_text())
    assert len(rows) == 9 and all(r["mean_latch"] and r["var_latch"] for r in rows)  # ramp ended
    assert list(out.rglob("last.ckpt"))
    program = torch.export.load(out / "exported" / "model.pt2").module()
    assert program(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    summary = json.loads((out / "summary.json").read_text())
    wandb_summary = dict(cli.trainer.logger.experiment.summary)  # what a workspace compares per group
    assert wandb_summary["summary/throughput"] == summary["throughput"] > 0
    assert wandb_summary["summary/peak_memory_mb"] == summary["peak_memory_mb"]
    cli.trainer.logger.experiment.finish()  # NOTE: wandb writes its run file asynchronously until finished
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))  # an offline wandb run, uploadable with wandb sync
    printed = capsys.readouterr().out
    assert "9/9 layers latched" in printed and "test (exported): test/acc1" in printed
    accs = [line.split("test/acc1 ")[1].split(",")[0] for line in printed.splitlines() if "test/acc1" in line]
    assert len(accs) == 2 and accs[0] == accs[1]  # exporting changed nothing


@pytest.mark.slow
@needs_fmnist
def test_cli_resume_continues_from_last_checkpoint(tmp_path):
    main(["fit", *fmnist_args(tmp_path, "ssn", "--trainer.max_epochs=1", "--export=false")])
    first = next((tmp_path / "out" / "checkpoints").glob("last.ckpt"))
    assert torch.load(first, weights_only=False)["global_step"] == 6
    cli = main(
        ["fit", *fmnist_args(tmp_path, "ssn", "--trainer.max_epochs=2", "--export=false", "--ckpt_path=last")]
    )
    assert cli.trainer.global_step == 12 and cli.trainer.current_epoch == 2
    assert cli.trainer.ckpt_path == str(first)  # it really resumed (not a silent fresh start)
    # the schedule keeps the ramp fixed when the run started (1 epoch of 6 steps), not the new length
    sched = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RadiusSchedule")
    assert (sched.delay_steps, sched.ramp_steps) == (round(6 * 0.2), round(6 * 0.5))


@pytest.mark.slow
@needs_fmnist
def test_cli_validate_and_test_subcommands(tmp_path):
    main(["fit", *fmnist_args(tmp_path, "bn", "--trainer.max_epochs=1", "--export=false")])
    ckpt = next((tmp_path / "out").rglob("last.ckpt"))
    main(["validate", *fmnist_args(tmp_path, "bn"), f"--ckpt_path={ckpt}"])
    main(["test", *fmnist_args(tmp_path, "bn"), f"--ckpt_path={ckpt}"])


def test_cli_rejects_unknown_normalizer(tmp_path):
    with pytest.raises((KeyError, ValueError), match="valid names: bn, syncbn"):
        main(["fit", *fmnist_args(tmp_path, "ssn", "--model.init_args.norm=batchnorm")])


@pytest.mark.slow
@needs_fmnist
@pytest.mark.timeout(300)
def test_short_real_training_learns_fashion_mnist(tmp_path):
    """~20 s on 2 cores: 300 steps of an SSN ResNet on real Fashion-MNIST, radius ramped to one-hot
    inside them, end far above chance (0.10 accuracy, loss ln 10 = 2.30) with every layer latched."""
    cli = main(
        [
            "fit",
            *fmnist_args(
                tmp_path,
                "ssn",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=300",
                "--trainer.limit_val_batches=10",
                "--trainer.limit_test_batches=20",
                "--data.batch_size=64",
                "--export=false",
            ),
        ]
    )
    res = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert res["test/acc1"] > 0.5 and res["test/loss"] < 1.2, res
    assert all(all(m.latched) for _, m in ssn.switch_norms(cli.model))


@pytest.mark.slow
@needs_fmnist
@pytest.mark.timeout(400)
@pytest.mark.parametrize("norm", ["ssn", "syncssn"])
def test_ddp_two_cpu_processes_sync_by_name_and_scale_lr(tmp_path, norm):
    """The name alone decides: ssn keeps per-device statistics (averaged over the ranks before
    validation and checkpoints), syncssn all-reduces them in every step."""
    probe = tmp_path / "probe"
    cmd = [
        sys.executable,
        "-m",
        "tasks.cli",
        "fit",
        *fmnist_args(tmp_path, "ssn", "--trainer.max_epochs=1", "--export=false"),
        f"--model.init_args.norm={norm}",
        "--config",
        str(ROOT / "configs/base/ddp.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.callbacks+=ddp_probe.Probe",
        f"--trainer.callbacks.out_dir={probe}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    for rec in ranks:
        assert rec["world_size"] == 2 and rec["global_step"] == 6
        assert all(rec["sync"]) == (norm == "syncssn") and any(rec["sync"]) == (norm == "syncssn")
        assert rec["global_batch_size"] == 32
        assert math.isclose(rec["effective_lr"], 0.2 * 32 / 256)
    assert ranks[0]["running_mean"] == ranks[1]["running_mean"]  # every rank evaluates the same model
    assert ranks[0]["running_var"] == ranks[1]["running_var"]
    last = [torch.tensor(r["last_step_mean"]) for r in ranks]
    if norm == "ssn":  # per-device statistics differ after a step; the saved model has their mean
        assert not torch.equal(last[0], last[1])
        torch.testing.assert_close(torch.tensor(ranks[0]["running_mean"]), (last[0] + last[1]) / 2)
    else:
        assert torch.equal(last[0], last[1])


@pytest.mark.slow
def test_cli_imagenet_config_on_a_fixture_in_the_real_layout(tmp_path):

    imagenet_fixture(tmp_path / "imagenet")
    out = str(tmp_path / "out")
    cli = main(
        [
            "fit",
            "--config",
            BASE,
            "--config",
            str(ROOT / "configs/imagenet/resnet50_imagenet-224.yaml"),
            "--config",
            str(ROOT / "configs/norms/ssn.yaml"),
            "--config",
            str(ROOT / "configs/imagenet/norms/ssn.yaml"),
            "--model.init_args.arch=resnet18",
            f"--data.init_args.root={tmp_path / 'imagenet'}",
            "--data.init_args.crop_size=32",
            "--data.init_args.resize_size=36",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            "--config",
            QUIET,
            "--export=false",
        ]
    )
    assert cli.model.hparams.num_classes == 3  # linked from the class folders
    assert cli.trainer.global_step == 3  # 14 images (2 unreadable, skipped) in batches of 4, last dropped
    assert cli.datamodule.skipped_images >= 1


@pytest.mark.slow
@needs_fmnist
def test_step_schedule_epoch_length_when_max_steps_caps_the_run(tmp_path):
    """Epochs of 3 steps: milestone epoch 2 is step 6, whatever max_epochs says (-1: unbounded)."""
    cli = main(
        [
            "fit",
            *fmnist_args(
                tmp_path,
                "bn",
                "--trainer.max_epochs=-1",
                "--trainer.max_steps=8",
                "--trainer.limit_train_batches=3",
                "--model.init_args.schedule=step",
                "--model.init_args.milestones=[2]",
                "--model.init_args.warmup_epochs=0",
                "--model.init_args.warmup_epochs=1",
                "--export=false",
            ),
        ]
    )
    factor = cli.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert [factor(s) for s in (0, 2, 3, 5, 6, 7)] == pytest.approx([1 / 3, 1.0, 1.0, 1.0, 0.1, 0.1])
