"""Checkpoints that a kill cannot destroy.

Lightning's default ``TorchCheckpointIO`` writes through fsspec, which stages the file in the
temporary directory and moves it into place; with ``TMPDIR`` on another filesystem (``/dev/shm``,
node-local scratch) the move is a copy, and a kill during it leaves a truncated ``last.ckpt``.
``AtomicCheckpointIO`` writes beside the target instead (same filesystem), fsyncs, renames over it
and fsyncs the folder: a kill leaves the previous checkpoint or the new one, never a half file.
Leftovers of a killed save are removed by the next save of the same file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssn.io import save_atomic

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-folder write, fsync and rename (local paths; remote URLs keep
    Lightning's own writer)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a killed earlier save of this file
            stale.unlink(missing_ok=True)
        save_atomic(checkpoint, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:  # the rename itself survives a power cut only once the folder is synced
            os.fsync(fd)
        finally:
            os.close(fd)
