"""The ImageNet SSN config reproduces the authors' training script (switchablenorms/Sparse_SwitchNorm,
train_imagenet.py): radius step/total from 0 to 1.0, step lr x0.1 at epochs 30/60/90 without warm-up,
ratio-logit gradient norm clipped to 1, lighting noise and the final-5-epochs crop. Checked in a real
100-epoch run of the config (one tiny step per epoch) on a fixture in ImageNet's layout."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from datamodules.imagenet import EpochSwitch, ImageNetDataModule, Lighting
from tasks.cli import main

from helpers import ROOT, imagenet_fixture

IMAGENET = ROOT / "configs/imagenet/resnet50_imagenet-224.yaml"
SSN = [IMAGENET, ROOT / "configs/norms/ssn.yaml", ROOT / "configs/imagenet/norms/ssn.yaml"]  # the SSN recipe


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):

    tmp = tmp_path_factory.mktemp("recipe")
    imagenet_fixture(tmp / "imagenet", corrupt=False)
    cli = main(
        [
            "fit",
            *(a for c in SSN for a in ("--config", str(c))),
            "--config",
            str(ROOT / "configs/base/quiet.yaml"),
            "--model.init_args.arch=resnet_small",
            f"--data.init_args.root={tmp / 'imagenet'}",
            "--data.init_args.crop_size=16",
            "--data.init_args.resize_size=20",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp}",
            "--trainer.callbacks+=ddp_probe.ScheduleProbe",
            "--model.init_args.monitor_ratios=false",
            "--export=false",
        ]
    )
    probe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ScheduleProbe")
    return cli, probe.rows


def test_config_values_name_their_source():
    text = IMAGENET.read_text()
    assert "switchablenorms/Sparse_SwitchNorm" in text and "train_imagenet.py" in text
    cfg = {k: v for c in SSN for k, v in yaml.safe_load(c.read_text())["model"]["init_args"].items()}
    assert cfg["schedule"] == "step" and cfg["warmup_epochs"] == 0 and cfg["ratio_grad_clip"] == 1.0


@pytest.mark.timeout(600)
def test_radius_lr_clip_and_crop_follow_the_authors_script(recipe_run):
    cli, rows = recipe_run
    assert len(rows) == 100  # one optimizer step per epoch, 100 epochs
    # radius: the authors' step / total, so 0.5 at 50% and 0.82 at 82% of the steps
    assert rows[50]["radius"] == pytest.approx(0.50) and rows[82]["radius"] == pytest.approx(0.82)
    # every layer is one-hot from sqrt(2/3) = 0.8165 on: latched at step 82, not at step 81
    assert rows[81]["latched"] < rows[81]["layers"] and rows[82]["latched"] == rows[82]["layers"]
    base = 0.1 * 2 / 256  # lr 0.1 per 256 images at a global batch of 2
    lr = {r["epoch"]: r["lr"] for r in rows}
    assert lr[0] == pytest.approx(base) and lr[29] == pytest.approx(base)  # no warm-up, no decay yet
    assert lr[30] == pytest.approx(base * 0.1) and lr[59] == pytest.approx(base * 0.1)
    assert lr[60] == pytest.approx(base * 0.01) and lr[90] == pytest.approx(base * 0.001)
    # ratio-logit gradient norm clipped to 1 (all logits together), after the module's hook
    dense = [r for r in rows if r["latched"] < r["layers"]]
    assert all(r["post"] == pytest.approx(min(r["pre"], 1.0), rel=1e-5) for r in dense)
    # the last 5 epochs train with Resize + RandomCrop instead of RandomResizedCrop
    crop = {r["epoch"]: r["final_crop"] for r in rows}
    assert not crop[94] and crop[95] and crop[99]
    assert cli.model.hparams.norm_kwargs == {"momentum": 0.003}


def test_ratio_gradient_clip_bites(tmp_path):
    """With a clip far below the gradient norm, the clipped norm is exactly the clip."""
    from tasks import ImageClassifier

    model = ImageClassifier(
        arch="resnet_small", num_classes=10, in_channels=1, norm="ssn", ratio_grad_clip=1e-4
    )
    model.log = lambda *a, **k: None
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = math.sqrt(sum(float(p.grad.square().sum()) for p in model.ratio_parameters()))
    model.on_before_optimizer_step(None)
    after = math.sqrt(sum(float(p.grad.square().sum()) for p in model.ratio_parameters()))
    assert before > 1e-3 and after == pytest.approx(1e-4, rel=1e-4)


def test_lighting_matches_the_authors_color_augmentation():
    img = torch.rand(3, 5, 5)
    torch.manual_seed(0)
    got = Lighting(0.1)(img)
    torch.manual_seed(0)  # their ColorAugmentation, as written in utils/imagenet_dataset.py
    eig_vec = torch.Tensor(
        [[0.4009, 0.7192, -0.5675], [-0.8140, -0.0045, -0.5808], [0.4203, -0.6948, -0.5836]]
    )
    eig_val = torch.Tensor([[0.2175, 0.0188, 0.0045]])
    alpha = torch.normal(mean=torch.zeros_like(eig_val)) * 0.1
    want = img + torch.mm(eig_val * alpha, eig_vec).view(3, 1, 1)
    torch.testing.assert_close(got, want)


def test_final_crop_switch_and_validate_needs_only_val(tmp_path):

    imagenet_fixture(tmp_path, corrupt=False)
    dm = ImageNetDataModule(str(tmp_path), num_workers=0, crop_size=16, resize_size=20, final_epochs=5)
    switch = dm._transform(train=True)
    assert isinstance(switch, EpochSwitch)
    dm.set_epoch(94, 100)
    assert switch.flag.value == 0
    dm.set_epoch(95, 100)
    assert switch.flag.value == 1
    import shutil

    shutil.rmtree(tmp_path / "train")
    only_val = ImageNetDataModule(str(tmp_path), num_workers=0, crop_size=16, resize_size=20)
    only_val.setup("validate")  # evaluating a released model needs no train/
    assert only_val.num_classes == 3 and len(only_val.data["val"]) == 6
    with pytest.raises(FileNotFoundError, match="needed to fit"):
        ImageNetDataModule(str(tmp_path)).setup("fit")
