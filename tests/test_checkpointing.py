"""Checkpoints survive a SIGKILL during the save: the fault-injection script's ``kill-save`` trial
(a second process killed mid-write, with its temporary directory on another filesystem)."""

from __future__ import annotations

import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from fault_injection import trial_kill_save


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint_and_leaves_no_orphans(tmp_path):
    # ok: the previous checkpoint (step 1, its tensor intact) loads after the kill, the killed
    # save's partial file lay beside it, and the next save leaves only last.ckpt (step 3)
    ok, what = trial_kill_save(tmp_path)
    assert ok, what
