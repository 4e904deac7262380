"""Float32 accuracy of the SN/SSN layers at large activation means, and what exact dense eval costs.

1. Errors: max |y_float32 - y_float64| of the same layer on ``randn(4, 8, 28, 28) + shift`` (mixed
   ratios, running statistics of the data, as a trained network has), for dense SSN and SN eval,
   dense SSN training, a layer latched to IN with the authors' unbiased instance variance (eval),
   and the native InstanceNorm2d with the same affine map. ``raw moments`` is the dense eval that
   worked from the raw plane sums (sum x, sum x^2) alone, kept here only as the before of issue 18.

2. Cost: dense SSN eval (``no_grad``) time over the raw-moments eval in the same rounds, at the
   layer benchmark's shapes, contiguous and channels-last, on ``randn`` planes (every plane served
   by the raw sums) and on planes shifted by 10 standard deviations (every plane recomputed
   two-pass).

    python benchmarks/precision.py            # both (about a minute on 2 CPU cores)
    python benchmarks/precision.py --quick    # errors, and the cost at two small shapes
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch
import torch.nn.functional as F
from bench_norm import SHAPES_2D, _alternate_rounds, steady_allocator
from torch import nn

import ssn
from ssn.fused import _dof, _plane_affine, _plane_sums

SHIFTS = (0.0, 10.0, 100.0, 1000.0)


@torch.no_grad()
def raw_moments_eval(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense eval from the raw sums alone, var = k (s2 / M - mu^2): the formula before issue 18."""
    key = m._fold_key(x.dtype)  # the layer's own cached fold, as its dense eval uses it
    if m._fold is None or m._fold[0] != key:
        m._fold = (key, m._make_fold(x.dtype))
    fold = m._fold[1]
    (m_in, m_ln), (v_in, v_ln) = fold["ratios"]
    bn = fold["bn"]
    weight, bias, *unit = m._folded_affine(fold, x.shape[0], x.dtype)
    if x.is_contiguous():
        s1, s2 = _plane_sums(x, unit)  # (the same cached zeros and ones as the layer's)
    else:  # channels-last: reductions over the (N, M, C) view
        xv = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
        s1, s2 = xv.sum(1), xv.square().sum(1)
    ch, size = x.shape[1], math.prod(x.shape[2:])
    k = size / _dof(size, m.in_var_correction)
    mu_ln = s1.sum(1, keepdim=True).mul_(1 / (ch * size))
    var_ln = s2.sum(1, keepdim=True).mul_(k / (ch * size)).addcmul_(mu_ln, mu_ln, value=-1)
    if k != 1:
        var_ln.sub_(torch.linalg.vecdot(s1, s1).unsqueeze(1), alpha=(k - 1) / (ch * size * size))
    mean = torch.add(bn[0], mu_ln, alpha=m_ln).add_(s1, alpha=m_in / size)
    var = torch.add(bn[1], var_ln, alpha=v_ln).add_(s2, alpha=v_in * k / size)
    var = var.addcmul_(s1, s1, value=-v_in * k / (size * size)).clamp_min_(m.eps)
    if not x.is_contiguous():
        scale = var.rsqrt_().mul_(weight.view_as(var))
        return _plane_affine(x, scale, torch.addcmul(bias.view_as(scale), mean, scale, value=-1))
    y = F.batch_norm(x.view(1, -1, size), mean.view(-1), var.view(-1), weight, bias, False, 0.0, 0.0)
    return y.view_as(x)


def _layer(kind: str, x: torch.Tensor, **kw) -> nn.Module:
    """A layer with mixed ratios and random affine parameters, running statistics of ``x``."""
    m = ssn.create_norm(kind, x.shape[1], **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        m.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        m.var_logits.copy_(torch.tensor([-0.1, 0.4, 0.2]))
        xd = x.double()
        m.running_mean.copy_(xd.mean((0, 2, 3)))
        m.running_var.copy_(xd.var((0, 2, 3)))
    if kind == "ssn":
        m.radius.fill_(0.25)
    return m


def _error(m: nn.Module, x: torch.Tensor, train: bool, f=None) -> float:
    """Max |float32 - float64| of ``m`` (or ``f(m, x)``) on ``x``."""
    ref = copy.deepcopy(m).double()
    m.train(train), ref.train(train)
    run = f or (lambda mod, inp: mod(inp))
    with torch.set_grad_enabled(train):
        return (run(m, x).double() - run(ref, x.double())).abs().max().item()


def errors() -> None:
    print("max |y_float32 - y_float64|, input randn(4, 8, 28, 28) + shift, mixed ratios")
    cols = (
        "SSN eval",
        "SN eval",
        "SSN eval raw moments",
        "SSN train",
        "IN-latched unbiased eval",
        "native IN",
    )
    print(f"{'shift':>7}  " + "  ".join(f"{c:>24}" for c in cols))
    for shift in SHIFTS:
        x = torch.randn(4, 8, 28, 28, generator=torch.Generator().manual_seed(1)) + shift
        ssn_l, sn_l = _layer("ssn", x), _layer("sn", x)
        latched = _layer("ssn", x, in_var_correction=1)
        latched.latch("in", "in")
        native = nn.InstanceNorm2d(8, affine=True)
        native.load_state_dict({"weight": ssn_l.weight, "bias": ssn_l.bias})
        row = (
            _error(ssn_l, x, False),
            _error(sn_l, x, False),
            _error(ssn_l, x, False, raw_moments_eval),
            _error(ssn_l, x, True),
            _error(latched, x, False),
            _error(native, x, True),
        )
        print(f"{shift:>7g}  " + "  ".join(f"{e:>24.1e}" for e in row))


def cost(shapes: list[tuple[int, ...]], rounds: int) -> None:
    print("\ndense SSN eval time / raw-moments eval time, same rounds (median over rounds, and range)")
    for shift, layout in (
        (0.0, "contiguous"),
        (10.0, "contiguous"),
        (0.0, "channels-last"),
        (10.0, "channels-last"),
    ):
        for shape in shapes:
            x = torch.randn(shape) + shift
            if layout == "channels-last":
                x = x.to(memory_format=torch.channels_last)
            m = _layer("ssn", torch.randn(2, shape[1], 2, 2)).eval()
            runs = {"exact": lambda m=m, x=x: m(x), "raw": lambda m=m, x=x: raw_moments_eval(m, x)}
            with torch.no_grad():
                times = _alternate_rounds(runs, rounds)
            ratios = sorted(t / r for t, r in zip(times["exact"], times["raw"], strict=True))
            shape_s = "x".join(map(str, shape))
            print(
                f"  shift {shift:>4g}  {layout:>13}  {shape_s:>16}  {statistics.median(ratios):.3f}  "
                f"({ratios[0]:.2f}-{ratios[-1]:.2f})  raw {statistics.median(times['raw']) * 1e3:.2f} ms"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="errors, and the cost at two small shapes")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    steady_allocator()
    errors()
    shapes = [(8, 256, 14, 14), (8, 512, 7, 7)] + ([] if args.quick else SHAPES_2D)
    cost(shapes, 5 if args.quick else args.rounds)


if __name__ == "__main__":
    main()
