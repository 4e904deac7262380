"""Synchronised statistics: two CPU processes on gloo equal one process on the whole batch."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ssn

WORLD = 2
SHAPE = (6, 5, 4, 3)  # the whole batch; each rank gets 3 samples


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = ssn.create_norm("syncssn", 5, radius=0.2)
    with torch.no_grad():
        dense.mean_logits.copy_(torch.tensor([0.2, 0.1, 0.6]))
        dense.var_logits.copy_(torch.tensor([0.1, 0.5, 0.3]))
        dense.weight.uniform_(0.5, 1.5)
    latched = ssn.create_norm("syncssn", 5)
    latched.latch("bn", "bn")
    mixed = ssn.create_norm("syncsn", 5)
    mixed.latch("bn", "in")
    return {"dense": dense, "latched": latched, "mixed": mixed}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(SHAPE, generator=g) * 2 + 1, torch.randn(SHAPE, generator=g)


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * g).sum().backward()
    out = {"y": y.detach(), "x_grad": x.grad}
    for name, p in layer.named_parameters():
        out["grad." + name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    for name, b in layer.named_buffers():
        out["buf." + name] = b.clone()
    return out


def _worker(rank: int, store: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, g = _data()
    part = slice(rank * SHAPE[0] // WORLD, (rank + 1) * SHAPE[0] // WORLD)
    results = {}
    for name, layer in _layers().items():
        for _ in range(2):  # two steps: running statistics accumulate
            layer.zero_grad()
            out = _step(layer, x[part], g[part])
        for key in [k for k in out if k.startswith("grad.")]:
            dist.all_reduce(out[key])  # what DDP does (it then divides by the world size)
        results[name] = out
    # DDP over a model whose SSN layers are latched: the unused logits must not break reduction.
    model = nn.Sequential(nn.Conv2d(5, 5, 1), _layers()["latched"], nn.Flatten(), nn.Linear(60, 2))
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        ddp(x[part]).sum().backward()
        opt.step()
    results["ddp_weight"] = model[0].weight.detach().clone()
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, g = _data()
    for name, layer in _layers().items():
        single = copy.deepcopy(layer)
        for _ in range(2):
            single.zero_grad()
            want = _step(single, x, g)
        for r, res in enumerate(ranks):
            got = res[name]
            part = slice(r * SHAPE[0] // WORLD, (r + 1) * SHAPE[0] // WORLD)
            torch.testing.assert_close(got["y"], want["y"][part], msg=f"{name} output rank {r}")
            torch.testing.assert_close(got["x_grad"], want["x_grad"][part], msg=f"{name} x grad rank {r}")
            for key in [k for k in want if k.startswith(("grad.", "buf."))]:
                torch.testing.assert_close(got[key], want[key], msg=f"{name} {key} rank {r}")
    # the same DDP model on both ranks after three steps
    torch.testing.assert_close(ranks[0]["ddp_weight"], ranks[1]["ddp_weight"], rtol=0, atol=0)
