"""SN / SSN layers against an independent float64 reference and against the native layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssn
from ssn import SparseSwitchNorm1d, SparseSwitchNorm2d, SparseSwitchNorm3d, SwitchNorm2d
from ssn.norm import BN, IN, LN

from helpers import reference

SHAPES = {1: (4, 6, 9), 2: (4, 6, 5, 7), 3: (3, 6, 3, 4, 5)}
CLASSES = {
    ("sn", 1): ssn.SwitchNorm1d,
    ("sn", 2): ssn.SwitchNorm2d,
    ("sn", 3): ssn.SwitchNorm3d,
    ("ssn", 1): SparseSwitchNorm1d,
    ("ssn", 2): SparseSwitchNorm2d,
    ("ssn", 3): SparseSwitchNorm3d,
}


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        m.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        m.var_logits.copy_(torch.tensor([-0.1, 0.4, 0.2]))
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return m


def _ref_ratios(m):
    if isinstance(m, ssn.norm.SparseSwitchNormBase):
        f = lambda z: ssn.sparsestmax(z, float(m.radius))  # noqa: E731  (tested on its own)
    else:
        f = lambda z: torch.softmax(z, -1)  # noqa: E731
    return f(m.mean_logits), f(m.var_logits)


@pytest.mark.parametrize("kind,dim", sorted(CLASSES))
@pytest.mark.parametrize("training", [True, False])
def test_forward_backward_match_reference_float64(kind, dim, training):
    m = _randomise(CLASSES[(kind, dim)](6)).double().train(training)
    if kind == "ssn":
        m.radius.fill_(0.25)  # dense but constrained: the sphere branch of SparsestMax
    x = torch.randn(SHAPES[dim], dtype=torch.float64) * 2 + 0.5
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_m = copy.deepcopy(m)
    mr, vr = _ref_ratios(ref_m)
    running = None if training else (ref_m.running_mean, ref_m.running_var)
    y_ref = reference(x2, mr, vr, ref_m.weight, ref_m.bias, m.eps, running)
    y = m(x1)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    for name in ("weight", "bias", "mean_logits", "var_logits"):
        torch.testing.assert_close(getattr(m, name).grad, getattr(ref_m, name).grad, msg=name)


def test_gradcheck_through_the_fused_kernel():
    m = _randomise(SparseSwitchNorm2d(3)).double()
    m.radius.fill_(0.2)
    x = torch.randn(3, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    params = (m.weight, m.bias, m.mean_logits, m.var_logits)
    assert torch.autograd.gradcheck(lambda x, *p: m(x), (x, *params))


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_match_batchnorm(momentum):
    m = SwitchNorm2d(5, momentum=momentum)
    bn = nn.BatchNorm2d(5, momentum=momentum)
    for step in range(4):
        x = torch.randn(3, 5, 4, 4) * (step + 1) + step
        m(x)
        bn(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == 4


def _latched(cls, c, mean, var, **kw):
    m = cls(c, **kw)
    m.latch(ssn.STATS[mean], ssn.STATS[var])
    return m


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("stat,native", [(BN, "bn"), (IN, "in"), (LN, "ln")])
def test_latched_layer_equals_native_layer(dim, stat, native):
    cls = CLASSES[("ssn", dim)]
    m = _randomise(_latched(cls, 6, stat, stat))
    ref = ssn.create_norm(native, 6, dim=dim)
    with torch.no_grad():
        ref.weight.copy_(m.weight)
        ref.bias.copy_(m.bias)
        if stat == BN:
            ref.running_mean.copy_(m.running_mean)
            ref.running_var.copy_(m.running_var)
    for training in (True, False, True):
        m.train(training), ref.train(training)
        x = torch.randn(SHAPES[dim]) * 3 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = m(x1), ref(x2)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(m.weight.grad, ref.weight.grad)
        m.zero_grad(), ref.zero_grad()
    if stat == BN:
        torch.testing.assert_close(m.running_mean, ref.running_mean)
        torch.testing.assert_close(m.running_var, ref.running_var)
    assert m.mean_logits.grad is None and m.var_logits.grad is None  # latched: no gradient


@pytest.mark.parametrize("mean,var", [(BN, IN), (IN, LN), (LN, BN)])
def test_mixed_latches_match_reference(mean, var):
    m = _randomise(_latched(SparseSwitchNorm2d, 6, mean, var)).double()
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    mr, vr = torch.eye(3, dtype=torch.float64)[mean], torch.eye(3, dtype=torch.float64)[var]
    for training in (True, False):
        m.train(training)
        running = None if training else (m.running_mean.clone(), m.running_var.clone())
        torch.testing.assert_close(m(x), reference(x, mr, vr, m.weight, m.bias, m.eps, running))
    assert m.latched == (ssn.STATS[mean], ssn.STATS[var])


def test_latching_at_max_radius_persists_and_stops_gradients():
    m = _randomise(SparseSwitchNorm2d(6))
    with torch.no_grad():
        m.mean_logits.copy_(torch.tensor([0.1, 0.2, 0.9]))  # BN largest
        m.var_logits.copy_(torch.tensor([0.8, 0.1, 0.2]))  # IN largest
    m.radius.fill_(m.max_radius)
    x = torch.randn(SHAPES[2])
    m(x).sum().backward()
    assert m.latched == (None, None)  # the forward decides nothing: update_latches does
    assert ssn.update_latches(m) == 2
    assert m.latched == ("bn", "in")
    assert int(m.mean_latch) == BN and int(m.var_latch) == IN
    mr, vr = m.ratios()
    assert torch.equal(mr, torch.tensor([0.0, 0.0, 1.0])) and torch.equal(vr, torch.tensor([1.0, 0.0, 0.0]))
    # latches stay when the logits move or the radius drops
    with torch.no_grad():
        m.mean_logits.copy_(torch.tensor([5.0, 0.0, 0.0]))
    m.radius.fill_(0.0)
    m.zero_grad()
    assert ssn.update_latches(m) == 0
    m(x).sum().backward()
    assert m.latched == ("bn", "in")
    assert m.mean_logits.grad is None or not m.mean_logits.grad.any()
    # persisted in the state_dict and restored by load_state_dict
    sd = m.state_dict()
    assert int(sd["mean_latch"]) == BN and int(sd["var_latch"]) == IN
    fresh = SparseSwitchNorm2d(6)
    assert fresh.latched == (None, None)
    fresh.load_state_dict(sd)
    assert fresh.latched == ("bn", "in")
    fresh.eval(), m.eval()
    torch.testing.assert_close(fresh(x), m(x))


def test_ratios_contract_and_latch_at_sparse_point_before_max_radius():
    m = SparseSwitchNorm2d(4)
    assert m.mean_logits.shape == m.var_logits.shape == (3,)
    assert m.weight.shape == m.bias.shape == m.running_mean.shape == m.running_var.shape == (4,)
    assert m.radius.dim() == 0
    mr, vr = m.ratios()
    torch.testing.assert_close(mr, torch.full((3,), 1 / 3))
    with torch.no_grad():
        m.mean_logits.copy_(torch.tensor([3.0, 0.0, 0.0]))  # sparsemax already one-hot at r = 0
    m.eval()
    assert ssn.update_latches(m) == 0 and m.latched == (None, None)  # only training latches
    m.train()
    assert ssn.update_latches(m) == 1 and m.latched == ("in", None)
    sn = SwitchNorm2d(4)
    with torch.no_grad():
        sn.mean_logits.copy_(torch.tensor([300.0, 0.0, 0.0]))  # softmax saturates but SN never latches
    assert ssn.update_latches(sn) == 0 and sn.latched == (None, None)


def test_eval_changes_no_state():
    m = SparseSwitchNorm2d(4, radius=1.0).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 4, 3, 3))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cls", [SwitchNorm2d, SparseSwitchNorm2d])
@pytest.mark.parametrize("latch", [None, BN, IN, LN])
@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (1, 4, 1, 1), (1, 4, 3, 3), (1, 4, 1, 5)])
def test_degenerate_shapes_give_finite_outputs_and_grads(cls, latch, shape):
    m = cls(4)
    if latch is not None:
        m.latch(ssn.STATS[latch], ssn.STATS[latch])
    for training in (True, False):
        m.train(training)
        x = torch.randn(shape, requires_grad=True)
        y = m(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(m.running_var).all() and torch.isfinite(m.running_mean).all()


def test_constant_input_is_finite_and_gives_bias():
    m = _randomise(SparseSwitchNorm2d(3))
    x = torch.full((2, 3, 4, 4), 7.0, requires_grad=True)
    y = m(x)
    y.sum().backward()
    torch.testing.assert_close(y, m.bias.view(1, 3, 1, 1).expand_as(y), atol=1e-3, rtol=0)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("latch", [None, BN, IN, LN])
def test_channels_last_matches_contiguous(latch):
    m = _randomise(SparseSwitchNorm2d(6))
    m.radius.fill_(0.2)
    if latch is not None:
        m.latch(ssn.STATS[latch], ssn.STATS[latch])
    m2 = copy.deepcopy(m)
    x = torch.randn(3, 6, 5, 4)
    xa = x.clone().requires_grad_()
    xb = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    ya, yb = m(xa), m2(xb)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.to(memory_format=torch.channels_last))
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(m.weight.grad, m2.weight.grad)


@pytest.mark.parametrize("kind,dim", [("ssn", 2), ("sn", 2), ("ssn", 3)])
@pytest.mark.parametrize("mode", ["train", "eval-grad", "eval-no-grad"])
def test_channels_last_path_matches_float64_reference(kind, dim, mode):
    """The channels-last kernels (reductions and the affine map on an (N, M, C) view) against the
    float64 formula, in training, eval with grad (fused) and eval under no_grad (folded); the
    output keeps the input's memory format."""
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    m = _randomise(CLASSES[(kind, dim)](6)).double().train(mode == "train")
    if kind == "ssn":
        m.radius.fill_(0.25)
    x = (torch.randn(SHAPES[dim], dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=fmt)
    assert ssn.fused._nhwc(x) is not None and ssn.fused._flat(x) is None  # the path under test
    ref_m = copy.deepcopy(m)
    mr, vr = _ref_ratios(ref_m)
    running = None if mode == "train" else (ref_m.running_mean, ref_m.running_var)
    x_ref = x.contiguous().requires_grad_()
    y_ref = reference(x_ref, mr, vr, ref_m.weight, ref_m.bias, m.eps, running)
    if mode == "eval-no-grad":
        with torch.no_grad():
            y = m(x)
        torch.testing.assert_close(y, y_ref.detach())
        assert y.is_contiguous(memory_format=fmt)
        return
    xg = x.clone().requires_grad_()
    y = m(xg)
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y_ref).contiguous(memory_format=fmt)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xg.grad, x_ref.grad)
    for name in ("weight", "bias", "mean_logits", "var_logits"):
        torch.testing.assert_close(getattr(m, name).grad, getattr(ref_m, name).grad, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("latch", [None, BN, IN, LN])
def test_autocast_and_half_inputs(dtype, latch):
    m = _randomise(SparseSwitchNorm2d(8))
    m.radius.fill_(0.2)
    if latch is not None:
        m.latch(ssn.STATS[latch], ssn.STATS[latch])
    ref = copy.deepcopy(m)
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 9, 9) * 10
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        y = m(h)
    assert y.dtype == h.dtype
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(conv.weight.grad).all()
    y_ref = ref(h.detach().float())  # statistics are float32 inside, so only the rounding differs
    torch.testing.assert_close(y.float(), y_ref, atol=0.1, rtol=0.05)


def test_bad_inputs_give_clear_errors():
    m = SparseSwitchNorm2d(4)
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\)"):
        m(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="got 5 channels"):
        m(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"3-D input \(N, C, L\)"):
        SparseSwitchNorm1d(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        SparseSwitchNorm2d(0)
    with pytest.raises(ValueError, match="momentum"):
        SparseSwitchNorm2d(4, momentum=1.5)
    with pytest.warns(UserWarning, match="momentum=0.003"):
        SparseSwitchNorm2d(4, momentum=0.997)


def test_state_dict_round_trip_and_sn_ssn_share_layout():
    m = _randomise(SparseSwitchNorm2d(4))
    m(torch.randn(2, 4, 3, 3))
    sd = m.state_dict()
    other = SparseSwitchNorm2d(4)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert set(SwitchNorm2d(4).state_dict()) == set(sd)


def test_latch_mirror_follows_every_write_to_the_buffers():
    """The host-side latch mirror must not go stale when something other than the layer writes
    the buffers (an EMA copy_, a parent's load_state_dict with assign, a direct fill_)."""
    import copy

    x = torch.randn(4, 3, 5, 5)
    layer = ssn.create_norm("ssn", 3)
    layer(x)  # fills the mirror with 'unlatched'
    ema = copy.deepcopy(layer)
    latched = ssn.create_norm("ssn", 3)
    latched.latch("in", "in")
    with torch.no_grad():  # timm ModelEmaV2-style update of the buffers
        for b, src in zip(ema.buffers(), latched.buffers(), strict=True):
            b.copy_(src)
    assert ema.latched == ("in", "in")
    torch.testing.assert_close(ema.eval()(x), F.instance_norm(x, eps=1e-5))
    parent = nn.Sequential(copy.deepcopy(layer))
    parent.load_state_dict(nn.Sequential(latched).state_dict(), assign=True)
    assert parent[0].latched == ("in", "in")
    layer.mean_latch.fill_(2)
    assert layer.latched == ("bn", None)


@pytest.mark.parametrize("latch", [None, BN, IN])
def test_integer_and_empty_inputs_are_refused_with_what_was_expected(latch):
    m = SparseSwitchNorm2d(3)
    if latch is not None:
        m.latch(ssn.STATS[latch], ssn.STATS[latch])
    for training in (True, False):
        m.train(training)
        with pytest.raises(TypeError, match="floating-point input"):
            m(torch.ones(2, 3, 4, 4, dtype=torch.long))
        for shape in [(0, 3, 4, 4), (2, 3, 0, 4)]:
            with pytest.raises(ValueError, match="non-empty batch and spatial map"):
                m(torch.randn(shape))
    exported = ssn.LatchedNorm(3, "bn", "in")
    with pytest.raises(TypeError, match="floating-point input"):
        exported(torch.ones(2, 3, 4, 4, dtype=torch.int32))


@pytest.mark.parametrize("latch", [None, BN])
def test_half_layer_keeps_finite_running_stats_like_batchnorm(latch):
    x = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 400).half()  # var ~ 1.6e5
    m = SparseSwitchNorm2d(3).half()
    if latch is not None:
        m.latch(ssn.STATS[latch], ssn.STATS[latch])
    bn = nn.BatchNorm2d(3).half()
    y = m(x)
    bn(x)  # its running statistics are the reference
    assert torch.isfinite(y).all() and torch.isfinite(m.running_var).all()
    torch.testing.assert_close(m.running_var, bn.running_var, rtol=2e-3, atol=0)
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=2e-3, atol=2e-3)


def test_nan_radius_or_bad_latch_in_a_state_dict_is_refused_on_load():
    m = SparseSwitchNorm2d(3)
    sd = m.state_dict()
    sd["radius"] = torch.tensor(float("nan"))
    with pytest.raises(RuntimeError, match="radius must be a finite non-negative number"):
        SparseSwitchNorm2d(3).load_state_dict(sd)
    parent = nn.Sequential(SparseSwitchNorm2d(3))
    bad = {f"0.{k}": v for k, v in m.state_dict().items()}
    bad["0.mean_latch"] = torch.tensor(7)
    with pytest.raises(RuntimeError, match="0.mean_latch must be -1"):
        parent.load_state_dict(bad)
    assert parent[0].latched == (None, None)
    m.radius.fill_(float("nan"))  # written directly: the forward refuses it on the CPU
    with pytest.raises(ValueError, match="radius must be non-negative"):
        m(torch.randn(2, 3, 4, 4))
    assert m.latched == (None, None)


@pytest.mark.parametrize("kind,dim", sorted(CLASSES))
@pytest.mark.parametrize("device_path", [False, True])
def test_folded_dense_eval_matches_float64_reference(kind, dim, device_path, monkeypatch):
    """Eval under no_grad folds the ratios and BN terms once; compared with the unfolded formula
    in float64, for a float32 layer on inputs whose mean is a few standard deviations."""
    if device_path:  # the CUDA path (one var_mean kernel, no CPU kernel tricks), run on the CPU
        monkeypatch.setattr(ssn.fused, "_cache_blocked", lambda x: False)
    m = _randomise(CLASSES[(kind, dim)](6)).eval()
    if kind == "ssn":
        m.radius.fill_(0.25)
    x = torch.randn(SHAPES[dim]) * 2 + 3
    ref_m = copy.deepcopy(m).double()
    mr, vr = _ref_ratios(ref_m)
    y_ref = reference(
        x.double(), mr, vr, ref_m.weight, ref_m.bias, m.eps, (ref_m.running_mean, ref_m.running_var)
    )
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=2e-5, rtol=1e-5)
    y_fused = m(x)  # grad enabled: the fused path, as in training
    torch.testing.assert_close(y, y_fused.detach(), atol=2e-5, rtol=1e-5)
    with torch.no_grad():  # the unbiased instance variance of the authors' layers
        m.in_var_correction = 1
        torch.testing.assert_close(
            m(x), m.__class__.forward(m, x.requires_grad_()).detach(), atol=2e-5, rtol=1e-5
        )


def test_dense_eval_folds_once_and_refolds_on_any_change(monkeypatch):
    m = _randomise(SparseSwitchNorm2d(6)).eval()
    m.radius.fill_(0.25)
    calls = []
    real = m._ratio_rows
    monkeypatch.setattr(m, "_ratio_rows", lambda: calls.append(1) or real())
    x = torch.randn(SHAPES[2])
    with torch.no_grad():
        y = m(x)
        for _ in range(3):
            assert torch.equal(m(x), y)
    assert len(calls) == 1
    expected = []
    for change in (
        lambda: m.weight.mul_(2),
        lambda: m.mean_logits.add_(torch.tensor([0.3, 0.0, 0.0])),
        lambda: m.radius.fill_(0.5),
        lambda: m.running_var.mul_(3),
        lambda: m.load_state_dict(SparseSwitchNorm2d(6).state_dict()),
        lambda: m.latch(None, "in"),
    ):
        with torch.no_grad():
            change()
            y_new = m(x)
        expected.append(not torch.equal(y_new, y))
        y = y_new
        with torch.enable_grad():  # the fused path computes the same from the current state
            torch.testing.assert_close(y_new, m(x).detach(), atol=1e-5, rtol=1e-5)
    assert all(expected) and len(calls) == 1 + 6 + 6  # one fold per change, and the fused calls


@pytest.mark.parametrize("training", [True, False])
def test_device_path_of_the_fused_kernels_matches_reference(training, monkeypatch):
    monkeypatch.setattr(ssn.fused, "_cache_blocked", lambda x: False)
    test_forward_backward_match_reference_float64("ssn", 2, training)
    test_forward_backward_match_reference_float64("sn", 3, training)


@pytest.mark.parametrize("training", [True, False])
def test_blocked_statistics_over_many_blocks_match_reference(training, monkeypatch):
    """The cache-blocked variance loop with blocks of a few planes (real activations span many)."""
    monkeypatch.setattr(ssn.fused, "_BLOCK_ELEMS", 40)
    monkeypatch.setattr(ssn.fused, "_MAX_BLOCKS", 10**6)
    test_forward_backward_match_reference_float64("ssn", 2, training)
    test_forward_backward_match_reference_float64("sn", 3, training)


def test_autocast_saves_the_half_precision_input_not_a_float32_copy():
    m = _randomise(SparseSwitchNorm2d(8))
    m.radius.fill_(0.2)
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def _planes_with_means(shape: tuple[int, ...], shift: float, seed: int = 0) -> torch.Tensor:
    """``randn`` planes whose means are ``shift`` standard deviations from zero, except a quarter of
    them (the raw moments serve those; the rest are recomputed two-pass), and one constant plane."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    means = torch.full(shape[:2], shift).masked_fill_(torch.rand(shape[:2], generator=g) < 0.25, 0.0)
    x = x + means.view(shape[:2] + (1,) * (len(shape) - 2))
    x[0, 0] = shift + 0.5
    return x


@pytest.mark.parametrize("shift", [0.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize(
    "kind,channels_last", [("sn", False), ("ssn", False), ("ssn", True), ("in_unbiased", False)]
)
def test_dense_eval_keeps_float32_accuracy_at_large_means(shift, kind, channels_last):
    """Dense eval (and the latched-IN layer with the authors' unbiased variance, which takes the same
    path) within 10x the float32 error of the native (affine) InstanceNorm on the same input, against the
    float64 formula, at means up to 1000 standard deviations (raw moments lost 0.46 there)."""
    x = _planes_with_means((4, 8, 28, 28), shift)
    if kind == "in_unbiased":
        m = _randomise(SparseSwitchNorm2d(8, in_var_correction=1))
        m.latch("in", "in")
    else:
        m = _randomise(CLASSES[(kind, 2)](8))
        if kind == "ssn":
            m.radius.fill_(0.25)
    xd = x.double()
    with torch.no_grad():  # running statistics of this data, as a trained network has
        m.running_mean.copy_(xd.mean((0, 2, 3)))
        m.running_var.copy_(xd.var((0, 2, 3)))
    m.eval()
    ref_m = copy.deepcopy(m).double()
    shape = (1, -1, 1, 1)
    if kind == "in_unbiased":
        mu, var = xd.mean((2, 3), keepdim=True), xd.var((2, 3), keepdim=True)  # unbiased
        y_ref = (xd - mu) / torch.sqrt(var + m.eps) * ref_m.weight.view(shape) + ref_m.bias.view(shape)
    else:
        mr, vr = _ref_ratios(ref_m)
        y_ref = reference(
            xd, mr, vr, ref_m.weight, ref_m.bias, m.eps, (ref_m.running_mean, ref_m.running_var)
        )
    native = nn.InstanceNorm2d(8, affine=True)  # with the same affine map (its rounding scales)
    native.load_state_dict({"weight": m.weight, "bias": m.bias})
    native_err = _plane_errors(native(x), copy.deepcopy(native).double()(xd))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        err = _plane_errors(m(x), y_ref)
    # the constant plane (whose rounding the 1/sqrt(eps) scale amplifies) apart from the others
    const = torch.zeros_like(err, dtype=torch.bool)
    const[0, 0] = True
    for sel in (const, ~const):
        assert err[sel].max() <= 10 * native_err[sel].max(), (
            f"shift {shift}: error {err[sel].max():.2e}, native {native_err[sel].max():.2e}"
        )


def _plane_errors(y: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """Max |y - y_ref| of each (n, c) plane."""
    return (y.double() - y_ref.detach()).abs().flatten(2).amax(-1)


@pytest.mark.parametrize("shape", [(8, 16, 1, 1), (2, 16, 1, 1)])
def test_input_gradient_exact_on_1x1_maps_with_the_instance_variance(shape):
    """Variance from IN on 1x1 maps (always 0, so the mixed variance is eps) with a mixed mean: the
    backward's variance term, formed as x * c2 - mu * c2 with c2 ~ eps^-1.5, cancelled (an error of
    10 in a gradient of 500) where it is exactly 0; against the float64 formula's gradient.
    (Constant planes of more elements are ill-conditioned the same way, through the rounding of
    their mean: tests/test_conformance.py bounds those by the formula's own sensitivity.)"""
    m = _randomise(SwitchNorm2d(16))
    m.latch(None, "in")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) + 3
    grad = torch.randn(shape, generator=g)
    x32 = x.clone().requires_grad_()
    m(x32).backward(grad)
    xd = x.double().requires_grad_()
    ref_m = copy.deepcopy(m).double()
    mr, vr = ref_m.ratios()
    reference(xd, mr.detach(), vr.detach(), ref_m.weight, ref_m.bias, m.eps).backward(grad.double())
    err = (x32.grad.double() - xd.grad).abs().max().item()
    assert err <= 1e-5 * xd.grad.abs().max().item(), f"error {err:.2e} of {xd.grad.abs().max():.2e}"
