"""Checkpoints survive a SIGKILL during the save (a second process is killed mid-write, with its
temporary directory on another filesystem)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from tasks.checkpointing import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from tasks.checkpointing import AtomicCheckpointIO
    path, ready = Path(sys.argv[1]), Path(sys.argv[2])
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save
    def slow_save(obj, f):  # writes half of the new checkpoint, then hangs: the kill lands mid-write
        import io as _io
        buf = _io.BytesIO(); real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        ready.touch(); time.sleep(120)
    torch.save = slow_save
    io.save_checkpoint({"step": 2, "w": torch.full((1000,), 2.0)}, path)
""")


def test_kill_during_save_keeps_the_previous_checkpoint_and_leaves_no_orphans(tmp_path):
    path, ready = tmp_path / "ckpt" / "last.ckpt", tmp_path / "ready"
    env = {**os.environ, "TMPDIR": "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(ready)], env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the child died before the save"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    kept = torch.load(path, weights_only=True)  # the previous checkpoint, whole
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert list(path.parent.glob(".last.ckpt.*.tmp"))  # the killed save's partial file, beside it

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no orphan left
