"""The fault-injection script's short variant (benchmarks/fault_injection.py --short) in CI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT, needs_fmnist


@pytest.mark.slow
@needs_fmnist
@pytest.mark.timeout(600)
def test_fault_injection_short_variant_survives_every_fault():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/fault_injection.py"), "--short"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "[survived] kill-save" in proc.stdout and "[survived] corrupt-idx" in proc.stdout
    assert "2/2 faults handled" in proc.stdout
