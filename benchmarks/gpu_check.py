"""The GPU check in one command: CUDA tests, layer and network benchmarks, memory and bandwidth.

On a CUDA machine (at most about 5 minutes on one GPU):

    python benchmarks/gpu_check.py                      # --device cuda
    python benchmarks/gpu_check.py --device cpu --quick # everything that runs on a CPU (CI does this)

Prints, each section headed ``== name ==``:

* ``environment``: torch, CUDA, cuDNN, the device.
* ``cuda tests``: ``pytest tests/test_cuda.py`` in a subprocess (every SN/SSN path on CUDA against
  float64 on the CPU, fused backward, channels-last, bf16/fp16 autocast, compile fullgraph, a
  training step without host synchronisation); on a machine without CUDA they report skipped.
* ``layers``: ``bench_norm.measure_roof`` on the device: each candidate's time, its ratio to its
  native reference (BN, IN or GN(1, C)), and its achieved memory bandwidth as a fraction of the
  device's. The device's bandwidth is measured in the same alternating rounds by a copy of the same
  tensor (``dst.copy_(src)``: 2 * numel * itemsize bytes over its time). A layer's bytes are its
  minimum traffic on the activation: eval reads x and writes y (2 * numel * itemsize); a training
  step (forward + backward) reads x and writes y, then reads dy and x and writes dx
  (5 * numel * itemsize); per-channel parameters and statistics are ignored (C << numel).
* ``networks``: ``bench_e2e.run_model`` on the device: train and eval step of whole networks as
  ratios to the BN network, and the peak memory of a training step (fp32 and bf16 autocast;
  ``bench_e2e.peak_bytes``: allocator events above what was live when the step began).
* ``done``: the elapsed time and the test verdict; the exit status is pytest's (0 when the tests
  pass or are all skipped).

Timings on CUDA are taken between ``torch.cuda.synchronize()`` calls. ``--quick`` shrinks
everything to one small shape, two rounds and a small batch (a run that proves the script works,
not a measurement).
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import bench_e2e  # noqa: E402
from bench_norm import measure_roof, roof_fraction, steady_allocator  # noqa: E402

# Activations of a ResNet-50 at 32 images (a layer-1 and a layer-3 map) and a 3-D ResNet: large
# enough that a copy runs at the GPU's memory bandwidth, small enough for seconds per shape.
SHAPES = [(32, 256, 56, 56), (32, 1024, 14, 14), (8, 256, 8, 28, 28)]
QUICK_SHAPES = [(2, 8, 8, 8)]
MODELS = ["resnet_small", "resnet50"]  # bench_e2e's names; resnet50 at bench_e2e's non-quick size
QUICK_EAGER = ["BN", "SN", "SSN dense", "SSN latched"]


def section(name: str) -> None:
    print(f"\n== {name} ==", flush=True)


def environment(device: torch.device) -> None:
    section("environment")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        print(
            f"device: cpu ({platform.processor() or platform.machine()}); CUDA available: "
            f"{torch.cuda.is_available()}"
        )


def cuda_tests(timeout: float) -> int:
    """pytest on tests/test_cuda.py in a subprocess (its own CUDA context and sync-debug state)."""
    section("cuda tests")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"TIMEOUT after {timeout:.0f} s")
        return 124
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    # NOTE: failures print long tracebacks; the summary and the last of them are what a reader needs
    print("\n".join(lines[-60:]))
    return proc.returncode


def layers(device: torch.device, shapes: list[tuple[int, ...]], rounds: int) -> None:
    section(f"layers (bench_norm, {device.type}, {rounds} rounds)")
    print(
        "ratio: time over the native reference's in the same round; bw/device: minimum traffic "
        "(eval 2, train 5 x numel x 4 bytes) over time, as a fraction of the copy's bandwidth"
    )
    print(f"{'shape':<22} {'mode':<6} {'layer':<16} {'ms':>8} {'ratio':>7} {'bw/device':>9}  vs")
    for shape in shapes:
        for train in (True, False):
            mode = "train" if train else "eval"
            rows, copy_s = measure_roof(shape, train, rounds, device=str(device))
            for name, t, ratio, ref in rows:
                frac = roof_fraction(t, copy_s, train)
                print(
                    f"{str(shape):<22} {mode:<6} {name:<16} {t * 1e3:8.3f} {ratio:6.2f}x {frac:9.3f}  {ref}"
                )
            gbs = 2 * math.prod(shape) * 4 / copy_s / 1e9
            print(
                f"{str(shape):<22} {mode:<6} {'device copy':<16} {copy_s * 1e3:8.3f} {'':>7} {gbs:7.1f} GB/s",
                flush=True,
            )


def networks(device: torch.device, quick: bool, rounds: int) -> None:
    section(f"networks (bench_e2e, {device.type}, {rounds} rounds): ratios to BN, peak memory")
    models = ["resnet_small"] if quick else MODELS
    for name in models:
        args = argparse.Namespace(
            # else bench_e2e's full sizes: resnet_small at the main job's batch 128, resnet50 8x112px
            quick=quick,
            batch=8 if quick else None,
            device=str(device),
            rounds=rounds,
            eager=QUICK_EAGER if quick else bench_e2e.EAGER,
            compiled=[],
            no_compile=True,
            compile_models=[],
            channels_last=False,
            no_memory=False,
        )
        rows = bench_e2e.run_model(name, args)
        bench_e2e.print_table(rows)
        print("peak memory of a training step (MiB, ratio to BN):")
        for r in rows:
            print(
                f"  {name} {r['candidate']:<14} fp32 {r['mem_fp32_mb']:8.1f} ({r['mem_fp32_ratio']:.2f}x)  "
                f"bf16 {r['mem_bf16_mb']:8.1f} ({r['mem_bf16_ratio']:.2f}x)",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument(
        "--quick", action="store_true", help="one small shape, 2 rounds, small batch (a smoke run)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 2)")
    ap.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    ap.add_argument("--test-timeout", type=float, default=240.0, help="seconds for the CUDA tests")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; --device cpu runs everything that can run on the CPU")
    device = torch.device(args.device)
    rounds = args.rounds or (2 if args.quick else 7)
    start = time.perf_counter()
    torch.manual_seed(0)
    steady_allocator()
    environment(device)
    rc = 0 if args.no_tests else cuda_tests(args.test_timeout)
    layers(device, QUICK_SHAPES if args.quick else SHAPES, rounds)
    networks(device, args.quick, rounds)
    section("done")
    verdict = (
        "skipped" if args.no_tests else ("passed or skipped" if rc == 0 else f"FAILED (pytest exit {rc})")
    )
    print(f"{time.perf_counter() - start:.0f} s; cuda tests: {verdict}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
