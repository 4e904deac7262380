"""Latching outside the forward: ``ssn.update_latches`` once per step gives the latches the layers
took inside their forward before (no host sync in the forward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssn
from ssn import functional as fn

# NOTE: recorded with the in-forward latching of commit c6df863 (before update_latches existed),
# running exactly the loop of _seeded_run without the update_latches call: (layer, 0 = mean /
# 1 = var) -> (first step after which it was latched, statistic). The same in float32 and float64,
# through the scalar and the batched SparsestMax.
OLD_IN_FORWARD = {
    (0, 0): (41, "ln"),
    (0, 1): (18, "bn"),
    (1, 0): (9, "bn"),
    (1, 1): (18, "bn"),
    (2, 0): (4, "ln"),
    (2, 1): (8, "bn"),
}


def _seeded_run(dtype: torch.dtype, steps: int = 45) -> dict[tuple[int, int], tuple[int, str]]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        ssn.SparseSwitchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        ssn.SparseSwitchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        ssn.SparseSwitchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(2, 3, 6, 6, generator=g).to(dtype) * 2, torch.randint(0, 4, (2,), generator=g))
        for _ in range(4)
    ]
    logits = [p for n, p in net.named_parameters() if "logits" in n]
    rest = [p for n, p in net.named_parameters() if "logits" not in n]
    opt = torch.optim.SGD([{"params": rest}, {"params": logits, "lr": 3.0}], lr=0.05, momentum=0.9)
    layers = [m for _, m in ssn.switch_norms(net)]
    first: dict[tuple[int, int], tuple[int, str]] = {}
    for step in range(steps):
        ssn.set_radius(net, step / 50)  # the authors' ramp: one-hot everywhere from step 41
        ssn.update_latches(net)
        x, y = data[step % 4]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        for i, m in enumerate(layers):
            for j, stat in enumerate(m.latched):
                if stat is not None:
                    first.setdefault((i, j), (step, stat))
    return dict(sorted(first.items()))


@pytest.mark.parametrize("dtype,path", [(torch.float32, "scalar"), (torch.float64, "batched")])
def test_latching_outside_the_forward_gives_the_old_latches_at_the_same_steps(dtype, path, monkeypatch):
    if path == "batched":
        monkeypatch.setattr(fn, "_force_batched", True)
    assert _seeded_run(dtype) == OLD_IN_FORWARD


def test_update_latches_is_one_call_and_never_unlatches(monkeypatch):
    layers = [ssn.SparseSwitchNorm2d(4) for _ in range(5)]
    net = nn.Sequential(*layers)
    with torch.no_grad():
        layers[1].var_logits.copy_(torch.tensor([0.0, 0.0, 5.0]))
        layers[3].mean_logits.copy_(torch.tensor([0.0, 5.0, 0.0]))
    calls = []
    real = fn.sparsestmax
    monkeypatch.setattr(ssn.training, "sparsestmax", lambda *a: calls.append(1) or real(*a))
    assert ssn.update_latches(net) == 2 and len(calls) == 1
    assert layers[1].latched == (None, "bn") and layers[3].latched == ("ln", None)
    with torch.no_grad():  # the ratio leaves the vertex: the latch stays
        layers[1].var_logits.zero_()
    assert ssn.update_latches(net) == 0 and layers[1].latched == (None, "bn")
    ssn.set_radius(net, 1.0)
    assert ssn.update_latches(net) == 8 and all(None not in m.latched for m in layers)
    assert ssn.update_latches(net) == 0 and len(calls) == 3  # nothing left to decide: no call
    sd = net.state_dict()
    fresh = nn.Sequential(*[ssn.SparseSwitchNorm2d(4) for _ in range(5)])
    fresh.load_state_dict(sd)
    assert [m.latched for m in fresh] == [m.latched for m in layers]


def test_update_latches_reads_the_device_once_per_call():
    """One host read of all verdicts per call, whatever the number of layers (on a GPU each read is
    a synchronisation): the layers' host mirrors are set from the verdicts, not read back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountReads.reads += 1
            return func(*args, **(kwargs or {}))

    net = nn.Sequential(*[ssn.SparseSwitchNorm2d(4) for _ in range(6)])
    with torch.no_grad():
        for i, m in enumerate(net):
            m.mean_logits.copy_(torch.tensor([3.0, 0.0, 0.0]) if i % 2 else torch.zeros(3))
            m.radius.fill_(0.8)
    with CountReads():
        latched = ssn.update_latches(net)
    assert latched == 3 and CountReads.reads == 0  # on the CPU the one read is .tolist(), no scalar read
    assert [m.latched[0] for m in net] == [None, "in"] * 3
