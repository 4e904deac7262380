"""The run-summary format: ``<default_root_dir>/summary.json``, one file per run.

Written by ``tasks.callbacks.RunSummary`` when fitting ends (``status: fitted``), completed by the
CLI after its test and export (:func:`complete_summary`, ``status: complete``), read by the sweep
(is a run done?) and by the report (``ssn-bench compare``). Its fields:

* the run's identity (``NormTask.run_info``: task, dataset, arch, norm, batch sizes, seed...), at
  the top level and again under ``run_info``;
* measurements (:data:`MEASURED`): status, steps, epochs, times, throughput, peak memory, device;
* ``metrics`` (finite floats by their logged names, ``best/val/...`` included), ``history`` (one
  entry per validation), ``hparams``, ``config`` (the CLI's resolved ``config.yaml``);
* ``selection``: one row per SN/SSN layer (:data:`COLUMNS`, :func:`layer_ratios`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import ssn
from ssn import STATS  # the statistics in ratio order: in, ln, bn
from ssn.io import write_text_atomic

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "COLUMNS",
    "MEASURED",
    "NUMERIC",
    "SUMMARY_FILE",
    "better",
    "complete_summary",
    "finite_metrics",
    "layer_ratios",
    "malformed",
    "peak_memory",
    "read_summary",
    "summary_status",
    "update_summary",
]

SUMMARY_FILE = "summary.json"

# One ``selection`` row: a layer's mean and variance ratios (IN, LN, BN) and its latches.
COLUMNS = ["layer", "mean_in", "mean_ln", "mean_bn", "var_in", "var_ln", "var_bn", "mean_latch", "var_latch"]

# What a summary's top-level scalars measure rather than define (summaries without ``run_info``).
MEASURED = frozenset(
    {
        "status",
        "global_step",
        "epochs",
        "ckpt_path",
        "fit_seconds",
        "train_seconds",
        "train_samples",
        "throughput",
        "peak_memory_mb",
        "peak_memory_kind",
        "device",
    }
)
# Top-level fields that must be numbers when present.
NUMERIC = ("throughput", "peak_memory_mb", "batch_size", "global_batch_size", "global_step")


@torch.no_grad()
def layer_ratios(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One row per SN/SSN layer: its mean and variance ratios (IN, LN, BN) and latches."""
    rows = []
    for name, m in ssn.switch_norms(model):
        mr, vr = (r.float().cpu().tolist() for r in m.ratios())
        ml, vl = m.latched
        rows.append(dict(zip(COLUMNS, [name, *mr, *vr, ml, vl], strict=True)))
    return rows


def _number(v: Any) -> float | None:
    try:
        x = float(v.item() if isinstance(v, torch.Tensor) else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return x if math.isfinite(x) else None


def finite_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Finite scalar metrics as plain floats (dashboards' ``a/b`` names kept)."""
    out = {k: _number(v) for k, v in values.items()}
    return {k: v for k, v in sorted(out.items()) if v is not None}


def better(name: str) -> Callable[..., Any]:
    """``min`` for losses, ``max`` for everything else (accuracy, IoU)."""
    return min if "loss" in name.split("/")[-1] else max


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what it measures: the CUDA allocator's peak on a GPU, else the
    process's peak resident set (``ru_maxrss``, all of the process: Python, libraries, data)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss"  # bytes on macOS, KiB on Linux


def read_summary(path: str | Path) -> dict[str, Any]:
    """A run's ``summary.json`` (``path``: the file or the run's folder)."""
    path = Path(path)
    return json.loads((path / SUMMARY_FILE if path.is_dir() else path).read_text())


def update_summary(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the summary at ``path`` (``metrics`` merged key by key) atomically."""
    summary = read_summary(path)
    for k, v in fields.items():
        summary[k] = {**summary.get(k, {}), **v} if k == "metrics" else v
    write_text_atomic(path, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def summary_status(run_dir: Path) -> str | None:
    """The ``status`` of the run's summary, or None (no summary, or one that cannot be read)."""
    try:
        status = read_summary(run_dir / SUMMARY_FILE).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def complete_summary(trainer: pl.Trainer, results: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Mark the run's summary ``complete`` after the CLI's post-fit steps, with their test metrics
    (``results``: name -> ``trainer.test`` output; ``model``'s keep their names, others are
    prefixed, e.g. ``exported/test/acc1``). Rank zero writes; no summary, nothing to do."""
    path = Path(trainer.default_root_dir) / SUMMARY_FILE
    if not trainer.is_global_zero or not path.is_file():
        return
    metrics: dict[str, float] = {}
    for name, res in (results or {}).items():
        for k, v in finite_metrics(res[0] if res else {}).items():
            metrics[k if name == "model" else f"{name}/{k}"] = v
    update_summary(path, metrics=metrics, status="complete")


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def malformed(s: Any) -> str | None:
    """What is wrong with a parsed ``summary.json`` for the report, or None."""
    if not isinstance(s, dict):
        return f"not a JSON object but a {type(s).__name__}"
    for key in ("metrics", "config", "run_info", "hparams"):
        if s.get(key) is not None and not isinstance(s[key], dict):
            return f"{key!r} is a {type(s[key]).__name__}, not an object"
    for k, v in (s.get("metrics") or {}).items():
        if not is_number(v):
            return f"metric {k!r} is {v!r}, not a finite number"
    for k in NUMERIC:
        if s.get(k) is not None and not is_number(s[k]):
            return f"{k!r} is {s[k]!r}, not a finite number"
    if s.get("status") is not None and not isinstance(s["status"], str):
        return f"'status' is {s['status']!r}, not a string"
    sel = s.get("selection")
    if sel is not None and not isinstance(sel, list):
        return f"'selection' is a {type(sel).__name__}, not a list"
    for row in sel or []:
        values = (
            [row.get(f"{k}_{st}") for k in ("mean", "var") for st in STATS] if isinstance(row, dict) else []
        )
        latches = [row.get(f"{k}_latch") for k in ("mean", "var")] if isinstance(row, dict) else []
        if (
            not values
            or not all(map(is_number, values))
            or not isinstance(row.get("layer"), str)
            or any(x not in (None, *STATS) for x in latches)
        ):
            return f"a 'selection' row is not a layer's ratios and latches: {str(row)[:80]}"
    return None
