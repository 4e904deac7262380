"""Virtual devices (``virtual_devices=G``): a layer equals G per-device copies applied to the batch's
G chunks (outputs, input and parameter gradients, running statistics after averaging the copies'
buffers), in float64; compile and channels-last keep working; and two gloo processes with per-device
layers equal one process with G = 2 on the same global batch, step for step.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ssn

C = 5
KINDS = ("bn", "sn", "ssn", "ssn-bn/bn", "ssn-bn/in", "ssn-in/bn", "latched-bn/ln")


def _layer(kind: str, dim: int, groups: int, momentum: float | None = 0.1) -> nn.Module:
    """A float64 layer of ``kind`` with G = ``groups``, non-trivial parameters (seeded: every call
    with the same kind gives the same parameters)."""
    torch.manual_seed(0)
    kw = {"virtual_devices": groups, "momentum": momentum, "dtype": torch.float64}
    name, _, latch = kind.partition("-")
    if name == "latched":
        mean, var = latch.split("/")
        layer: nn.Module = ssn.LatchedNorm(C, mean, var, spatial_dims=dim, **kw)
    else:
        layer = ssn.create_norm(name, C, dim=dim, **({"radius": 0.2} if name == "ssn" else {}), **kw)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if pname == "weight" else 0.0))
        if name in ("sn", "ssn"):  # every ratio non-zero (SparsestMax at radius 0.2 keeps all three)
            layer.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
            layer.var_logits.copy_(torch.tensor([-0.1, 0.4, 0.2]))
    if latch and name != "latched":
        layer.latch(*latch.split("/"))
    return layer


def _input(n: int, dim: int, channels_last: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, C) + (4, 3, 2)[:dim]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
        x, up = x.to(memory_format=fmt), up.to(memory_format=fmt)
    return x, up


def _grads(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()
    }


def _average(copies: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The running buffers ``ssn.average_running_stats`` gives over the copies (float64 mean)."""
    out = {}
    for name in ("running_mean", "running_var"):
        out[name] = torch.stack([getattr(c, name) for c in copies]).mean(0)
    out["num_batches_tracked"] = copies[0].num_batches_tracked
    return out


LAYOUTS = [(1, False), (2, False), (2, True), (3, False), (3, True)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("dim", "channels_last"), LAYOUTS)
def test_g_virtual_devices_equal_g_copies_on_the_chunks(kind: str, dim: int, channels_last: bool) -> None:
    groups, per_device = 4, 2
    layer = _layer(kind, dim, groups)
    copies = [_layer(kind, dim, 1) for _ in range(groups)]
    for step in range(3):  # running statistics accumulate; the copies' buffers diverge
        x, up = _input(groups * per_device, dim, channels_last, seed=step)
        layer.zero_grad()
        xv = x.clone().requires_grad_()
        y = layer(xv)
        (y * up).sum().backward()
        ys, xgrads, pgrads = [], [], []
        for c, xc, uc in zip(copies, x.split(per_device), up.split(per_device), strict=True):
            c.zero_grad()
            xc = xc.clone().requires_grad_()
            yc = c(xc)
            (yc * uc).sum().backward()
            ys.append(yc.detach())
            xgrads.append(xc.grad)
            pgrads.append(_grads(c))
        torch.testing.assert_close(y.detach(), torch.cat(ys), msg=f"output, step {step}")
        if step == 0:  # not vacuous: the whole batch's statistics give another output
            assert not torch.allclose(y, _layer(kind, dim, 1)(x), atol=1e-3)
        torch.testing.assert_close(xv.grad, torch.cat(xgrads), msg=f"input grad, step {step}")
        for name, g in _grads(layer).items():  # the loss over all devices: their grads summed
            torch.testing.assert_close(g, sum(p[name] for p in pgrads), msg=f"{name} grad, step {step}")
        for name, want in _average(copies).items():
            torch.testing.assert_close(getattr(layer, name), want, msg=f"{name}, step {step}")
        if channels_last and kind == "bn":
            fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
            assert y.is_contiguous(memory_format=fmt)
    # evaluation: the running statistics, the averaged copies' in every copy
    averaged = copy.deepcopy(copies[0])
    for name, value in _average(copies).items():
        getattr(averaged, name).copy_(value)
    x, _ = _input(3, dim, channels_last, seed=9)  # any batch in eval (3: not divisible by G)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), averaged.eval()(x))


@pytest.mark.parametrize("kind", ("bn", "sn", "ssn-bn/bn"))
def test_cumulative_momentum_averages_like_the_devices(kind: str) -> None:
    """``momentum=None`` (cumulative average): the same weight on every device, so still linear."""
    layer = _layer(kind, 2, 2, momentum=None)
    copies = [_layer(kind, 2, 1, momentum=None) for _ in range(2)]
    for step in range(3):
        x, _ = _input(4, 2, False, seed=step)
        with torch.no_grad():
            layer(x)
            for c, xc in zip(copies, x.split(2), strict=True):
                c(xc)
        for name, want in _average(copies).items():
            torch.testing.assert_close(getattr(layer, name), want)


def test_bn_with_virtual_devices_is_a_batchnorm_and_g1_is_plain() -> None:
    assert type(ssn.create_norm("bn", 4)) is nn.BatchNorm2d
    assert type(ssn.create_norm("bn", 4, virtual_devices=1)) is nn.BatchNorm2d
    vbn = ssn.create_norm("bn", 4, dim=3, virtual_devices=8)
    assert isinstance(vbn, ssn.VirtualBatchNorm3d) and isinstance(vbn, nn.BatchNorm3d)
    assert "virtual_devices=8" in repr(vbn)
    assert set(vbn.state_dict()) == set(nn.BatchNorm3d(4).state_dict())
    assert isinstance(ssn.get_norm_layer("bn", virtual_devices=2)(4), ssn.VirtualBatchNorm2d)
    assert ssn.get_norm_layer("ssn", virtual_devices=2)(4).virtual_devices == 2
    # per-sample normalizers have no batch statistics: the setting is accepted and means nothing
    for name in ("gn", "in", "ln"):
        ref = ssn.create_norm(name, 4, groups=2) if name == "gn" else ssn.create_norm(name, 4)
        got = ssn.create_norm(name, 4, virtual_devices=4, **({"groups": 2} if name == "gn" else {}))
        assert type(got) is type(ref)
        assert (
            ssn.get_norm_layer(name, virtual_devices=4, **({"groups": 2} if name == "gn" else {}))(4)
            is not None
        )


def test_bad_settings_are_refused_with_the_numbers() -> None:
    for name in ("syncbn", "syncsn", "syncssn"):
        with pytest.raises(ValueError, match="per-device"):
            ssn.create_norm(name, 4, virtual_devices=2)
    with pytest.raises(ValueError, match="virtual_devices must be a positive int"):
        ssn.create_norm("ssn", 4, virtual_devices=0)
    for kind in ("bn", "sn", "ssn-bn/bn", "ssn-bn/in", "latched-bn/ln"):
        layer = _layer(kind, 2, 4)
        with pytest.raises(ValueError, match=r"batch of 6 samples does not split into 4 virtual devices"):
            layer(torch.randn(6, C, 3, 3, dtype=torch.float64))
        layer.eval()(torch.randn(6, C, 3, 3, dtype=torch.float64))  # eval: running statistics, any batch


def test_one_virtual_device_is_the_layer_without_them() -> None:
    for kind in ("sn", "ssn-bn/in", "latched-bn/ln"):
        a, b = _layer(kind, 2, 1), _layer(kind, 2, 1)
        b.virtual_devices = 1
        x, _ = _input(4, 2, False, seed=0)
        assert torch.equal(a(x), b(x))
        assert "virtual_devices" not in repr(a)


@pytest.mark.parametrize("kind", ("bn", "sn", "ssn-bn/bn", "ssn-ln/in", "latched-bn/ln"))
def test_compile_fullgraph_with_virtual_devices(kind: str) -> None:
    """Dynamo + AOTAutograd (``aot_eager``, as tests/test_compile.py): one graph, the eager values."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _layer(kind, 2, 2)
    compiled_layer = _layer(kind, 2, 2)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x, up = _input(4, 2, False, seed=step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = compiled(x1), eager(x2)
        torch.testing.assert_close(y1, y2)
        (y1 * up).sum().backward()
        (y2 * up).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        for (name, b1), b2 in zip(compiled_layer.named_buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(b1, b2, msg=name)


# ------------------------------------------------------------------ two processes against G = 2
WORLD = 2
BATCH = 8  # the global batch; each rank (device) gets 4
NET_NORMS = ("bn", "sn", "ssn", "ssn-latched")
STEPS = 3


def _net(norm: str, groups: int) -> nn.Module:
    """A small float64 convnet with two norm layers (for ``ssn-latched``: BN/BN and BN-mean/IN-var)."""

    def make(i: int) -> nn.Module:
        if norm == "ssn-latched":
            layer = ssn.create_norm("ssn", 4, virtual_devices=groups, dtype=torch.float64)
            layer.latch(*(("bn", "bn"), ("bn", "in"))[i])
            return layer
        kw = {"radius": 0.3} if norm == "ssn" else {}
        return ssn.create_norm(norm, 4, virtual_devices=groups, dtype=torch.float64, **kw)

    torch.manual_seed(0)
    dd = {"dtype": torch.float64}
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, **dd),
        make(0),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, **dd),
        make(1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3, **dd),
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(BATCH, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1,
            torch.randint(0, 3, (BATCH,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _record(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"loss": loss.detach().clone()}
    out.update({"param." + k: v.detach().clone() for k, v in model.named_parameters()})
    out.update({"buf." + k: v.detach().clone() for k, v in model.named_buffers() if "running" in k})
    return out


def _train(model: nn.Module, rank: int | None) -> list[dict[str, torch.Tensor]]:
    """SGD steps on the batches (rank: its half of each batch, under DDP); per step the loss over the
    global batch, the parameters after the step and the running statistics averaged over devices."""
    net: nn.Module = model
    if rank is not None:
        # NOTE: per-device buffers, each updated by its own device's batches and averaged by
        # ssn.average_running_stats (DDP's default broadcast_buffers would overwrite them with rank 0's
        # at every forward)
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rows = []
    for x, y in _batches():
        if rank is not None:
            part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            x, y = x[part], y[part]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()  # DDP: the mean of the ranks' gradients, i.e. the global batch's mean loss
        opt.step()
        if rank is not None:
            averaged = copy.deepcopy(model)
            ssn.average_running_stats(averaged)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            rows.append(_record(averaged, loss / WORLD))
        else:
            rows.append(_record(model, loss))
    return rows


def _worker(rank: int, store: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {norm: _train(_net(norm, 1), rank) for norm in NET_NORMS}
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_gloo_processes_equal_one_process_with_two_virtual_devices(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # not vacuous: one device's statistics over the whole batch train another network
    whole = _train(_net("bn", 1), None)[-1]
    assert not torch.allclose(whole["param.0.weight"], ranks[0]["bn"][-1]["param.0.weight"])
    for norm in NET_NORMS:
        single = _train(_net(norm, WORLD), None)
        for step, want in enumerate(single):
            for r in range(WORLD):
                got = ranks[r][norm][step]
                assert set(got) == set(want)
                for key in want:
                    torch.testing.assert_close(got[key], want[key], msg=f"{norm} step {step} rank {r}: {key}")


def test_a_task_builds_its_norms_with_virtual_devices() -> None:
    """``norm_kwargs: {virtual_devices: G}`` (YAML) reaches every norm layer; sync names refuse it."""
    from tasks import ImageClassifier

    for norm, cls in (("bn", ssn.VirtualBatchNorm2d), ("ssn", ssn.SparseSwitchNorm2d)):
        task = ImageClassifier(
            arch="resnet_small", num_classes=3, in_channels=1, norm=norm, norm_kwargs={"virtual_devices": 2}
        )
        layers = [m for m in task.modules() if isinstance(m, cls)]
        assert layers and all(m.virtual_devices == 2 for m in layers)
        assert task.virtual_devices == 2
        task(torch.randn(4, 1, 12, 12))
        with pytest.raises(ValueError, match="batch of 3 samples does not split into 2"):
            task(torch.randn(3, 1, 12, 12))
    with pytest.raises(ValueError, match="per-device"):
        ImageClassifier(
            arch="resnet_small",
            num_classes=3,
            in_channels=1,
            norm="syncssn",
            norm_kwargs={"virtual_devices": 2},
        )
