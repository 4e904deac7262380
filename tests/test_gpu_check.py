"""benchmarks/gpu_check.py runs on the CPU (``--device cpu --quick``) and prints every section, so
the script is known to work before a GPU machine runs it; the bandwidth accounting it shares with
bench_norm."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_norm import min_traffic_bytes, roof_fraction


def test_bandwidth_accounting():
    # eval: read x + write y; train: + read dy, read x, write dx -- against a copy's read + write
    assert min_traffic_bytes((2, 3, 4, 5), train=False) == 2 * 120 * 4
    assert min_traffic_bytes((2, 3, 4, 5), train=True, itemsize=2) == 5 * 120 * 2
    assert roof_fraction(1.0, 1.0, train=False) == 1.0  # as fast as the copy, moving as many bytes
    assert roof_fraction(2.0, 1.0, train=True) == 1.25


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu():
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    sections = re.findall(r"^== (\w[\w ]*?)(?: \(|==|$)", out, flags=re.M)
    assert [s.strip() for s in sections] == ["environment", "cuda tests", "layers", "networks", "done"], (
        sections
    )
    tests = out.split("== cuda tests ==")[1].split("== layers")[0]
    if not torch.cuda.is_available():
        assert re.search(r"\d+ skipped", tests) and "failed" not in tests and "error" not in tests.lower(), (
            tests
        )
    # every layer row: a positive time, ratio and bandwidth fraction; the copy: a bandwidth in GB/s
    layer_rows = re.findall(
        r"^\(.*?\)\s+(train|eval)\s+(.+?)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+(\S+)$", out, re.M
    )
    names = {name for _, name, *_ in layer_rows}
    assert {"BatchNorm", "SN", "SSN dense", "SSN latched BN", "SSN latched IN", "SSN latched LN"} <= names, (
        names
    )
    for mode, name, ms, ratio, frac, _ in layer_rows:
        assert float(ms) > 0 and float(ratio) > 0 and 0 < float(frac) < 10, (mode, name, ms, ratio, frac)
    copies = re.findall(r"device copy\s+[\d.]+\s+([\d.]+) GB/s", out)
    assert len(copies) == 2 and all(float(c) > 0 for c in copies), copies
    # networks: ratios to BN and the peak memory of each candidate
    assert re.search(
        r"resnet_small train: BN 1\.00x, SN [\d.]+x, SSN dense [\d.]+x, SSN latched [\d.]+x", out
    )
    mem = re.findall(
        r"resnet_small (BN|SN|SSN dense|SSN latched)\s+fp32\s+([\d.]+) \(([\d.]+)x\)\s+bf16\s+([\d.]+)", out
    )
    assert {m[0] for m in mem} == {"BN", "SN", "SSN dense", "SSN latched"}, mem
    assert all(float(fp32) > 0 and float(bf16) > 0 for _, fp32, _, bf16 in mem)
    assert "cuda tests: passed or skipped" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_cuda_without_a_device():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--device cpu" in proc.stderr
