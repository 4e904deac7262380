"""The SN/SSN layers on a CUDA device, against an independent float64 reference on the CPU.

Marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` selects them;
``benchmarks/gpu_check.py`` runs them). Covered: every SN/SSN path on CUDA (dense training and
eval, with and without grad; latched to one statistic, the native kernels, and mixed latches;
1-D/2-D/3-D) against the SN formula in float64 on the CPU, the fused backward (input and
parameter gradients), running statistics, channels-last inputs, bf16/fp16 autocast,
``torch.compile(fullgraph=True)`` with inductor, and a multi-layer training step without host
synchronisation.

Host synchronisation, what is expected (checked with ``torch.cuda.set_sync_debug_mode``):

* forward, backward and the optimizer step of an SSN network: **none** (the latches are mirrored
  on the host; the ratios are computed on the device) -- checked under ``"error"`` after warm-up,
  with the BN network as a control (a sync there would be PyTorch's, not ours);
* ``ssn.update_latches``: by design one host read of every layer's verdict per call (``.cpu()``
  of an ``(L, 4)`` tensor); the layers' host mirrors are set from those values, not read back.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssn

from helpers import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
SHAPES = {1: (4, 6, 9), 2: (4, 6, 5, 7), 3: (3, 6, 3, 4, 5)}
# NOTE: float32 on the device against float64: a few ulps of the normalised outputs (~1) and of
# gradients summed over a few hundred elements.
TOL = dict(atol=2e-4, rtol=2e-4)
LATCHES = [None, ("bn", "bn"), ("in", "in"), ("ln", "ln"), ("bn", "in"), ("ln", "bn"), ("in", None)]


def _layer(kind: str, dim: int, latch: tuple[str | None, str | None] | None, seed: int = 0) -> nn.Module:
    """A float32 CPU layer with random affine, logits and running statistics."""
    m = ssn.create_norm(kind, 6, dim=dim)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        m.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        m.var_logits.copy_(torch.tensor([-0.1, 0.4, 0.2]))
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    if kind == "ssn":
        m.radius.fill_(0.25)  # dense but constrained: the sphere branch of SparsestMax
        if latch is not None:
            m.latch(*latch)
    return m


def _ref_ratios(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's ratios in float64 on the CPU, differentiable in its logits (one-hot where latched)."""
    if isinstance(m, ssn.SparseSwitchNormBase):
        rows = [ssn.sparsestmax(z, float(m.radius)) for z in (m.mean_logits, m.var_logits)]
        for i, stat in enumerate(m.latched):
            if stat is not None:
                rows[i] = torch.eye(3, dtype=torch.float64)[ssn.STATS.index(stat)]
        return rows[0], rows[1]
    return torch.softmax(m.mean_logits, -1), torch.softmax(m.var_logits, -1)


def _check_against_reference(
    m: nn.Module, x: torch.Tensor, training: bool, no_grad: bool = False, tol: dict[str, float] = TOL
) -> None:
    """``m`` (a float32 CPU layer) run on CUDA on ``x`` against the float64 reference on the CPU:
    output, input and parameter gradients, running statistics."""
    ref_m = copy.deepcopy(m).double().train(training)
    dev_m = copy.deepcopy(m).to(DEV).train(training)
    x64 = x.detach().double().requires_grad_()
    x_dev = x.detach().to(DEV).requires_grad_(not no_grad)
    mr, vr = _ref_ratios(ref_m)
    running = None if training else (ref_m.running_mean, ref_m.running_var)
    y_ref = reference(x64, mr, vr, ref_m.weight, ref_m.bias, m.eps, running)
    if no_grad:  # the folded dense eval (per-device kernels: one var_mean on CUDA)
        with torch.no_grad():
            y = dev_m(x_dev)
        torch.testing.assert_close(y.cpu().double(), y_ref.detach(), **tol)
        return
    y = dev_m(x_dev)
    torch.testing.assert_close(y.cpu().double(), y_ref, **tol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g.to(DEV, y.dtype))
    y_ref.backward(g.double())
    torch.testing.assert_close(x_dev.grad.cpu().double(), x64.grad, **tol)
    for name in ("weight", "bias", "mean_logits", "var_logits"):
        p, p_ref = getattr(dev_m, name), getattr(ref_m, name)
        if p_ref.grad is None:  # latched ratio: a constant
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad.cpu().double(), p_ref.grad, **tol, msg=name)
    if training:  # the double CPU layer's own update (tested against BatchNorm in test_norm)
        with torch.no_grad():
            ref_m(x64)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(
                getattr(dev_m, name).cpu().double(), getattr(ref_m, name), **tol, msg=name
            )


def _cases() -> list[tuple[str, tuple[str | None, str | None] | None]]:
    return [("sn", None)] + [("ssn", latch) for latch in LATCHES]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("kind,latch", _cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_path_on_cuda_matches_float64_cpu(kind, latch, dim, training):
    x = torch.randn(SHAPES[dim], generator=torch.Generator().manual_seed(dim)) * 2 + 0.5
    _check_against_reference(_layer(kind, dim, latch), x, training)
    if not training:
        _check_against_reference(_layer(kind, dim, latch), x, training, no_grad=True)


@pytest.mark.parametrize("shift", [10.0, 1000.0])
def test_dense_eval_exact_at_large_means_on_cuda(shift):
    """The CUDA eval statistics (one var_mean) do not cancel at large activation means."""
    x = torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(0)) + shift
    m = _layer("ssn", 2, None)
    with torch.no_grad():
        m.running_mean.fill_(shift)
    _check_against_reference(m, x, training=False, no_grad=True, tol=dict(atol=2e-3, rtol=2e-3))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize(
    "kind,latch",
    [("sn", None), ("ssn", None), ("ssn", ("bn", "bn")), ("ssn", ("ln", "in"))],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_on_cuda(kind, latch, dim, training):
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    shape = (4, 6, 5, 7) if dim == 2 else (3, 6, 3, 4, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    _check_against_reference(_layer(kind, dim, latch), x.contiguous(memory_format=fmt), training)
    if not training:
        _check_against_reference(
            _layer(kind, dim, latch), x.contiguous(memory_format=fmt), False, no_grad=True
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "kind,latch",
    [("sn", None), ("ssn", None), ("ssn", ("bn", "bn")), ("ssn", ("bn", "in"))],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_on_cuda(kind, latch, dtype, training):
    """A half-precision input (a convolution's output under autocast) through the layer: finite
    and close to the float64 reference of the same rounded input, gradients too."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1).to(DEV)
    m = _layer(kind, 2, latch)
    dev_m = copy.deepcopy(m).to(DEV).train(training)
    x = torch.randn(4, 3, 8, 8, device=DEV)
    with torch.autocast(torch.device(DEV).type, dtype=dtype):
        h = conv(x)
        assert h.dtype == dtype
        h.retain_grad()
        y = dev_m(h)
    assert torch.isfinite(y).all()
    ref_m = copy.deepcopy(m).double().train(training)
    h64 = h.detach().cpu().double().requires_grad_()
    mr, vr = _ref_ratios(ref_m)
    running = None if training else (ref_m.running_mean, ref_m.running_var)
    y_ref = reference(h64, mr, vr, ref_m.weight, ref_m.bias, m.eps, running)
    # NOTE: the output is rounded to the half dtype (bf16: 8 bits, ~4e-3 relative, outputs up to ~4)
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y.detach().cpu().double(), y_ref.detach(), **tol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g.to(DEV, y.dtype))
    y_ref.backward(g.double())
    assert torch.isfinite(h.grad).all()
    torch.testing.assert_close(h.grad.cpu().double(), h64.grad, atol=0.1, rtol=5e-2)
    for p in dev_m.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kind,training", [("dense", True), ("dense", False), ("mixed", True)])
def test_compile_fullgraph_inductor_on_cuda(kind, training):
    """One graph (fullgraph) through inductor/triton computes what the eager CUDA layer does."""
    import torch._dynamo

    torch._dynamo.reset()
    latch = ("ln", "in") if kind == "mixed" else None
    m = _layer("ssn", 2, latch).to(DEV).train(training)
    ref = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True)
    for _ in range(2):  # the second call reuses the graph (running stats moved in between)
        x = torch.randn(4, 6, 8, 8, device=DEV) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = compiled(x1), ref(x2)
        torch.testing.assert_close(y, y_ref, **TOL)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)
        for (name, p), p_ref in zip(m.named_parameters(), ref.parameters(), strict=True):
            if p_ref.grad is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=name)
        for (name, b), b_ref in zip(m.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, **TOL, msg=name)


def _resnet(norm: str) -> nn.Module:
    """torchvision's ResNet-18 (10 classes) with ``norm`` in place of every BatchNorm2d."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    return net if norm == "bn" else ssn.convert_norm(net, norm)


def _sync_warnings(fn) -> int:
    """How many synchronising CUDA operations ``fn`` performs (sync debug mode "warn")."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("norm", ["bn", "sn", "ssn", "ssn-latched"])
def test_training_step_has_no_host_sync(norm):
    """Forward, backward and SGD of a ResNet-18 on CUDA run under sync debug mode "error" (after
    warm-up); ``ssn.update_latches`` between steps does its expected reads only. BN: the control."""
    net = _resnet("ssn" if norm.startswith("ssn") else norm).to(DEV).train()
    if norm == "ssn-latched":  # the native-kernel path of every layer
        for _, m in ssn.switch_norms(net):
            m.latch("bn", "bn")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, 3, 32, 32, device=DEV)
    target = torch.randint(0, 10, (8,), device=DEV)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), target).backward()
        opt.step()

    for _ in range(3):  # warm-up: lazy inits, cuDNN/cuBLAS handles, the host mirror of the latches
        ssn.update_latches(net)
        step()
    torch.cuda.synchronize()
    for _ in range(2):
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        layers = sum(
            isinstance(m, ssn.SparseSwitchNormBase) and None in m.latched for _, m in ssn.switch_norms(net)
        )
        syncs = _sync_warnings(lambda: ssn.update_latches(net))
        assert syncs <= (1 if layers else 0), (syncs, layers)  # one read of all verdicts
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in net.parameters())
