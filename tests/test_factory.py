"""The factory and the three ways frameworks construct a norm: torchvision, pytorchvideo, mmcv."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

import ssn


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_create_norm_builds_each_name(dim):
    expected = {
        "bn": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim],
        "syncbn": nn.SyncBatchNorm,
        "gn": nn.GroupNorm,
        "in": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim],
        "ln": nn.GroupNorm,
        "sn": {1: ssn.SwitchNorm1d, 2: ssn.SwitchNorm2d, 3: ssn.SwitchNorm3d}[dim],
        "ssn": {1: ssn.SparseSwitchNorm1d, 2: ssn.SparseSwitchNorm2d, 3: ssn.SparseSwitchNorm3d}[dim],
        "syncsn": {1: ssn.SwitchNorm1d, 2: ssn.SwitchNorm2d, 3: ssn.SwitchNorm3d}[dim],
        "syncssn": {1: ssn.SparseSwitchNorm1d, 2: ssn.SparseSwitchNorm2d, 3: ssn.SparseSwitchNorm3d}[dim],
    }
    for name in ssn.NORM_NAMES:
        m = ssn.create_norm(name.upper(), 64, dim=dim, eps=1e-3, momentum=0.2)
        assert type(m) is expected[name], name
        assert m.eps == 1e-3
    assert ssn.create_norm("gn", 64).num_groups == 32
    assert ssn.create_norm("gn", 64, groups=8).num_groups == 8
    assert ssn.create_norm("ln", 64).num_groups == 1
    assert ssn.create_norm("in", 64).affine
    assert ssn.create_norm("syncssn", 64).sync and not ssn.create_norm("ssn", 64).sync


def test_unknown_names_and_bad_arguments():
    with pytest.raises(KeyError, match="valid names: bn, syncbn, gn, in, ln, sn, ssn, syncsn, syncssn"):
        ssn.create_norm("batchnorm", 8)
    with pytest.raises(KeyError, match="valid names"):
        ssn.get_norm_layer("frn")  # fails when asked for, not when the model is built
    with pytest.raises(ValueError, match="groups"):
        ssn.create_norm("gn", 24, groups=32)
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        ssn.create_norm("bn", 8, dim=4)


def test_get_norm_layer_passes_classes_and_defaults():
    assert ssn.get_norm_layer(nn.BatchNorm2d) is nn.BatchNorm2d
    layer = ssn.get_norm_layer("gn", groups=4)(16)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 4
    layer = ssn.get_norm_layer("ssn", dim=3)(num_features=8, eps=1e-3, momentum=0.01)
    assert isinstance(layer, ssn.SparseSwitchNorm3d) and layer.momentum == 0.01


@pytest.mark.parametrize("name", ssn.NORM_NAMES)
def test_torchvision_resnet_with_every_norm(name):
    model = torchvision.models.resnet18(num_classes=5, norm_layer=ssn.get_norm_layer(name))
    x = torch.randn(2, 3, 64, 64)
    if name != "syncbn":  # SyncBatchNorm trains only inside a process group (tested with DDP)
        loss = model(x).logsumexp(-1).sum()
        loss.backward()  # through torchvision's ReLU(inplace=True) on our output
        assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)


def test_names_give_classes_or_keyword_partials():
    """What timm keeps of a partial: the function and the keywords (its positional arguments are
    dropped), so every name is a class or a partial binding keywords only."""
    assert (
        ssn.get_norm_layer("ssn") is ssn.SparseSwitchNorm2d
        and ssn.get_norm_layer("bn", dim=3) is nn.BatchNorm3d
    )
    for name in ssn.NORM_NAMES:
        for dim in (1, 2, 3):
            layer = ssn.get_norm_layer(name, dim=dim)
            if isinstance(layer, functools.partial):
                assert not layer.args, name
                layer = functools.partial(layer.func, **layer.keywords)  # timm's rebinding
            assert type(layer(64)) is type(ssn.create_norm(name, 64, dim=dim)), (name, dim)
    assert ssn.get_norm_layer("syncssn")(4).sync and ssn.get_norm_layer("in")(4).affine


@pytest.mark.parametrize(
    "cls",
    [
        ssn.SwitchNorm2d,
        ssn.SparseSwitchNorm3d,
        functools.partial(ssn.LatchedNorm, mean_stat="bn", var_stat="in"),
    ],
)
def test_factory_keywords_like_batchnorm(cls):
    """``device``/``dtype`` as nn.BatchNorm2d takes them: what ``.to()`` would give, meta included."""
    made = cls(6, dtype=torch.float64)
    moved = cls(6).to(torch.float64)
    for (name, a), (_, b) in zip(made.state_dict().items(), moved.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    native = nn.BatchNorm2d(6, dtype=torch.float64)
    assert made.running_var.dtype == native.running_var.dtype and made.num_batches_tracked.dtype == torch.long
    meta = cls(6, device="meta")
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    assert meta.to_empty(device="cpu").num_batches_tracked.device.type == "cpu"


def test_torchvision_zero_init_residual_reaches_our_weight():
    model = torchvision.models.resnet50(norm_layer=ssn.get_norm_layer("ssn"), zero_init_residual=True)
    assert not model.layer1[0].bn3.weight.any()  # torchvision zeroes bn3.weight: shape (C,)
    assert model.layer1[0].bn1.weight.eq(1).all()


def test_pytorchvideo_builders_call_with_keywords():
    from pytorchvideo.models.resnet import create_bottleneck_block

    block = create_bottleneck_block(dim_in=8, dim_inner=4, dim_out=8, norm=ssn.get_norm_layer("ssn", dim=3))
    norms = [m for m in block.modules() if isinstance(m, ssn.SparseSwitchNorm3d)]
    assert norms and all(m.momentum == 0.1 and m.eps == 1e-5 for m in norms)
    y = block(torch.randn(2, 8, 3, 6, 6))
    y.sum().backward()
    assert torch.isfinite(y).all()


def test_mmcv_build_norm_layer_after_registration():
    ssn.register_mmengine()
    ssn.register_mmengine()  # idempotent
    from mmcv.cnn import build_norm_layer

    name, layer = build_norm_layer(dict(type="SSN", requires_grad=True), 16, postfix=1)
    assert name == "bn1" and isinstance(layer, ssn.SparseSwitchNorm2d) and layer.eps == 1e-5
    name, layer = build_norm_layer(dict(type="SN", momentum=0.05), 16)
    assert name == "bn" and isinstance(layer, ssn.SwitchNorm2d) and layer.momentum == 0.05
    _, frozen = build_norm_layer(dict(type="SSN", requires_grad=False), 4)
    assert not any(p.requires_grad for p in frozen.parameters())
    _, layer3d = build_norm_layer(dict(type="SSN3d"), 4)
    assert isinstance(layer3d, ssn.SparseSwitchNorm3d)


def test_ssn_is_pure_pytorch():
    """Importing the library (every module of it) loads neither Lightning nor mmseg nor pytorchvideo."""
    import subprocess
    import sys

    code = (
        "import pkgutil, importlib, sys, ssn\n"
        "for m in pkgutil.iter_modules(ssn.__path__): importlib.import_module('ssn.' + m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'mmseg', "
        "'mmengine', 'mmcv', 'pytorchvideo', 'wandb')]\n"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"ssn imports {out}"
