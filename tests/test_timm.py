"""timm: SN/SSN through ``norm_layer`` and timm's norm+act mapping, faithful conversion and export.

Every check compares against the plain timm model (BatchNorm) built by timm itself: same outputs
after ``convert_norm(model, "bn")``, and the BN-latched export loads into it and computes what
the latched SSN model computed. Random initialisation only (no download).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import ssn

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNorm1Act, get_norm_act_layer  # noqa: E402

# (name, input size). Families whose constructors take ``norm_layer`` (every norm of the model
# becomes SSN); the smallest variant of each. Checked by hand as well: resnet18/resnet10t,
# seresnext26d_32x4d, res2net50_14w_8s, resnest14d, senet154, efficientnet_b0, mnasnet_small,
# tinynet_e, mixnet_s, fbnetc_100, spnasnet_100, regnety_002, gernet_s, repvgg_a0, resnet32ts,
# cspresnet50, xception41, resnetv2_50, resnetv2_50x1_bit.
DIRECT = [
    ("test_resnet", 32),  # timm.models.resnet (ResNet, ResNeXt, SE-, Res2Net, ResNeSt share it)
    ("resnext26ts", 32),  # byobnet ResNeXt
    ("test_efficientnet", 32),  # _efficientnet_builder: BatchNormAct2d -> SparseSwitchNormAct2d
    ("mobilenetv2_035", 32),  # the same builder, ReLU6
    ("regnetx_002", 32),
    ("densenet121", 32),
    ("cs3darknet_s", 32),  # cspnet
    ("ese_vovnet19b_slim_dw", 32),
]
# Families whose constructors take no ``norm_layer`` (or whose generator binds it): built with
# BatchNorm by timm, then ``ssn.convert_norm(model, "ssn")``.
CONVERTED = [("mobilenetv3_small_050", 32), ("ghostnet_050", 32), ("hrnet_w18_small", 64)]


def _randomise_stats(model: nn.Module) -> nn.Module:
    """Running statistics that are not the identity, so a lost or swapped BN would show."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def _acts(model: nn.Module) -> list[str]:
    """The activation layers in order (what a converter that drops fused activations loses)."""
    return [
        type(m).__name__
        for m in model.modules()
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Hardsigmoid))
    ]


def _train_step(model: nn.Module, size: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    loss = nn.functional.cross_entropy(model.train()(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _check_ssn_model(name: str, size: int, model: nn.Module, plain: nn.Module) -> None:
    """One training step, latch to BN, export: timm's own layer types, loadable into ``plain``."""
    layers = dict(ssn.switch_norms(model))
    assert len(layers) == sum(isinstance(m, _BatchNorm) for m in plain.modules()) > 0, (
        "a norm was not replaced"
    )
    assert _acts(model) == _acts(plain), "activations differ from the plain timm model"
    _train_step(model, size)
    for layer in layers.values():
        layer.latch("bn", "bn")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        latched = model.eval()(x)
    exported = ssn.export_norm(model)
    assert not list(ssn.switch_norms(exported))
    types = {n: type(m) for n, m in plain.named_modules() if isinstance(m, _BatchNorm)}
    assert {n: type(m) for n, m in exported.named_modules() if isinstance(m, _BatchNorm)} == types
    plain.load_state_dict(exported.state_dict())  # strict: the same keys, nothing extra
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), latched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "size"), DIRECT, ids=[n for n, _ in DIRECT])
def test_create_model_with_ssn(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, norm_layer=ssn.get_norm_layer("ssn", radius=0.2))
    assert all(m.radius == 0.2 for _, m in ssn.switch_norms(model))  # the bound keyword survived timm
    _check_ssn_model(name, size, model, timm.create_model(name, num_classes=3))


@pytest.mark.parametrize(("name", "size"), CONVERTED, ids=[n for n, _ in CONVERTED])
def test_convert_timm_model_to_ssn(name, size):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=3)
    _check_ssn_model(name, size, ssn.convert_norm(copy.deepcopy(plain), "ssn"), plain)


@pytest.mark.parametrize(("name", "size"), DIRECT[:4] + CONVERTED[:2] + [("dpn48b", 32), ("skresnet18", 32)])
def test_convert_norm_bn_is_the_identity(name, size):
    ref = _randomise_stats(timm.create_model(name, num_classes=3)).eval()
    converted = ssn.convert_norm(copy.deepcopy(ref), "bn")
    assert [type(m) for m in converted.modules()] == [type(m) for m in ref.modules()]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(converted(x), ref(x))


def test_latches_from_training_export_to_what_the_layers_computed():
    """update_latches at the maximum radius latches every layer to what its logits chose (not
    only BN): the export (BatchNormAct2d, GroupNorm1Act, Sequential or LatchedNorm with the
    activation kept) computes what the latched SSN model computed."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3, norm_layer=ssn.SparseSwitchNorm2d)
    _train_step(model, 32)
    for i, (_, m) in enumerate(ssn.switch_norms(model)):
        with torch.no_grad():  # a spread of choices: BN, IN, LN and mixed
            m.mean_logits.copy_(torch.eye(3)[i % 3])
            m.var_logits.copy_(torch.eye(3)[(i // 3) % 3])
    ssn.set_radius(model, ssn.max_radius(3))
    ssn.update_latches(model.train())
    assert all(None not in m.latched for _, m in ssn.switch_norms(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        exported = ssn.export_norm(copy.deepcopy(model))
        torch.testing.assert_close(exported(x), ref, rtol=1e-5, atol=1e-5)
    kinds = {type(m).__name__ for m in exported.modules()}
    assert {"BatchNormAct2d", "GroupNorm1Act", "Sequential"} <= kinds
    assert _acts(exported) == _acts(model)


def test_norm_layer_forms_survive_timm_factories():
    """timm unbinds a partial (keeps keywords, drops positional arguments) and maps the class to
    a norm+act class; every form we hand out survives both."""
    layer = timm.layers.get_norm_layer(ssn.get_norm_layer("ssn", radius=0.3))(8)
    assert type(layer) is ssn.SparseSwitchNorm2d and float(layer.radius) == pytest.approx(0.3)
    layer = timm.layers.get_norm_layer(ssn.get_norm_layer("syncsn"))(8)
    assert type(layer) is ssn.SwitchNorm2d and layer.sync
    assert type(timm.layers.get_norm_layer("ssn")(8)) is ssn.SparseSwitchNorm2d
    act = get_norm_act_layer(ssn.get_norm_layer("ssn", radius=0.1), act_layer="silu")(8)
    assert type(act) is ssn.SparseSwitchNormAct2d and isinstance(act.act, nn.SiLU)
    assert float(act.radius) == pytest.approx(0.1)
    act = get_norm_act_layer(ssn.SwitchNormAct2d, act_layer=nn.GELU)(8, apply_act=False)
    assert type(act) is ssn.SwitchNormAct2d and isinstance(act.act, nn.Identity)
    # the factory's other names: bn is nn.BatchNorm2d itself; gn a keyword-only partial
    model = timm.create_model("test_resnet", num_classes=3, norm_layer=ssn.get_norm_layer("gn", groups=8))
    assert all(m.num_groups == 8 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert get_norm_act_layer(ssn.get_norm_layer("bn"), act_layer="relu").func is BatchNormAct2d


def test_class_and_factory_keywords():
    """``norm_layer=ssn.SparseSwitchNorm2d``: timm passes PyTorch's factory keywords. The class
    itself reaches timm's norm+act mapping once registered (``get_norm_layer`` registers, and so
    does importing ssn after timm; here ssn came first)."""
    ssn.register_timm()
    ssn.register_timm()  # idempotent
    model = timm.create_model(
        "test_efficientnet", num_classes=3, norm_layer=ssn.SparseSwitchNorm2d, act_layer="hard_swish"
    )
    assert isinstance(model.bn1, ssn.SparseSwitchNormAct2d) and isinstance(model.bn1.act, nn.Hardswish)
    layer = ssn.SparseSwitchNormAct2d(6, dtype=torch.float64, device="meta", act_layer="relu")
    assert all(
        t.dtype == torch.float64 and t.is_meta for t in (*layer.parameters(), layer.running_var, layer.radius)
    )
    assert layer.mean_latch.dtype == torch.long and layer.mean_latch.is_meta


def test_convert_keeps_fused_activations_and_refuses_unknown_bn():
    """The issue's case: BatchNormAct2d's SiLU survives every target; a frozen or unknown
    BatchNorm subclass is refused by name and the model is left as it was."""
    ref = _randomise_stats(timm.create_model("test_efficientnet", num_classes=3)).eval()
    x = torch.randn(2, 3, 64, 64)  # IN needs more than one value per plane at the last stage
    for target, kind in [
        ("ssn", ssn.SparseSwitchNormAct2d),
        ("sn", ssn.SwitchNormAct2d),
        ("gn", None),
        ("ln", GroupNorm1Act),
        ("in", nn.Sequential),
    ]:
        kw = {"groups": 4} if target == "gn" else {}
        out = ssn.convert_norm(copy.deepcopy(ref), target, **kw)
        assert _acts(out) == _acts(ref), target
        if kind is not None:
            assert type(out.bn1) is kind, target
        assert torch.isfinite(out(x)).all()
    # SSN latched to BN after conversion: the native model's outputs (act and drop applied)
    back = ssn.convert_norm(copy.deepcopy(ref), "ssn")
    for _, m in ssn.switch_norms(back):
        m.latch("bn", "bn")
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), rtol=1e-5, atol=1e-5)

    frozen = timm.layers.freeze_batch_norm_2d(copy.deepcopy(ref))
    assert isinstance(frozen.bn1, FrozenBatchNormAct2d)
    with pytest.raises(ValueError, match=r"bn1 is a timm\.layers\.norm_act\.FrozenBatchNormAct2d.*unfreeze"):
        ssn.convert_norm(frozen, "ssn")
    assert isinstance(frozen.bn1, FrozenBatchNormAct2d) and isinstance(frozen.conv_head, nn.Conv2d)

    class Custom(BatchNormAct2d):  # a subclass may compute anything: refused, not guessed
        pass

    model = nn.Sequential(nn.BatchNorm2d(4), Custom(4))
    with pytest.raises(ValueError, match=r"layer 1 is a .*Custom"):
        ssn.convert_norm(model, "bn")
    assert type(model[0]) is nn.BatchNorm2d  # checked before anything is replaced
    with pytest.raises(ValueError, match="SplitBatchNorm2d"):
        ssn.convert_norm(nn.Sequential(timm.layers.SplitBatchNorm2d(4, num_splits=2)), "ssn")


def test_sync_norm_act_keeps_activation():
    model = timm.layers.convert_sync_batchnorm(timm.create_model("test_efficientnet", num_classes=3))
    out = ssn.convert_norm(model, "ssn")
    assert type(out.bn1) is ssn.SparseSwitchNormAct2d and out.bn1.sync and _acts(out) == _acts(model)
    for _, m in ssn.switch_norms(out):
        m.latch("bn", "bn")
    back = ssn.export_norm(out)
    assert type(back.bn1) is BatchNormAct2d and isinstance(back.bn1.act, nn.SiLU)


def test_mobilenetv3_generator_binds_its_own_norm_layer():
    """Why MobileNetV3 (and LCNet, HardCoReNAS, VGG) go through convert_norm: their generators
    bind norm_layer themselves, so timm refuses one from the caller, whatever it is."""
    with pytest.raises(TypeError, match="multiple values for keyword argument 'norm_layer'"):
        timm.create_model("mobilenetv3_small_050", norm_layer=functools.partial(nn.BatchNorm2d))


def test_image_classifier_takes_a_timm_arch_and_its_state_dict(tmp_path):
    """``arch: timm/<name>`` with any normalizer; ``pretrained`` a timm model's own state_dict
    (randomly initialised and saved here: no download)."""
    from tasks import ImageClassifier

    plain = timm.create_model("resnet18", num_classes=4)
    torch.save(_randomise_stats(plain).state_dict(), tmp_path / "timm.pth")
    task = ImageClassifier(
        arch="timm/resnet18", num_classes=10, in_channels=1, norm="ssn", pretrained=str(tmp_path / "timm.pth")
    )
    task.configure_model()
    assert task.head_prefixes() == ("fc.",) and task.net.fc.out_features == 10
    assert torch.equal(task.net.layer1[0].bn1.running_var, plain.layer1[0].bn1.running_var)
    torch.testing.assert_close(task.net.conv1.weight, plain.conv1.weight.sum(1, keepdim=True))  # 1 channel
    assert task(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # other stems: EfficientNet's conv_stem, RegNet's stem.conv, a deep-stem ResNet's conv1.0,
    # DenseNet's features.conv0 (three input channels: no adaptation)
    for name in ("test_efficientnet", "regnetx_002", "resnet18d", "densenet121"):
        plain = _randomise_stats(timm.create_model(name, num_classes=4))
        torch.save({"model": plain.state_dict()}, tmp_path / f"{name}.pth")  # the reference-script form
        task = ImageClassifier(
            arch=f"timm/{name}",
            num_classes=10,
            in_channels=3,
            norm="bn",
            pretrained=str(tmp_path / f"{name}.pth"),
        )
        task.configure_model()
        own, theirs = task.net.state_dict(), plain.state_dict()
        head = task.head_prefixes()
        assert all(torch.equal(v, theirs[k]) for k, v in own.items() if not k.startswith(head)), name
    with pytest.raises(KeyError, match="unknown timm model"):
        ImageClassifier(arch="timm/no_such_net", num_classes=10, norm="ssn")
    with pytest.raises(ValueError, match="takes no norm_layer"):
        ImageClassifier(arch="timm/ghostnet_050", num_classes=10, norm="ssn")


@pytest.mark.slow
def test_cli_fit_with_a_timm_arch_on_fashion_mnist(tmp_path, repo_root, fmnist_data):

    from tasks.cli import main

    root, out = repo_root, str(tmp_path / "out")
    cli = main(
        [
            "fit",
            "--config",
            str(root / "configs/base/trainer.yaml"),
            "--config",
            str(root / "configs/fashion_mnist/resnet_small_fashionmnist-28.yaml"),
            "--config",
            str(root / "configs/norms/ssn.yaml"),
            "--config",
            str(root / "configs/fashion_mnist/norms/ssn.yaml"),
            "--config",
            str(root / "configs/base/quiet.yaml"),
            "--model.init_args.arch=timm/test_efficientnet",
            "--model.init_args.channels_last=false",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--data.batch_size=16",
        ]
    )
    net = cli.model.net
    assert cli.trainer.global_step == 4 and isinstance(net.bn1, ssn.SparseSwitchNormAct2d)
    assert all(None not in m.latched for _, m in ssn.switch_norms(net))  # the radius ramp ended: latched
    program = torch.export.load(tmp_path / "out" / "exported" / "model.pt2").module()
    assert program(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    cli.trainer.logger.experiment.finish()
