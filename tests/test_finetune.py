"""Fine-tuning: `pretrained` from every source format, the three ratio modes, refusals, and the
optimisation options. References are the source checkpoints' own tensors (read back from disk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import ssn
from ssn.norm import _SwitchNormFn
from ssn.transfer import backbone_state, read_checkpoint
from tasks import ImageClassifier
from tasks.cli import main

from helpers import (
    BASE,
    QUIET,
    ROOT,
    fmnist_run_args,
    imagenet_fixture,
    needs_fmnist,
    their_model,
    their_state_dict,
)


def _args(out: Path, *extra: str) -> list[str]:
    return fmnist_run_args(out, "ssn", "--trainer.max_epochs=1", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 6-step SSN run on Fashion-MNIST: its last.ckpt and its native export."""
    out = tmp_path_factory.mktemp("src") / "out"
    main(["fit", *_args(out)])
    return out / "checkpoints" / "last.ckpt", out / "exported" / "model.state_dict.pt"


def _switch_state(module: nn.Module) -> dict[str, torch.Tensor]:
    keys = ("mean_logits", "var_logits", "radius", "mean_latch", "var_latch", "running_mean", "running_var")
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in ssn.switch_norms(module) for k in keys}


@pytest.mark.slow
@needs_fmnist
def test_lightning_checkpoint_keep_inherits_everything_and_runs_native(trained, monkeypatch):
    ckpt, _ = trained
    source = {k[len("net.") :]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    task = ImageClassifier(
        arch="resnet_small", num_classes=4, in_channels=1, norm="ssn", pretrained=str(ckpt)
    )
    task.configure_model()
    for name, m in ssn.switch_norms(task.net):
        for k in (
            "mean_logits",
            "var_logits",
            "radius",
            "mean_latch",
            "var_latch",
            "running_mean",
            "running_var",
            "weight",
        ):
            torch.testing.assert_close(getattr(m, k), source[f"{name}.{k}"], rtol=0, atol=0)
        assert None not in m.latched
    assert task.net.fc.out_features == 4  # a new head for the new label set
    torch.testing.assert_close(task.net.conv1.weight, source["conv1.weight"], rtol=0, atol=0)
    # the first fine-tuning step runs the native kernels for layers latched to one statistic
    calls = []
    real = _SwitchNormFn.apply
    monkeypatch.setattr(_SwitchNormFn, "apply", lambda *a: calls.append(1) or real(*a))
    task.train()
    task.net(torch.randn(4, 1, 28, 28)).sum().backward()
    same = sum(m.latched[0] == m.latched[1] for _, m in ssn.switch_norms(task.net))
    assert len(calls) == len(list(ssn.switch_norms(task.net))) - same


@pytest.mark.slow
@needs_fmnist
def test_reopen_and_reset(trained):
    ckpt, _ = trained
    source = {k[len("net.") :]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    reopen = ImageClassifier(
        arch="resnet_small",
        num_classes=10,
        in_channels=1,
        norm="ssn",
        pretrained=str(ckpt),
        pretrained_ratios="reopen",
        pretrained_radius_start=0.3,
    )
    reopen.configure_model()
    reset = ImageClassifier(
        arch="resnet_small",
        num_classes=10,
        in_channels=1,
        norm="ssn",
        pretrained=str(ckpt),
        pretrained_ratios="reset",
    )
    reset.configure_model()
    for (name, a), (_, b) in zip(ssn.switch_norms(reopen.net), ssn.switch_norms(reset.net), strict=True):
        torch.testing.assert_close(a.mean_logits, source[f"{name}.mean_logits"], rtol=0, atol=0)
        assert a.latched == (None, None) and float(a.radius) == pytest.approx(0.3)
        assert b.latched == (None, None) and float(b.radius) == 0.0 and not b.mean_logits.any()
        for m in (a, b):  # running statistics and affine parameters in every mode
            torch.testing.assert_close(m.running_var, source[f"{name}.running_var"], rtol=0, atol=0)
            torch.testing.assert_close(m.bias, source[f"{name}.bias"], rtol=0, atol=0)
    assert reopen.initial_radius == pytest.approx(0.3)


@pytest.mark.slow
@needs_fmnist
def test_native_export_restores_the_latches(trained):
    ckpt, export = trained
    latched = {
        n: m.latched
        for n, m in ssn.switch_norms(
            _loaded(
                ImageClassifier(
                    arch="resnet_small", num_classes=10, in_channels=1, norm="ssn", pretrained=str(ckpt)
                )
            ).net
        )
    }
    task = _loaded(
        ImageClassifier(
            arch="resnet_small", num_classes=10, in_channels=1, norm="ssn", pretrained=str(export)
        )
    )
    assert {n: m.latched for n, m in ssn.switch_norms(task.net)} == latched
    native = torch.load(export, weights_only=True)
    for name, m in ssn.switch_norms(task.net):
        torch.testing.assert_close(m.weight, native[f"{name}.weight"], rtol=0, atol=0)
    # and the exported BN network converts into a GN task (statistics dropped, affine kept)
    gn = _loaded(
        ImageClassifier(
            arch="resnet_small",
            num_classes=10,
            in_channels=1,
            norm="gn",
            norm_kwargs={"groups": 4},
            pretrained=str(export),
        )
    )
    torch.testing.assert_close(gn.net.bn1.weight, native["bn1.weight"], rtol=0, atol=0)


def _loaded(task: ImageClassifier) -> ImageClassifier:
    task.configure_model()
    return task


def test_torchvision_state_dict_into_ssn_with_other_input_channels(tmp_path):
    src = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "tv.pth"
    torch.save(src.state_dict(), path)
    task = _loaded(
        ImageClassifier(arch="resnet18", num_classes=5, in_channels=1, norm="ssn", pretrained=str(path))
    )
    for name, m in ssn.switch_norms(task.net):
        bn = src.get_submodule(name)
        torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(m.weight, bn.weight, rtol=0, atol=0)
        assert m.latched == (None, None) and not m.mean_logits.any()  # a BN source: SSN starts uniform
    torch.testing.assert_close(task.net.conv1.weight, src.conv1.weight.sum(1, keepdim=True))  # RGB -> grey
    torch.testing.assert_close(task.net.layer4[1].conv2.weight, src.layer4[1].conv2.weight, rtol=0, atol=0)


@pytest.mark.slow
def test_authors_checkpoint_evaluates_through_validate(tmp_path):

    theirs = their_model(num_classes=3)
    path = tmp_path / "theirs.pth"
    torch.save(their_state_dict(theirs), path)
    imagenet_fixture(tmp_path / "imagenet", corrupt=False)
    import shutil

    shutil.rmtree(tmp_path / "imagenet" / "train")  # evaluation needs only val/
    out = tmp_path / "out"
    cli = main(
        [
            "validate",
            "--config",
            BASE,
            "--config",
            str(ROOT / "configs/imagenet/resnet50_imagenet-224.yaml"),
            "--config",
            str(ROOT / "configs/norms/ssn.yaml"),
            "--config",
            str(ROOT / "configs/imagenet/norms/ssn.yaml"),
            "--config",
            QUIET,
            "--model.init_args.arch=resnet50_authors",
            f"--model.init_args.pretrained={path}",
            "--model.init_args.pretrained_head=true",
            "--model.init_args.norm_kwargs={in_var_correction: 1, momentum: 0.003}",
            f"--data.init_args.root={tmp_path / 'imagenet'}",
            "--data.init_args.crop_size=64",
            "--data.init_args.resize_size=64",
            "--data.init_args.batch_size=6",
            "--data.init_args.num_workers=0",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
        ]
    )
    model = cli.model.net.eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():  # the loaded task's network is their network (float64, as test_authors)
        torch.testing.assert_close(
            model.double()(x.double()), theirs.double()(x.double()), rtol=1e-9, atol=1e-9
        )


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        read_checkpoint(tmp_path / "empty.ckpt")
    for seed in range(20):  # random bytes fail in many ways inside torch.load; each gets the same message
        (tmp_path / "junk.ckpt").write_bytes(
            torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
            .numpy()
            .tobytes()
        )
        with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
            read_checkpoint(tmp_path / "junk.ckpt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.ckpt", "wb") as f:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, f)
    with pytest.raises(ValueError, match="can execute code"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()
    # a different architecture: the missing backbone keys are named
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    task = ImageClassifier(arch="resnet34", num_classes=10, norm="bn", pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match=r"missing \(\d+\): layer1\.2\.conv1\.weight"):
        task.configure_model()
    with pytest.raises(ValueError, match="no ResNet backbone"):
        backbone_state({"state_dict": {"encoder.weight": torch.zeros(2)}})
    with pytest.raises(ValueError, match="pretrained_ratios must be one of"):
        ImageClassifier(arch="resnet18", norm="ssn", pretrained_ratios="thaw")


def test_backbone_lr_scale_and_freeze(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    task = ImageClassifier(
        arch="resnet18",
        num_classes=10,
        norm="ssn",
        pretrained=str(tmp_path / "r18.pth"),
        backbone_lr_scale=0.1,
        freeze=["conv1", "bn1", "layer1"],
    )
    task.configure_model()
    assert not task.net.conv1.weight.requires_grad and not task.net.layer1[0].bn1.mean_logits.requires_grad
    assert task.net.layer2[0].conv1.weight.requires_grad
    groups = {g["name"]: g for g in task._param_groups(1.0)}
    assert groups["params"]["lr"] == 1.0 and groups["backbone_params"]["lr"] == pytest.approx(0.1)
    assert {id(p) for p in groups["params"]["params"]} == {id(task.net.fc.weight), id(task.net.fc.bias)}
    assert (
        groups["backbone_ratios"]["lr"] == pytest.approx(0.1 * 0.1)
        and groups["backbone_ratios"]["weight_decay"] == 0
    )
    with pytest.raises(ValueError, match="no backbone parameter starts with 'layer9'"):
        ImageClassifier(arch="resnet18", norm="bn", freeze=["layer9"]).configure_model()


def _resnet18_file(path: Path, **entries: object) -> dict[str, torch.Tensor]:
    sd = torchvision.models.resnet18().state_dict()
    torch.save({**entries, "model": sd} if entries else sd, path)
    return sd


def test_nonfinite_pretrained_tensors_are_refused_by_key_and_file(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    sd["layer2.0.bn1.running_var"][3] = float("nan")
    sd["layer3.1.conv2.weight"][0, 0, 0, 0] = float("inf")
    torch.save(sd, tmp_path / "diverged.pth")
    task = ImageClassifier(
        arch="resnet18", num_classes=10, norm="bn", pretrained=str(tmp_path / "diverged.pth")
    )
    before = task.net.layer1[0].conv1.weight.clone()
    with pytest.raises(
        ValueError,
        match=r"diverged.pth: .*NaN/Inf values in 2 .*layer2\.0\.bn1\.running_var, "
        r"layer3\.1\.conv2\.weight",
    ):
        task.configure_model()
    torch.testing.assert_close(task.net.layer1[0].conv1.weight, before, rtol=0, atol=0)  # nothing loaded


def test_pretrained_file_formats_other_tools_write(tmp_path, monkeypatch):
    import argparse

    # torchvision's reference scripts: {"model": sd, "optimizer": ..., "args": Namespace}
    sd = _resnet18_file(tmp_path / "ref.pth", epoch=89, args=argparse.Namespace(lr=0.5, model="resnet18"))
    task = _loaded(
        ImageClassifier(arch="resnet18", num_classes=10, norm="bn", pretrained=str(tmp_path / "ref.pth"))
    )
    torch.testing.assert_close(task.net.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"], rtol=0, atol=0)
    # DDP's `module.` prefix, and `~` for the home folder
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    monkeypatch.setenv("HOME", str(tmp_path))
    task = _loaded(ImageClassifier(arch="resnet18", num_classes=10, norm="bn", pretrained="~/ddp.pth"))
    torch.testing.assert_close(task.net.conv1.weight, sd["conv1.weight"], rtol=0, atol=0)
    # the exported program is for inference: the message names the state_dict beside it
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    torch.export.save(torch.export.export(net, (torch.randn(1, 1, 8, 8),)), tmp_path / "model.pt2")
    with pytest.raises(
        ValueError,
        match=r"model.pt2 is a torch.export program .* pass the state_dict saved beside "
        r"it, .*model.state_dict.pt",
    ):
        read_checkpoint(tmp_path / "model.pt2")


@pytest.mark.slow
@needs_fmnist
def test_reopen_from_a_native_export_is_refused_not_reset(trained):
    _, export = trained
    task = ImageClassifier(
        arch="resnet_small",
        num_classes=10,
        in_channels=1,
        norm="ssn",
        pretrained=str(export),
        pretrained_ratios="reopen",
    )
    with pytest.raises(ValueError, match=r"'reopen' .* native export holds only the selection .* use 'keep'"):
        task.configure_model()


def test_frozen_norms_keep_their_statistics_and_do_not_latch():
    task = _loaded(
        ImageClassifier(
            arch="resnet_small", num_classes=10, in_channels=1, norm="ssn", freeze=["conv1", "bn1"]
        )
    )
    task.train()
    bn1 = task.net.bn1
    assert not bn1.training and task.net.layers[0][0].bn1.training  # frozen: eval mode, as BaseFinetuning
    stats = bn1.running_mean.clone()
    with torch.no_grad():
        for _, m in ssn.switch_norms(task):  # every layer prefers BN; at radius 1 each ratio is one-hot
            m.mean_logits.copy_(torch.tensor([0.0, 0.0, 5.0]))
            m.var_logits.copy_(torch.tensor([0.0, 0.0, 5.0]))
    ssn.set_radius(task, 1.0)
    ssn.update_latches(task)
    task.net(torch.randn(4, 1, 28, 28))
    torch.testing.assert_close(bn1.running_mean, stats, rtol=0, atol=0)
    assert bn1.latched == (None, None) and None not in task.net.layers[0][0].bn1.latched


@pytest.mark.slow
@needs_fmnist
def test_freeze_trains_exports_and_tests_the_export(tmp_path):
    import json

    out = tmp_path / "out"
    cli = main(["fit", *_args(out, "--model.init_args.freeze=[conv1, bn1]")])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and "exported/test/acc1" in summary["metrics"]
    assert not cli.model.net.conv1.weight.requires_grad


@pytest.mark.slow
@needs_fmnist
def test_a_failure_after_fit_marks_the_summary_failed(tmp_path, monkeypatch):
    import json

    import tasks.cli

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tasks.cli, "export_model", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        main(["fit", *_args(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["status"] == "failed" and "disk full" in summary["error"]
    )  # a sweep does not take it as fitted


@pytest.mark.slow
@needs_fmnist
def test_resume_and_validate_do_not_reread_a_moved_pretrained_file(trained, tmp_path):
    ckpt, _ = trained
    source = tmp_path / "source" / "pretrained.ckpt"
    source.parent.mkdir()
    source.write_bytes(ckpt.read_bytes())
    out = tmp_path / "out"
    main(
        [
            "fit",
            *_args(
                out,
                f"--model.init_args.pretrained={source}",
                "--trainer.limit_train_batches=2",
                "--export=false",
            ),
        ]
    )
    source.rename(tmp_path / "moved.ckpt")  # the checkpoint holds everything the run needs
    main(["validate", *_args(out, f"--model.init_args.pretrained={source}"), "--ckpt_path=last"])
    main(
        [
            "fit",
            *_args(
                out,
                f"--model.init_args.pretrained={source}",
                "--trainer.max_epochs=2",
                "--trainer.limit_train_batches=2",
                "--export=false",
            ),
            "--ckpt_path=last",
        ]
    )
