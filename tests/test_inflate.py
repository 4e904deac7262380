"""2D -> 3D inflation: key mapping, kernel inflation, and the identical-frames equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import ssn
from ssn.inflate import inflate_conv_weight, inflate_resnet_state_dict, torchvision_to_pytorchvideo_key
from tasks import ImageClassifier
from tasks.video import VideoClassifier, build_slow_resnet

NORMS = ["bn", "syncbn", "gn", "in", "ln", "sn", "ssn", "ssn-latched", "ssn-mixed"]


def _norm(name: str) -> str:
    return name.split("-")[0]


@torch.no_grad()
def _randomise(model: nn.Module, variant: str) -> None:
    """Every norm tensor away from its initial value (so a dropped or misplaced one shows)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) or ssn.switch_norms(m):
            if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    for i, (_, m) in enumerate(ssn.switch_norms(model)):
        m.mean_logits.copy_(torch.randn(3, generator=g))
        m.var_logits.copy_(torch.randn(3, generator=g))
        if variant == "ssn":
            m.radius.fill_(0.3)
        elif variant == "ssn-latched":
            m.latch(ssn.STATS[i % 3], ssn.STATS[i % 3])
        elif variant == "ssn-mixed":
            m.latch(ssn.STATS[i % 3], ssn.STATS[(i + 1) % 3])


def _pair(variant: str, frames: int = 2, crop: int = 64, classes: int = 5):
    name = _norm(variant)
    torch.manual_seed(0)
    net2 = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=classes, norm_layer=ssn.get_norm_layer(name)).double()
    net3 = build_slow_resnet(
        "slow_r14",
        classes,
        3,
        ssn.get_norm_layer(name, dim=3),
        frames=frames,
        crop_size=crop,
        temporal_kernels=(1, 1, 1, 1),
        dropout=0.0,
    ).double()
    _randomise(net2, variant)
    return net2, net3


def test_keys_map_to_pytorchvideo_names():
    assert torchvision_to_pytorchvideo_key("conv1.weight") == "blocks.0.conv.weight"
    assert torchvision_to_pytorchvideo_key("bn1.mean_latch") == "blocks.0.norm.mean_latch"
    assert (
        torchvision_to_pytorchvideo_key("layer3.4.bn2.running_var")
        == "blocks.3.res_blocks.4.branch2.norm_b.running_var"
    )
    assert (
        torchvision_to_pytorchvideo_key("layer1.0.downsample.1.mean_logits")
        == "blocks.1.res_blocks.0.branch1_norm.mean_logits"
    )
    assert (
        torchvision_to_pytorchvideo_key("layer4.0.downsample.0.weight")
        == "blocks.4.res_blocks.0.branch1_conv.weight"
    )
    assert torchvision_to_pytorchvideo_key("fc.bias") == "blocks.5.proj.bias"
    with pytest.raises(KeyError, match="not a torchvision ResNet key"):
        torchvision_to_pytorchvideo_key("features.0.weight")


def test_kernel_inflation_is_i3d_and_grey_to_rgb():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w3 = inflate_conv_weight(w, (4, 3, 5, 3, 3))
    assert w3.shape == (4, 3, 5, 3, 3)
    torch.testing.assert_close(w3.sum(2), w)  # I3D: repeated over time, divided by 5
    x = torch.randn(2, 3, 5, 8, 8, dtype=torch.float64)
    still = x[:, :, :1].expand_as(x)  # a clip of identical frames: every frame gets the 2D response
    torch.testing.assert_close(
        F.conv3d(still, w3, padding=(0, 1, 1))[:, :, 0], F.conv2d(x[:, :, 0], w, padding=1)
    )
    grey = torch.randn(4, 1, 3, 3, dtype=torch.float64)  # a 1-channel model on RGB clips
    rgb = inflate_conv_weight(grey, (4, 3, 1, 3, 3))
    torch.testing.assert_close(
        F.conv3d(x[:, :, :1], rgb, padding=(0, 1, 1))[:, :, 0],
        F.conv2d(x[:, :, 0].mean(1, keepdim=True), grey, padding=1),
    )
    with pytest.raises(ValueError, match="cannot inflate"):
        inflate_conv_weight(w, (4, 2, 3, 3, 3))


@pytest.mark.parametrize("variant", NORMS)
def test_identical_frames_give_the_2d_output(variant):
    net2, net3 = _pair(variant)
    state = inflate_resnet_state_dict(net2.state_dict(), net3)
    result = net3.load_state_dict(state, strict=True)  # every tensor, the head included
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    clip = x[:, :, None].expand(-1, -1, 2, -1, -1).contiguous()
    # NOTE: eval first: a training step updates the running variance with the unbiased factor
    # n / (n - 1), and n counts T times more elements in 3D.
    for train in (False, True):
        if variant == "syncbn" and train:
            continue  # SyncBatchNorm trains only inside a process group (tests/test_distributed.py)
        net2.train(train)
        net3.train(train)
        with torch.no_grad():
            want, got = net2(x), net3(clip)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"train={train}")
        assert want.std() > 1e-3  # a real output, not a constant
    layers3 = dict(ssn.switch_norms(net3))
    for name, m2 in ssn.switch_norms(net2):
        m3 = layers3[torchvision_to_pytorchvideo_key(f"{name}.radius").removesuffix(".radius")]
        assert m2.latched == m3.latched and torch.equal(m2.radius, m3.radius), name


@pytest.mark.parametrize("norm", ["bn", "ssn"])
def test_resnet50_checkpoint_inflates_into_slow_r50_without_missing_backbone_keys(norm):
    source = ImageClassifier(arch="resnet50", num_classes=10, norm=norm).net.state_dict()
    backbone = {k: v for k, v in source.items() if not k.startswith("fc.")}
    task = VideoClassifier(arch="slow_r50", num_classes=7, norm=norm, crop_size=64, frames=4)
    target = task.pretrained_module()
    mapped = task.map_pretrained(backbone, target)
    result = target.load_state_dict(mapped, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["blocks.5.proj.bias", "blocks.5.proj.weight"]  # the new head only
    assert mapped["blocks.4.res_blocks.2.branch2.conv_a.weight"].shape[2] == 3  # res5: temporal kernel 3
    # a 10-class fc does not fit the 7-class head: dropped, not an error
    assert "blocks.5.proj.weight" not in inflate_resnet_state_dict(source, target)
    stray = {"bn1.mean_logits" if norm == "bn" else "bn1.foo": torch.zeros(3)}
    with pytest.raises(KeyError, match="no place in the 3D network"):  # e.g. SN logits for a BN network
        inflate_resnet_state_dict(stray, target)
    assert list(task.map_pretrained(stray, target)) == [f"blocks.0.norm.{next(iter(stray)).split('.')[1]}"]


def test_pretrained_argument_inflates_a_2d_checkpoint(tmp_path):
    """The base task's ``pretrained`` loading goes through ``map_pretrained``: latches and kernels arrive."""
    net2, _ = _pair("ssn-latched")
    torch.save(net2.float().state_dict(), tmp_path / "r14.pt")
    task = VideoClassifier(
        arch="slow_r14",
        num_classes=3,
        norm="ssn",
        frames=2,
        crop_size=64,
        pretrained=str(tmp_path / "r14.pt"),
    )
    task.configure_model()
    conv = task.net.blocks[4].res_blocks[0].branch2.conv_a.weight  # temporal kernel 3
    torch.testing.assert_close(conv, net2.layer4[0].conv1.weight.unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3)
    assert task.net.blocks[0].norm.latched == net2.bn1.latched != (None, None)


def test_a_checkpoint_of_other_blocks_is_refused_naming_key_blocks_and_what_fits(tmp_path):
    """A ResNet-18 (BasicBlock) checkpoint into slow_r14 (bottlenecks): the error says why and what fits."""
    from torchvision.models.resnet import BasicBlock

    net3 = build_slow_resnet(
        "slow_r14",
        5,
        3,
        ssn.get_norm_layer("bn", dim=3),
        frames=2,
        crop_size=64,
        temporal_kernels=(1, 1, 1, 1),
        dropout=0.0,
    )
    basic = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=5).state_dict()
    with pytest.raises(ValueError) as e:
        inflate_resnet_state_dict(basic, net3)
    msg = str(e.value)
    for part in (
        "layer1.0.conv1.weight -> blocks.1.res_blocks.0.branch2.conv_a.weight",  # the key, both ways
        "(64, 64, 3, 3) into (64, 64, 1, 1, 1)",
        "BasicBlock blocks with depths (2, 2, 2, 2) (torchvision resnet18)",
        "the 3-D network has Bottleneck blocks",
        "with depths (1, 1, 1, 1)",
        "What fits: a 2-D checkpoint of Bottleneck blocks with depths (1, 1, 1, 1)",
        "ResNet(Bottleneck, [1, 1, 1, 1])",
    ):
        assert part in msg, (part, msg)
    # the user's path (pretrained=) gives the same message
    torch.save(basic, tmp_path / "r18.pt")
    task = VideoClassifier(
        arch="slow_r14", num_classes=3, norm="bn", frames=2, crop_size=64, pretrained=str(tmp_path / "r18.pt")
    )
    with pytest.raises(ValueError, match="BasicBlock blocks with depths"):
        task.configure_model()
    # what the message says fits does fit; a deeper bottleneck network is told its depths
    fits = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5).state_dict()
    result = net3.load_state_dict(inflate_resnet_state_dict(fits, net3))
    assert not result.missing_keys and not result.unexpected_keys
    deeper = ResNet(Bottleneck, [2, 1, 1, 1], num_classes=5).state_dict()
    with pytest.raises(
        KeyError,
        match=r"layer1\.1\.conv1\.weight"
        r".*Bottleneck blocks with depths \(2, 1, 1, 1\)"
        r".*What fits.*depths \(1, 1, 1, 1\)"
        r".*or a 3-D network with depths \(2, 1, 1, 1\)",
    ):
        inflate_resnet_state_dict(deeper, net3)
