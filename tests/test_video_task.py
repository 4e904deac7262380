"""The video task through the ssn-bench CLI on real mp4 fixtures; multi-view test averaging; configs."""

from __future__ import annotations

import pytest
import torch

import ssn
from tasks.cli import main
from tasks.video import VideoClassifier, build_slow_resnet

from helpers import BASE, ROOT, csv_fixture


def test_norms_by_name_everywhere_and_slow_r50_shape():
    task = VideoClassifier(arch="slow_r50", num_classes=400, norm="ssn")
    layers = dict(ssn.switch_norms(task))
    assert len(layers) == 53 and all(type(m).__name__ == "SparseSwitchNorm3d" for m in layers.values())
    net = task.net
    assert net.blocks[0].conv.kernel_size == (1, 7, 7) and net.blocks[5].pool.kernel_size == (8, 7, 7)
    assert [len(s.res_blocks) for s in net.blocks[1:5]] == [3, 4, 6, 3]
    assert [s.res_blocks[0].branch2.conv_a.kernel_size[0] for s in net.blocks[1:5]] == [1, 1, 3, 3]
    gn = build_slow_resnet("slow_r14", 5, 3, ssn.get_norm_layer("gn", dim=3, groups=16))
    assert [len(s.res_blocks) for s in gn.blocks[1:5]] == [1, 1, 1, 1]
    assert {type(m).__name__ for m in gn.modules() if "Norm" in type(m).__name__} == {"GroupNorm"}
    with pytest.raises(KeyError, match="unknown arch"):
        VideoClassifier(arch="x3d")
    with pytest.raises(ValueError, match="multiple of 32"):
        VideoClassifier(arch="slow_r14", crop_size=100)


def test_multiview_test_averages_the_softmax_of_each_videos_views():
    task = VideoClassifier(
        arch="slow_r14", num_classes=3, norm="bn", frames=2, crop_size=32, dropout=0.0
    ).eval()
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, value)  # no trainer here
    x, y = torch.randn(2 * 6, 3, 2, 32, 32), torch.tensor([0, 2])
    with torch.no_grad():
        task.test_step((x, y), 0)
        probs = task(x).softmax(-1)
    want = torch.stack([probs[:6].mean(0), probs[6:].mean(0)])  # 6 views per video, adjacent
    torch.testing.assert_close(logged["test/loss"], torch.nn.functional.nll_loss(want.log(), y))
    assert task.metrics["test_acc1"].compute() == (want.argmax(1) == y).float().mean()


@pytest.mark.parametrize("norm", ["bn", "syncbn", "gn", "in", "ln", "sn", "ssn"])
def test_kinetics_configs_parse(norm, capsys):
    cfg = ROOT / "configs/kinetics/slow_r50_kinetics400-224.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                BASE,
                "--config",
                str(cfg),
                "--config",
                str(ROOT / f"configs/norms/{norm}.yaml"),
                "--print_config",
            ]
        )
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: tasks.VideoClassifier" in printed and f"norm: {norm}" in printed
    assert "lr_batch_size: 512" in printed and "nesterov: true" in printed


@pytest.mark.slow
def test_cli_fit_val_and_multiview_test_on_real_clips(tmp_path):
    csv_fixture(tmp_path / "clips", n=8)
    out = tmp_path / "out"
    small = [
        "--model.init_args.frames=2",
        "--model.init_args.crop_size=32",
        "--data.init_args.frames=2",
        "--data.init_args.crop_size=32",
        "--data.init_args.train_short_side=[32,40]",
        "--data.init_args.val_short_side=32",
        "--data.init_args.batch_size=4",
    ]
    cli = main(
        [
            "fit",
            "--config",
            BASE,
            "--config",
            str(ROOT / "configs/clips/slow_r14_clips-64.yaml"),
            "--config",
            str(ROOT / "configs/norms/ssn.yaml"),
            "--config",
            str(ROOT / "configs/clips/norms/ssn.yaml"),
            "--config",
            str(ROOT / "configs/base/quiet.yaml"),
            f"--data.init_args.root={tmp_path / 'clips'}",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.max_epochs=1",
            *small,
            "--export=false",
        ]
    )  # NOTE: torch.export of the 3D network takes a minute: not in the fast suite
    assert cli.model.hparams.num_classes == 3  # linked from the list file
    assert cli.trainer.global_step == cli.trainer.estimated_stepping_batches == 2  # 8 videos / batch 4: known
    assert all(all(m.latched) for _, m in ssn.switch_norms(cli.model))  # the radius ramp ended
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/acc1", "val/acc3", "val/loss"} <= set(metrics)
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert set(test) == {"test/acc1", "test/acc3", "test/loss"}  # 2 clips x 3 crops per video, averaged
    assert list((out / "ssn").glob("selection.json")) and list(out.rglob("last.ckpt"))
