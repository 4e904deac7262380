"""Model surgery: convert_norm, export_norm, set_radius, param_groups, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import ssn
from ssn.norm import SwitchNormBase


def _randomise_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, SwitchNormBase)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_convert_bn_resnet_to_ssn_copies_everything():
    ref = _randomise_stats(torchvision.models.resnet18(num_classes=7))
    # NOTE: convert_norm works in place; convert a copy so the reference keeps its BatchNorms
    ssn_model = ssn.convert_norm(copy.deepcopy(ref), "ssn")
    assert ssn_model is not ref and all(isinstance(m, nn.BatchNorm2d) for m in (ref.bn1, ref.layer1[0].bn2))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ssn_model.modules())
    norms = list(ssn.switch_norms(ssn_model))
    assert len(norms) == 20 and all(isinstance(m, ssn.SparseSwitchNorm2d) for _, m in norms)
    for name, m in norms:
        src = ref.get_submodule(name)
        assert isinstance(src, nn.BatchNorm2d)
        torch.testing.assert_close(m.weight, src.weight)
        torch.testing.assert_close(m.running_var, src.running_var)
        m.latch("bn", "bn")
    x = torch.randn(2, 3, 64, 64)
    ref.eval(), ssn_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ssn_model(x), ref(x))  # the native BN network's output


def test_convert_keeps_sync_dims_and_switch_state():
    model = nn.Sequential(
        nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4), nn.SyncBatchNorm(4)
    )
    out = ssn.convert_norm(model, "ssn", radius=0.2)
    assert isinstance(out[1], ssn.SparseSwitchNorm1d) and isinstance(out[3], ssn.SparseSwitchNorm3d)
    assert isinstance(out[4], ssn.SparseSwitchNorm2d) and out[4].sync and not out[1].sync
    assert float(out[1].radius) == pytest.approx(0.2)
    out[1].latch("in", "bn")
    with torch.no_grad():
        out[1].mean_logits.copy_(torch.tensor([1.0, 2.0, 3.0]))
    back = ssn.convert_norm(out, "sn")  # switch -> switch keeps logits and latches
    assert isinstance(back[1], ssn.SwitchNorm1d) and back[1].latched == ("in", "bn")
    assert torch.equal(back[1].mean_logits, torch.tensor([1.0, 2.0, 3.0]))
    assert isinstance(ssn.convert_norm(back, "gn", groups=2)[1], nn.GroupNorm)
    root = ssn.convert_norm(nn.BatchNorm2d(8), "ln")  # the root itself is replaced
    assert isinstance(root, nn.GroupNorm) and root.num_groups == 1


def _all_bn_ssn_resnet50() -> nn.Module:
    model = _randomise_stats(torchvision.models.resnet50(norm_layer=ssn.get_norm_layer("ssn")))
    for _, m in ssn.switch_norms(model):
        m.latch("bn", "bn")
    return model.eval()


def test_export_all_bn_is_a_plain_torchvision_resnet_that_fuses():
    model = _all_bn_ssn_resnet50()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        exported = ssn.export_norm(model)
        plain = torchvision.models.resnet50().eval()
        plain.load_state_dict(exported.state_dict())  # strict: the same keys and shapes
        after = plain(x)
    assert not list(ssn.switch_norms(exported))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    fused = torch.ao.quantization.fuse_modules(plain, [["conv1", "bn1"], ["layer1.0.conv1", "layer1.0.bn1"]])
    assert isinstance(fused.bn1, nn.Identity)
    with torch.no_grad():
        scale = before.abs().max()  # folding changes the arithmetic: compare to the logit scale
        torch.testing.assert_close(fused(x) / scale, before / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_export_every_latch_combination_is_exact(dim):
    shape = {1: (3, 4, 7), 2: (3, 4, 5, 6), 3: (3, 4, 2, 3, 4)}[dim]
    for mean in ssn.STATS:
        for var in ssn.STATS:
            m = _randomise_stats(nn.Sequential(ssn.create_norm("ssn", 4, dim=dim)))[0]
            m.latch(mean, var)
            m.eval()
            x = torch.randn(shape) * 2 + 1
            with torch.no_grad():
                want = m(x)
                new = ssn.export_norm(m)
                got = new(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if mean == var:
                assert not isinstance(new, (ssn.LatchedNorm, SwitchNormBase)), (mean, var, type(new))
            else:
                assert isinstance(new, ssn.LatchedNorm)
                # the exported module also trains like the latched layer it replaced
                m.train(), new.train()
                torch.testing.assert_close(new(x), m(x))
                torch.testing.assert_close(new.running_var, m.running_var)


def test_export_refuses_unlatched_layers_by_name_unless_forced():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(ssn.SparseSwitchNorm2d(4)))
    with torch.no_grad():
        model[1][0].mean_logits.copy_(torch.tensor([0.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match=r"layer 1\.0 \(SparseSwitchNorm2d\) is not latched"):
        ssn.export_norm(model)
    out = ssn.export_norm(model, force=True)
    # mean ratio argmax is BN; the uniform variance ratio's argmax is the first, IN
    assert isinstance(out[1][0], ssn.LatchedNorm) and out[1][0].extra_repr().startswith("4, mean=bn, var=in")


def test_set_radius_and_param_groups():
    model = torchvision.models.resnet18(norm_layer=ssn.get_norm_layer("ssn"))
    assert ssn.set_radius(model, 0.4) == 20
    assert all(float(m.radius) == pytest.approx(0.4) for _, m in ssn.switch_norms(model))
    with pytest.raises(ValueError):
        ssn.set_radius(model, -1.0)
    groups = ssn.param_groups(model, lr=0.1, weight_decay=1e-4, norm_weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["ratios"]["lr"] == pytest.approx(0.01) and by_name["ratios"]["weight_decay"] == 0.0
    assert by_name["norm"]["weight_decay"] == 0.0 and by_name["params"]["weight_decay"] == 1e-4
    assert len(by_name["ratios"]["params"]) == 40 and len(by_name["norm"]["params"]) == 40
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted as is


def test_torch_compile_latched_path_has_no_graph_break():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        ssn.SparseSwitchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        ssn.SparseSwitchNorm2d(8),
    )
    model[1].latch("bn", "bn")
    model[4].latch("ln", "ln")
    x = torch.randn(2, 3, 12, 12)
    want = model.eval()(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a break raises
    torch.testing.assert_close(compiled(x), want)
    model.train()
    compiled(x).sum().backward()


def test_convert_refuses_bn_like_layers_it_does_not_know():
    """A converter must not silently change a network: torchvision's FrozenBatchNorm2d (frozen
    statistics, not a BatchNorm subclass), a BatchNorm subclass (it may compute anything) and a
    lazy BatchNorm (no weights yet) are refused by name, and nothing is replaced."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    for odd, cls_name in [
        (FrozenBatchNorm2d(4), "FrozenBatchNorm2d"),
        (Scaled(4), "Scaled"),
        (nn.LazyBatchNorm2d(), "LazyBatchNorm2d"),
    ]:
        model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(odd))
        with pytest.raises(ValueError, match=rf"layer 1\.0 is a .*{cls_name}, a BatchNorm-like layer"):
            ssn.convert_norm(model, "ssn")
        assert type(model[0]) is nn.BatchNorm2d and model[1][0] is odd
    # what convert_norm leaves alone, as before: norms it does not replace
    keep = nn.Sequential(nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, track_running_stats=True), nn.LayerNorm(4))
    assert [type(m) for m in ssn.convert_norm(keep, "ssn")] == [nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm]


def test_convert_bn_without_running_stats_to_bn_is_the_identity():
    ref = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm1d(4)).eval()
    out = ssn.convert_norm(copy.deepcopy(ref), "bn")
    x = torch.randn(3, 4, 5, 5)
    assert not out[0].track_running_stats
    assert torch.equal(out[0](x), ref[0](x))  # batch statistics in eval, as the source
