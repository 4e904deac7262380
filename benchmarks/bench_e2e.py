"""End-to-end benchmark: whole networks with each normaliser, eager and compiled, as ratios to BN.

For ResNet-50 (classification), the 3-D ResNet (slow_r50 layout, video), DeepLabV3 (mmseg,
segmentation) and the main job's small ResNet (Fashion-MNIST, batch 128), times a training step
(forward, backward, SGD step) and an eval step (forward under no_grad), and measures the peak
memory of a training step in float32 and under bfloat16 autocast, for:

    BN, GN, SN, SSN dense, SSN latched (BN), SSN exported (ssn.export_norm)   eager
    BN, SSN dense, SSN latched                                                 torch.compile

Every figure is a ratio to the eager BN network measured in the same run: candidates timed
alternately, the median over rounds of the ratio within each round (bench_norm.round_ratios).
Memory: the peak, during one training step, of the bytes the PyTorch allocator holds above what
was live when the step began (parameters, optimizer state and input excluded), summed from the
allocation events of torch.profiler(profile_memory=True) on the input's device; the same method
on CPU and GPU. ``--device cuda`` runs the networks on a GPU (timings synchronised).

    python benchmarks/bench_e2e.py                          # ResNet-50, eager and compiled
    python benchmarks/bench_e2e.py --models resnet50 video deeplabv3 --no-compile
    python benchmarks/bench_e2e.py --quick                  # small inputs, few rounds
    # + channels-last copies:
    python benchmarks/bench_e2e.py --models resnet_small --no-compile --channels-last
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_norm import _alternate_rounds, device_sync, round_ratios, steady_allocator

import ssn

EAGER = ["BN", "GN", "SN", "SSN dense", "SSN latched", "SSN exported"]
COMPILED = ["BN", "SSN dense", "SSN latched"]


# ---------------------------------------------------------------------------------- networks
class _Seg(nn.Module):
    """mmseg's EncoderDecoder as a plain module: backbone, ASPP head and auxiliary FCN head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.extract_feat(x)
        return self.model.decode_head(feats).mean((2, 3)) + 0.4 * self.model.auxiliary_head(feats).mean(
            (2, 3)
        )


def build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, int]:
    """The BN network, an input batch and its number of classes."""
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        batch, size = (2, 64) if quick else (8, 112)
        return torchvision.models.resnet50(), torch.randn(batch, 3, size, size), 1000
    if name == "resnet_small":  # the main job's network and batch (make demo)
        from tasks.classification import SmallResNet

        return SmallResNet(), torch.randn(32 if quick else 128, 1, 28, 28), 10
    if name == "video":
        from tasks.video import build_slow_resnet

        batch, frames, size = (1, 4, 64) if quick else (2, 8, 96)
        net = build_slow_resnet(
            "slow_r50", 400, 3, nn.BatchNorm3d, frames=frames, crop_size=size, dropout=0.0
        )
        return net, torch.randn(batch, 3, frames, size, size), 400
    if name == "deeplabv3":
        from ssn.integrations import bridge_mmcv_lite

        bridge_mmcv_lite()
        from mmengine.config import ConfigDict
        from mmengine.registry import init_default_scope
        from mmseg.registry import MODELS

        from tasks.segmentation import deeplabv3_config

        init_default_scope("mmseg")
        cfg = deeplabv3_config(50, 19, dict(type="BN", requires_grad=True))
        batch, size = (2, 64) if quick else (2, 128)  # NOTE: BN refuses the 1x1 image pool at batch 1
        return _Seg(MODELS.build(ConfigDict(cfg))), torch.randn(batch, 3, size, size), 19
    raise KeyError(f"unknown model {name!r}")


def variants(native: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The network with each normaliser; SSN dense at a radius and ratios that stay dense."""
    out: dict[str, nn.Module] = {}
    for name in names:
        if name == "BN":
            out[name] = copy.deepcopy(native)
        elif name == "GN":  # 32 groups (ResNets), 8 for the small ResNet's 16 channels (its config)
            widths = [
                m.num_features for m in native.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            ]
            groups = min(32, min(widths) // 2)
            out[name] = ssn.convert_norm(copy.deepcopy(native), "gn", groups=groups)
        elif name in ("SN", "IN", "LN"):  # (IN and LN: on request, --eager IN LN)
            out[name] = ssn.convert_norm(copy.deepcopy(native), name.lower())
        elif name == "SSN dense":
            net = ssn.convert_norm(copy.deepcopy(native), "ssn", radius=0.3)
            with torch.no_grad():
                for _, m in ssn.switch_norms(net):
                    m.mean_logits.copy_(torch.tensor([0.3, 0.2, 0.5]))
                    m.var_logits.copy_(torch.tensor([0.2, 0.4, 0.3]))
            out[name] = net
        elif name in ("SSN latched", "SSN exported"):
            net = ssn.convert_norm(copy.deepcopy(native), "ssn")
            for _, m in ssn.switch_norms(net):
                m.latch("bn", "bn")
            out[name] = ssn.export_norm(net) if name == "SSN exported" else net
    return out


# ---------------------------------------------------------------------------------- steps
def train_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: bool = False, zero_grad: bool = True
) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def run() -> None:
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()

    return run


def eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def peak_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: bool) -> int:
    """Peak allocator bytes above the start during one training step (after a warm-up step); the
    gradients are freed before the profiled step, so they count as the step allocates them."""
    from torch.profiler import ProfilerActivity, profile

    run = train_step(model, x, target, autocast, zero_grad=False)
    run()
    model.zero_grad(set_to_none=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        run()
    model.zero_grad(set_to_none=True)
    # NOTE: on a GPU the profiler also records the host's allocations; only the input's device counts
    device = x.device.type.upper()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == device
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------- main
def run_model(name: str, args: argparse.Namespace) -> list[dict[str, object]]:
    device = torch.device(getattr(args, "device", "cpu"))  # (callers' Namespaces may predate --device)
    native, x, classes = build(name, args.quick)
    if getattr(args, "batch", None):  # a smaller batch than the model's own (gpu_check --quick)
        x = x[: args.batch]
    native, x = native.to(device), x.to(device)
    target = torch.randint(0, classes, (x.shape[0],), device=device)
    eager = {
        n: net.to(device)
        for n, net in variants(native, ["BN"] + [n for n in args.eager if n != "BN"]).items()
    }
    nets: dict[str, nn.Module] = dict(eager)
    compiled_names = [] if args.no_compile or name not in args.compile_models else args.compiled
    for cname in compiled_names:
        nets[f"{cname} compiled"] = torch.compile(variants(native, [cname])[cname].to(device))
    inputs = {n: x for n in nets}
    if args.channels_last:  # the eager candidates again, weights and input channels-last
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        for n in list(eager):
            nets[f"{n} channels_last"] = copy.deepcopy(eager[n])._apply(
                lambda t: t.contiguous(memory_format=fmt) if t.dim() == x.dim() else t
            )
            inputs[f"{n} channels_last"] = x.contiguous(memory_format=fmt)
    rows = {n: {"model": name, "candidate": n} for n in nets}
    for mode in ("train", "eval"):
        runs: dict[str, Callable[[], None]] = {}
        for n, net in nets.items():
            t0 = time.perf_counter()
            runs[n] = train_step(net, inputs[n], target) if mode == "train" else eval_step(net, inputs[n])
            runs[n]()  # warm-up (and compilation)
            if n.endswith("compiled"):
                print(f"  {name} {n} {mode}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        per_round = _alternate_rounds(runs, args.rounds, sync=device_sync(device))
        ratios = round_ratios(per_round, "BN")
        print(f"  {name} {mode}: " + ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()), flush=True)
        for n, ts in per_round.items():
            rows[n][f"{mode}_ms"] = statistics.median(ts) * 1e3
            rows[n][f"{mode}_ratio"] = ratios[n]
    if not args.no_memory:
        for precision, autocast in (("fp32", False), ("bf16", True)):
            base = None
            for n, net in nets.items():
                if n.endswith("compiled"):
                    continue  # NOTE: inductor's buffer reuse is its own; the eager layers are what we own
                peak = peak_bytes(net, inputs[n], target, autocast)
                base = peak if n == "BN" else base
                rows[n][f"mem_{precision}_mb"] = peak / 2**20
                rows[n][f"mem_{precision}_ratio"] = peak / base
                print(
                    f"  {name} peak memory {precision}: {n} {peak / 2**20:.0f} MiB ({peak / base:.2f}x)",
                    flush=True,
                )
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        nargs="+",
        default=["resnet50"],
        choices=["resnet50", "video", "deeplabv3", "resnet_small"],
    )
    ap.add_argument("--compile-models", nargs="+", default=["resnet50"], help="models also timed compiled")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--compiled", nargs="*", default=COMPILED, help=f"compiled candidates (default: {COMPILED})"
    )
    ap.add_argument(
        "--eager", nargs="*", default=EAGER, help=f"eager candidates besides BN (default: {EAGER})"
    )
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--channels-last", action="store_true", help="also time channels-last copies of the eager candidates"
    )
    ap.add_argument("--quick", action="store_true", help="small inputs, 3 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="device of the networks (cpu, cuda)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each model this many times (fresh networks each time); the table gives the "
        "median ratio over the repeats and their range",
    )
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    steady_allocator()
    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
        f"{args.rounds} alternating rounds"
    )
    rows = []
    for name in args.models:
        runs = [run_model(name, args) for _ in range(args.repeat)]
        rows += combine(runs)
        print_table([r for r in rows if r["model"] == name])


def combine(runs: list[list[dict[str, object]]]) -> list[dict[str, object]]:
    """Per candidate: the median of each ratio over repeated runs, and its range (min, max)."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for cands in zip(*runs, strict=True):
        row = dict(cands[0])
        for key in list(row):
            values = [c[key] for c in cands]
            if key.endswith(("_ratio", "_ms", "_mb")):
                row[key] = statistics.median(values)  # type: ignore[arg-type]
                if key.endswith("_ratio"):
                    row[key.replace("_ratio", "_range")] = (min(values), max(values))  # type: ignore[type-var]
        out.append(row)
    return out


def print_table(rows: list[dict[str, object]]) -> None:
    cols = [
        ("train_ratio", "train step"),
        ("eval_ratio", "eval step"),
        ("mem_fp32_ratio", "peak mem fp32"),
        ("mem_bf16_ratio", "peak mem bf16"),
    ]
    print(f"\n| {rows[0]['model']} | " + " | ".join(c for _, c in cols) + " | train ms | eval ms |")
    print("|---|" + "---:|" * (len(cols) + 2))
    for r in rows:
        cells = [f"{r[k]:.2f}x" if k in r else "-" for k, _ in cols]
        for i, (k, _) in enumerate(cols):
            lo_hi = r.get(k.replace("_ratio", "_range"))
            if lo_hi is not None and r["candidate"] != "BN":
                cells[i] += f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})"
        print(f"| {r['candidate']} | " + " | ".join(cells) + f" | {r['train_ms']:.0f} | {r['eval_ms']:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
