"""Layer benchmark: SN / SSN against the native PyTorch normalisers, as time ratios.

For activation shapes typical of ResNet-50 (2-D) and a 3-D ResNet (video), times training
(forward + backward) and evaluation (forward under no_grad) of:

    SN (dense), SSN (dense)           against BatchNorm
    SSN latched on BN                 against BatchNorm
    SSN latched on IN                 against InstanceNorm (affine)
    SSN latched on LN                 against GroupNorm(1, C)

The candidates are timed alternately, one iteration each per round; a ratio is the median over
rounds of the candidate's time over its reference's in the same round, so drifts of the machine
cancel.

Each row also gives the layer's achieved memory bandwidth as a fraction of a copy of the same
tensor (``dst.copy_(src)``, timed in the same rounds: 2 * numel * itemsize bytes over its time),
the memory roof of this machine for this size. A layer's bytes are its minimum traffic: eval reads
the activation and writes the output (2 * numel * itemsize); a training step (forward + backward)
reads x and writes y, then reads the output gradient and x and writes the input gradient
(5 * numel * itemsize). Per-channel parameters and statistics are ignored (C << numel). 1.0 is a
layer that moves no byte more than it must at copy speed; BatchNorm's own fraction shows how far
the native kernels are from it (its training forward reads x twice, for instance).

Then whole ResNet-50s (batch 8 at 112 px): dense SSN, SSN latched on BN, and the latter exported
with ssn.export_norm, each against torchvision's BatchNorm ResNet-50.

    python benchmarks/bench_norm.py            # full table (a few minutes on 2 CPU cores)
    python benchmarks/bench_norm.py --quick    # one small shape per rank
    python benchmarks/bench_norm.py --compiled --no-models --shapes 16x64x56x56   # torch.compile'd layers
    python benchmarks/bench_norm.py --device cuda --no-models --quick             # the layers on a GPU
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import ssn
from ssn.fused import _plane_affine, _plane_sums
from ssn.norm import BN, IN, LN

# ResNet-50 activations at the paper's 32 images per GPU (stages 1-4 at 224 px); a slow_r50-style
# 3-D ResNet at 8 clips of 8 frames.
SHAPES_2D = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
SHAPES_3D = [(8, 64, 8, 56, 56), (8, 256, 8, 28, 28), (8, 1024, 8, 14, 14)]
QUICK_2D = [(8, 64, 56, 56)]
QUICK_3D = [(2, 64, 8, 28, 28)]


def _latched(dim: int, c: int, stat: int) -> nn.Module:
    m = ssn.create_norm("ssn", c, dim=dim)
    m.latch(ssn.STATS[stat], ssn.STATS[stat])
    return m


class _EvalFloor(nn.Module):
    """The two passes over the activation any dense SN/SSN evaluation makes with these kernels,
    and nothing else: the per-plane sums (one read) and the per-plane affine map (a read and a
    write, the native eval batch-norm kernel). Its ratio to BatchNorm's eval (one read and one
    write) is the floor of dense eval's; the difference to SSN dense is the layer's own (N, C) work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1, s2 = _plane_sums(x)
        return _plane_affine(x, s1, s2)


def candidates(dim: int, c: int) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, name of the native module it is compared with)."""
    dense_ssn = ssn.create_norm("ssn", c, dim=dim, radius=0.3)
    with torch.no_grad():  # ratios that stay dense at this radius
        dense_ssn.mean_logits.copy_(torch.tensor([0.3, 0.2, 0.5]))
        dense_ssn.var_logits.copy_(torch.tensor([0.2, 0.4, 0.3]))
    return {
        "BatchNorm": (ssn.create_norm("bn", c, dim=dim), "BatchNorm"),
        "InstanceNorm": (ssn.create_norm("in", c, dim=dim), "InstanceNorm"),
        "GroupNorm(1,C)": (ssn.create_norm("ln", c, dim=dim), "GroupNorm(1,C)"),
        "SN": (ssn.create_norm("sn", c, dim=dim), "BatchNorm"),
        "SSN dense": (dense_ssn, "BatchNorm"),
        "SSN latched BN": (_latched(dim, c, BN), "BatchNorm"),
        "SSN latched IN": (_latched(dim, c, IN), "InstanceNorm"),
        "SSN latched LN": (_latched(dim, c, LN), "GroupNorm(1,C)"),
        "dense eval floor": (_EvalFloor(), "BatchNorm"),  # eval only (see measure)
    }


# Bytes of the activation a layer must move, in units of numel * itemsize (see the docstring).
TRAFFIC = {"eval": 2, "train": 5}


def min_traffic_bytes(shape: tuple[int, ...], train: bool, itemsize: int = 4) -> int:
    """The layer's minimum memory traffic on an activation of ``shape``: eval reads x and writes y;
    training also reads dy and x and writes dx in the backward."""
    return TRAFFIC["train" if train else "eval"] * math.prod(shape) * itemsize


def roof_fraction(seconds: float, copy_seconds: float, train: bool) -> float:
    """Achieved bandwidth (minimum traffic / time) over the copy's (2 * numel * itemsize / its time)."""
    return TRAFFIC["train" if train else "eval"] / 2 * copy_seconds / seconds


def device_sync(device: torch.device | str) -> Callable[[], None] | None:
    """What makes a timing wait for the device's queued kernels (None on the CPU, which runs them eagerly)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, train: bool) -> Callable[[], None]:
    if train:
        module.train()

        def run() -> None:
            x.grad = None
            module(x).backward(grad)

    else:
        module.eval()

        def run() -> None:
            with torch.no_grad():
                module(x)

    return run


def compiled_candidates(dim: int, c: int) -> dict[str, tuple[nn.Module, str]]:
    """Eager BatchNorm against torch.compile'd dense SSN and SN and latched SSN (one graph each)."""
    cands = candidates(dim, c)
    out = {"BatchNorm": cands["BatchNorm"]}
    for name in ("SN", "SSN dense", "SSN latched BN"):
        out[f"{name} compiled"] = (torch.compile(cands[name][0], fullgraph=True, dynamic=False), "BatchNorm")
    return out


def measure(
    shape: tuple[int, ...], train: bool, rounds: int, compiled: bool = False, device: str = "cpu"
) -> list[tuple[str, float, float, str]]:
    """(name, median seconds, ratio to its reference, reference) of every candidate."""
    return measure_roof(shape, train, rounds, compiled, device)[0]


def measure_roof(
    shape: tuple[int, ...], train: bool, rounds: int, compiled: bool = False, device: str = "cpu"
) -> tuple[list[tuple[str, float, float, str]], float]:
    """``measure``'s rows and the median time of a copy of the activation, timed in the same rounds
    (the memory roof: see ``roof_fraction``)."""
    dim = len(shape) - 2
    cands = (compiled_candidates if compiled else candidates)(dim, shape[1])
    if train or torch.device(device).type != "cpu":
        # NOTE: the floor is the CPU kernels' two passes; CUDA's dense eval is one var_mean kernel
        cands.pop("dense eval floor", None)
    for m, _ in cands.values():
        m.to(device)
    x = torch.randn(shape, device=device, requires_grad=train)
    grad = torch.randn(shape, device=device)
    runs = {name: _step(m, x, grad, train) for name, (m, _) in cands.items()}
    dst = torch.empty_like(x, requires_grad=False)
    src = x.detach()
    sync = device_sync(device)
    # NOTE: _alternate_rounds repeats every run as often as the fastest needs; a lone copy (a few
    # microseconds) would multiply the layers' repeats by 100s. The copy run repeats itself to last
    # about as long as the fastest layer instead, and its time is divided back.
    reps = max(
        1,
        round(
            _once(min(runs.values(), key=lambda r: _once(r, sync)), sync)
            / _once(lambda: dst.copy_(src), sync, 5)
        ),
    )

    def copies() -> None:
        for _ in range(reps):
            dst.copy_(src)

    runs[COPY] = copies
    times = _alternate_rounds(runs, rounds, sync=sync)
    ratios = {ref: round_ratios(times, ref) for _, ref in cands.values()}  # once per reference
    rows = [
        (name, statistics.median(times[name]), ratios[ref][name], ref) for name, (_, ref) in cands.items()
    ]
    return rows, statistics.median(times[COPY]) / reps


def _once(run: Callable[[], object], sync: Callable[[], None] | None, n: int = 1) -> float:
    """Seconds per call of ``run`` (after one untimed call), for sizing repeats only."""
    run()
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    if sync:
        sync()
    return (time.perf_counter() - t0) / n


COPY = "copy (roof)"


def model_candidates() -> dict[str, nn.Module]:
    """ResNet-50s: native BN; dense SSN; SSN latched on BN everywhere; that one exported."""
    import torchvision

    torch.manual_seed(0)
    native = torchvision.models.resnet50()
    dense = ssn.convert_norm(copy.deepcopy(native), "ssn", radius=0.3)
    latched = ssn.convert_norm(copy.deepcopy(native), "ssn")
    for _, m in ssn.switch_norms(latched):
        m.latch("bn", "bn")
    exported = ssn.export_norm(copy.deepcopy(latched))
    return {
        "native ResNet-50": native,
        "SSN dense": dense,
        "SSN latched (BN)": latched,
        "SSN exported": exported,
    }


def measure_models(rounds: int, batch: int, size: int) -> list[tuple[str, str, float, float]]:
    """Whole-model train step (forward, backward, SGD) and eval forward, ratios to native."""
    cands = model_candidates()
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    rows = []
    for mode in ("train", "eval"):
        runs = {}
        for name, model in cands.items():
            if mode == "train":
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

                def run(model=model, opt=opt) -> None:
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(x), target).backward()
                    opt.step()

            else:
                model.eval()

                def run(model=model) -> None:
                    with torch.no_grad():
                        model(x)

            runs[name] = run
        times = _alternate(runs, rounds)
        base = times["native ResNet-50"]
        rows += [(name, mode, t, t / base) for name, t in times.items() if name != "native ResNet-50"]
    return rows


def steady_allocator() -> bool:
    """Make glibc's large allocations cost the same every round.

    By default glibc moves its mmap threshold as blocks are freed and trims the heap, so an
    activation-sized tensor is sometimes fresh pages (page faults, zeroing) and sometimes reused
    memory: timings of one kernel then come out bimodal. A fixed 32 MB threshold and no trimming
    give every candidate, native or ours, the same allocation cost. No effect off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _alternate(
    runs: dict[str, Callable[[], None]], rounds: int, min_sample: float = 0.02
) -> dict[str, float]:
    """Median time of each run, candidates interleaved in a shuffled order every round."""
    return {name: statistics.median(ts) for name, ts in _alternate_rounds(runs, rounds, min_sample).items()}


def _alternate_rounds(
    runs: dict[str, Callable[[], None]],
    rounds: int,
    min_sample: float = 0.02,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Each run's time in every round, candidates interleaved in a shuffled order every round.

    Each timed sample repeats a run enough times (the same count for every candidate) to last
    about ``min_sample`` seconds, so sub-millisecond kernels are not lost in timer jitter.
    ``sync`` (``torch.cuda.synchronize`` on a GPU) is called before and after each sample, so a
    sample is the device's time for its runs, not the host's time to queue them.
    """
    wait = sync or (lambda: None)
    fastest = math.inf
    for run in runs.values():  # warm-up: allocator, lazy inits
        run()
        wait()
        t0 = time.perf_counter()
        run()
        wait()
        fastest = min(fastest, time.perf_counter() - t0)
    inner = max(1, math.ceil(min_sample / max(fastest, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # no candidate always follows the same one (allocator and cache state)
        for name, run in order:
            wait()
            t0 = time.perf_counter()
            for _ in range(inner):
                run()
            wait()
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def round_ratios(times: dict[str, list[float]], ref: str) -> dict[str, float]:
    """Median over rounds of each candidate's time over the reference's in the same round.

    NOTE: a shared VM's speed drifts by several percent within a run; a ratio taken inside each
    round, where the candidates ran back to back, cancels the drift that separate medians keep.
    """
    return {
        name: statistics.median(t / r for t, r in zip(ts, times[ref], strict=True))
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small shape per rank, few rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 15, quick 5)")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table of the ratios")
    ap.add_argument("--no-models", action="store_true", help="skip the whole-ResNet-50 comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="compiled (inductor, fullgraph) SN / SSN dense / SSN latched against eager BatchNorm, "
        "training and eval",
    )
    ap.add_argument(
        "--shapes", nargs="+", default=None, help="shapes to run, e.g. 16x64x56x56 (default: all)"
    )
    ap.add_argument(
        "--device", default="cpu", help="device of the layers (cpu, cuda); the ResNet-50s stay on the CPU"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compiled:  # NOTE: every candidate, shape and mode is its own graph of the same forward
        torch._dynamo.config.recompile_limit = 64
    rounds = args.rounds or (5 if args.quick else 15)
    shapes = (QUICK_2D + QUICK_3D) if args.quick else (SHAPES_2D + SHAPES_3D)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    torch.manual_seed(0)
    steady = steady_allocator()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} alternating rounds, median"
        f"{', steady glibc allocator' if steady else ''}"
    )
    print(
        "bw/copy: the layer's minimum traffic over its time, as a fraction of a copy of the same tensor "
        "(eval 2, train 5 x numel x itemsize; see the docstring)"
    )
    print(f"{'shape':<22} {'mode':<6} {'layer':<16} {'ms':>8} {'ratio':>7} {'bw/copy':>7}  vs")
    table: dict[tuple[str, str, str], float] = {}  # (layer, mode, shape) -> ratio
    roof: dict[tuple[str, str, str], float] = {}  # (layer, mode, shape) -> bandwidth / copy bandwidth
    for shape in shapes:
        for train in (True, False):
            mode = "train" if train else "eval"
            rows, copy_s = measure_roof(shape, train, rounds, args.compiled, args.device)
            key = "x".join(map(str, shape))
            for name, t, ratio, ref in rows:
                roof[(name, mode, key)] = roof_fraction(t, copy_s, train)
                if name == ref:
                    continue
                print(
                    f"{str(shape):<22} {mode:<6} {name:<16} {t * 1e3:8.2f} {ratio:6.2f}x "
                    f"{roof[(name, mode, key)]:7.3f}  {ref}"
                )
                table[(name, mode, key)] = ratio
            copy_gbs = 2 * math.prod(shape) * 4 / copy_s / 1e9
            natives = ", ".join(f"{n} {roof[(n, mode, key)]:.3f}" for n, _, _, r in rows if n == r)
            print(f"{str(shape):<22} {mode:<6} roof: copy {copy_gbs:.1f} GB/s; natives' bw/copy: {natives}")
    rows = sorted({(name, mode) for name, mode, _ in table}, key=lambda r: (r[1] != "train", r[0]))
    cols = list(dict.fromkeys(shape for _, _, shape in table))
    print("\nworst ratio over shapes:")
    for name, mode in rows:
        lowest = min(roof[(name, mode, c)] for c in cols)
        print(
            f"  {name:<16} {mode:<6} {max(table[(name, mode, c)] for c in cols):5.2f}x"
            f"   (lowest bw/copy {lowest:.2f})"
        )
    if not args.no_models:
        batch, size = (2, 64) if args.quick else (8, 112)
        model_rows = measure_models(rounds, batch, size)
        print(f"\nwhole ResNet-50, batch {batch} at {size}px, ratio to torchvision's BN ResNet-50:")
        for name, mode, t, ratio in model_rows:
            print(f"  {name:<18} {mode:<6} {t * 1e3:8.1f} ms {ratio:6.2f}x")
    if args.markdown:
        print("\n| layer (vs native) | mode | " + " | ".join(cols) + " | worst |")
        print("|---|---|" + "---:|" * (len(cols) + 1))
        for name, mode in rows:
            vals = [table[(name, mode, c)] for c in cols]
            ref = (compiled_candidates if args.compiled else candidates)(2, 8)[name][1]
            cells = " | ".join(f"{v:.2f}" for v in vals)
            print(f"| {name} (vs {ref}) | {mode} | {cells} | **{max(vals):.2f}** |")
        print("\n| layer: bw / copy bw | mode | " + " | ".join(cols) + " |")
        print("|---|---|" + "---:|" * len(cols))
        for name, mode in sorted({(n, m) for n, m, _ in roof}, key=lambda r: (r[1] != "train", r[0])):
            cells = " | ".join(
                f"{roof[(name, mode, c)]:.2f}" if (name, mode, c) in roof else "-" for c in cols
            )
            print(f"| {name} | {mode} | {cells} |")
        if not args.no_models:
            print(f"\n| ResNet-50 (batch {batch}, {size}px) | train step | eval |\n|---|---:|---:|")
            by = {(n, m): r for n, m, _, r in model_rows}
            for name in dict.fromkeys(n for n, _, _, _ in model_rows):
                print(f"| {name} vs native | {by[(name, 'train')]:.2f} | {by[(name, 'eval')]:.2f} |")


if __name__ == "__main__":
    main()
