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
    results["latch_combos"] = _latch_combinations(x[part], rank)
    results["broadcast_latch"] = _broadcast_latch(x[part], rank)
    results["skip_batch"] = _skip_batch_step(rank)
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


STATS_OR_NONE = (None, "in", "ln", "bn")


class _AllLatches(nn.Module):
    """Every (mean latch, var latch) combination, with and without affine, side by side."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(5, 5, 1)
        self.norms = nn.ModuleList()
        for affine in (True, False):
            for mean in STATS_OR_NONE:
                for var in STATS_OR_NONE:
                    layer = ssn.create_norm("ssn", 5, affine=affine, radius=0.1)
                    with torch.no_grad():
                        layer.mean_logits.copy_(torch.tensor([0.3, 0.1, 0.5]))
                        layer.var_logits.copy_(torch.tensor([0.2, 0.6, 0.1]))
                    layer.latch(mean, var)
                    self.norms.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return sum(n(h).square().mean() for n in self.norms)


def _latch_combinations(x: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Three DDP steps (find_unused_parameters=False) over every latch combination x affine."""
    model = _AllLatches()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        ddp(x).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _broadcast_latch(x: torch.Tensor, rank: int) -> list:
    """Rank 0 latched, rank 1 not (and has run, so its host mirror holds 'unlatched'): DDP's
    broadcast of rank 0's buffers must latch rank 1's layer too."""
    torch.manual_seed(0)
    layer = ssn.create_norm("ssn", 5, radius=0.1)
    layer(x)
    if rank == 0:
        layer.latch("in", "ln")
    nn.parallel.DistributedDataParallel(nn.Sequential(layer))
    return list(layer.latched)


def _skip_batch_step(rank: int) -> dict[str, torch.Tensor]:
    """Rank 1's batch was entirely unreadable: it must still take part in the gradient reduction
    (a None loss there leaves rank 0 waiting forever)."""
    from tasks import ImageClassifier

    class TrainingStep(nn.Module):  # what Lightning's DDP wraps: the training step runs inside forward
        def __init__(self, task: nn.Module) -> None:
            super().__init__()
            self.task = task

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if rank == 1:
                return self.task.skip_batch()
            return torch.nn.functional.cross_entropy(self.task(x), y)

    torch.manual_seed(0)
    task = ImageClassifier(arch="resnet_small", num_classes=3, in_channels=1, norm="ssn")
    ddp = nn.parallel.DistributedDataParallel(TrainingStep(task))
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        ddp(torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in task.named_parameters()}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(240)
def test_two_processes_equal_one_process_on_the_whole_batch(ddp_results):
    ranks = ddp_results
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


def test_every_latch_combination_trains_under_ddp(ddp_results):
    ranks = ddp_results
    for key in ranks[0]["latch_combos"]:
        if "running_" in key:
            continue  # per-device statistics, updated after DDP's buffer broadcast
        torch.testing.assert_close(
            ranks[0]["latch_combos"][key], ranks[1]["latch_combos"][key], rtol=0, atol=0
        )
    # latched logits did not move; dense ones did (against the model before training)
    before = _AllLatches().state_dict()
    after = ranks[0]["latch_combos"]
    i = 0
    for _affine in (True, False):
        for mean in STATS_OR_NONE:
            for var in STATS_OR_NONE:
                for kind, latch in (("mean", mean), ("var", var)):
                    key = f"norms.{i}.{kind}_logits"
                    moved = not torch.equal(before[key], after[key])
                    assert moved == (latch is None), (key, mean, var)
                i += 1


def test_ddp_buffer_broadcast_updates_the_latch_mirror(ddp_results):
    assert ddp_results[0]["broadcast_latch"] == ["in", "ln"]
    assert ddp_results[1]["broadcast_latch"] == ["in", "ln"]


def test_a_rank_with_an_unreadable_batch_still_steps_with_the_others(ddp_results):
    a, b = ddp_results[0]["skip_batch"], ddp_results[1]["skip_batch"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
