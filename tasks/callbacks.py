"""Lightning callbacks: the SSN radius schedule, and the normalizer dashboards (per-layer ratios
over training, heatmaps, the final selection).

Everything goes to wandb when a WandbLogger is attached, and always to local files under
``<log dir>/ssn/`` (``ratios.jsonl``, ``heatmap-epoch{N}.png``, ``selection.json``,
``selection.txt``), so nothing depends on wandb being reachable.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

import ssn
from ssn.io import write_text_atomic
from ssn.schedule import AUTHORS_RADIUS_END, radius_at

__all__ = [
    "NormRatioMonitor", "RadiusSchedule", "RunSummary", "complete_summary", "layer_ratios", "read_summary", "selection_table",
    "update_summary",
]


class RadiusSchedule(pl.Callback):
    """Ramp the SparsestMax radius of every SSN layer per optimizer step.

    Args:
        end: final radius; default 1.0, the authors' (their ImageNet script ramps linearly from 0
            to 1.0 over the run). Every ratio over three statistics is one-hot from sqrt(2/3) =
            0.816 on, so with the default ramp every layer has latched by ~82% of the steps and the
            rest of the run trains the latched network at the native layers' cost. ``end =
            sqrt(2/3)`` latches only on the last ramp step.
        start: radius at step 0; default: the module's ``initial_radius`` (a fine-tuned model's
            inherited radius, see ``NormTask``) or 0 (SSN starts as sparsemax).
        ramp_fraction: fraction of the run's optimizer steps over which to ramp (default: all).
        delay_fraction: fraction of the steps spent at ``start`` before the ramp, letting the
            ratios learn as sparsemax first (default 0). ``delay + ramp`` must not exceed 1.

    The ramp length is fixed when training starts (from ``trainer.estimated_stepping_batches``)
    and saved in checkpoints with the callback, so a resumed run continues the same ramp from its
    global step even if the trainer's length is computed differently on resume.
    """

    def __init__(
        self, end: float | None = None, start: float | None = None, ramp_fraction: float = 1.0,
        delay_fraction: float = 0.0,
    ) -> None:
        if not 0.0 < ramp_fraction <= 1.0 or not 0.0 <= delay_fraction < 1.0 or delay_fraction + ramp_fraction > 1.0:
            raise ValueError(
                f"need 0 < ramp_fraction <= 1, 0 <= delay_fraction and their sum <= 1, "
                f"got ramp_fraction={ramp_fraction}, delay_fraction={delay_fraction}"
            )
        self.end = AUTHORS_RADIUS_END if end is None else float(end)
        if start is not None and not 0.0 <= start <= self.end:
            raise ValueError(f"need 0 <= start <= end, got start={start}, end={self.end}")
        self.start_from_module = start is None
        self.start = 0.0 if start is None else float(start)
        self.ramp_fraction, self.delay_fraction = ramp_fraction, delay_fraction
        self.ramp_steps: int | None = None
        self.delay_steps = 0
        self.radius = self.start
        self._latched_at: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ramp_steps is None:  # not restored from a checkpoint
            if self.start_from_module:
                self.start = min(float(getattr(pl_module, "initial_radius", 0.0) or 0.0), self.end)
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("RadiusSchedule needs a finite run: set max_epochs or max_steps")
            self.ramp_steps = max(1, round(total * self.ramp_fraction))
            self.delay_steps = round(total * self.delay_fraction)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.ramp_steps is None:
            raise RuntimeError("RadiusSchedule: the ramp is set in on_train_start, which did not run")
        self.radius = radius_at(trainer.global_step, self.ramp_steps, self.start, self.end, self.delay_steps)
        ssn.set_radius(pl_module, self.radius)
        # NOTE: the latches are decided here, once per step for every layer, rather than by each
        # layer inside its forward (no host sync there); repeated micro-batches of one step (gradient
        # accumulation) see the same logits and radius, so the call is made once per global step.
        if self._latched_at != trainer.global_step:
            ssn.update_latches(pl_module)
            self._latched_at = trainer.global_step
        pl_module.log("ssn/radius", self.radius, on_step=True, on_epoch=False)

    _STATE = ("ramp_steps", "delay_steps", "start", "end", "ramp_fraction", "delay_fraction", "radius")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, state_dict[k])

COLUMNS = ["layer", "mean_in", "mean_ln", "mean_bn", "var_in", "var_ln", "var_bn", "mean_latch", "var_latch"]


@torch.no_grad()
def layer_ratios(model: torch.nn.Module) -> list[dict[str, Any]]:
    """One row per SN/SSN layer: its mean and variance ratios (IN, LN, BN) and latches."""
    rows = []
    for name, m in ssn.switch_norms(model):
        mr, vr = (r.float().cpu().tolist() for r in m.ratios())
        ml, vl = m.latched
        rows.append(dict(zip(COLUMNS, [name, *mr, *vr, ml, vl])))
    return rows


def _choice(row: dict[str, Any], kind: str) -> str:
    values = [row[f"{kind}_{s}"] for s in ssn.STATS]
    best = ssn.STATS[max(range(3), key=values.__getitem__)]
    return best.upper() if row[f"{kind}_latch"] else f"({best})"


def selection_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of each layer's selected statistics (parenthesised: not latched yet)."""
    if not rows:
        return "no SN/SSN layers"
    width = max(len(r["layer"]) for r in rows)
    lines = [f"{'layer':<{width}}  mean  var   mean ratios (IN LN BN)   var ratios (IN LN BN)"]
    for r in rows:
        mr = " ".join(f"{r[f'mean_{s}']:.2f}" for s in ssn.STATS)
        vr = " ".join(f"{r[f'var_{s}']:.2f}" for s in ssn.STATS)
        lines.append(f"{r['layer']:<{width}}  {_choice(r, 'mean'):<5} {_choice(r, 'var'):<5} {mr:<24} {vr}")
    counts = {k: Counter(_choice(r, k).strip("()") for r in rows) for k in ("mean", "var")}
    latched = sum(bool(r["mean_latch"] and r["var_latch"]) for r in rows)
    lines.append(
        f"{latched}/{len(rows)} layers latched; mean: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts["mean"].items()))
        + "; var: " + ", ".join(f"{k} {v}" for k, v in sorted(counts["var"].items()))
    )
    return "\n".join(lines)


def heatmap(rows: list[dict[str, Any]], title: str) -> Any:
    """Figure: layers x (IN, LN, BN), for the mean and the variance ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 0.25 * len(rows) + 1.5), sharey=True)
    for ax, kind in zip(axes, ("mean", "var")):
        data = [[r[f"{kind}_{s}"] for s in ssn.STATS] for r in rows]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(3), [s.upper() for s in ssn.STATS])
        ax.set_title(kind)
    axes[0].set_yticks(range(len(rows)), [r["layer"] for r in rows], fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(title)
    return fig


class NormRatioMonitor(pl.Callback):
    """Log every SN/SSN layer's ratios at each validation, and the final selection.

    Args:
        dirpath: local folder for the figures and tables (default ``<trainer.log_dir>/ssn``).
        print_selection: print the per-layer selection table when fitting ends.
    """

    def __init__(self, dirpath: str | None = None, print_selection: bool = True) -> None:
        self.dirpath = dirpath
        self.print_selection = print_selection
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # NOTE: trainer.log_dir is a collective under DDP: resolve it here, on every rank, never
        # inside the rank-zero-only hooks below (that deadlocks).
        self._out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "ssn")
        self._run = time.strftime("%Y%m%d-%H%M%S")  # tells apart runs appending to ratios.jsonl

    def _dir(self, trainer: pl.Trainer) -> Path:
        self._out.mkdir(parents=True, exist_ok=True)
        return self._out

    @staticmethod
    def _wandb(trainer: pl.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        rows = layer_ratios(pl_module)
        if not rows:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        for r in rows:
            self.history.append({"step": step, "epoch": epoch, **r})
        out = self._dir(trainer)
        with open(out / "ratios.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"run": self._run, "step": step, "epoch": epoch, **r}) + "\n")
        fig = heatmap(rows, f"epoch {epoch}, step {step}")
        fig.savefig(out / f"heatmap-epoch{epoch:03d}.png", dpi=80, bbox_inches="tight")
        wb = self._wandb(trainer)
        if wb is not None:
            import wandb

            cols = ["step", "epoch", *COLUMNS]
            table = wandb.Table(columns=cols, data=[[h[c] for c in cols] for h in self.history])
            wb.experiment.log({"ssn/ratios": table, "ssn/heatmap": wandb.Image(fig), "trainer/global_step": step})
        import matplotlib.pyplot as plt

        plt.close(fig)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = layer_ratios(pl_module)
        if not rows:
            return
        table = selection_table(rows)
        out = self._dir(trainer)
        write_text_atomic(out / "selection.txt", table + "\n")
        write_text_atomic(out / "selection.json", json.dumps(rows, indent=1))
        if self.print_selection:
            print("\nSelected statistics per layer (UPPER: latched; (lower): current argmax):\n" + table)
        wb = self._wandb(trainer)
        if wb is not None:
            import wandb

            wb.experiment.summary["ssn/latched_layers"] = sum(bool(r["mean_latch"] and r["var_latch"]) for r in rows)
            wb.experiment.log({"ssn/selection": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])})


# ------------------------------------------------------------------------------ run summary
SUMMARY_FILE = "summary.json"


def _number(v: Any) -> float | None:
    try:
        x = float(v.item() if isinstance(v, torch.Tensor) else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return x if math.isfinite(x) else None


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """Finite scalar metrics as plain floats (dashboards' ``a/b`` names kept)."""
    out = {k: _number(v) for k, v in values.items()}
    return {k: v for k, v in sorted(out.items()) if v is not None}


def _better(name: str) -> Any:
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


class RunSummary(pl.Callback):
    """Write ``<default_root_dir>/summary.json`` when fitting ends: the machine-readable record of
    the run that ``ssn-bench compare`` reads (wandb's API cannot read offline runs).

    It holds the run's identity (``NormTask.run_info``: task, dataset, arch, normalizer, per-device
    and global batch, seed...; at the top level and again under ``run_info``), the resolved config
    (the CLI's ``config.yaml`` when there is one), the hyperparameters, the final metrics and the
    best of each validation metric over the validations (``best/val/...``: max, min for losses),
    the validation history (one entry per validation while fitting, read once it has ended,
    whichever hook logged it), the training throughput (samples/s over all devices, measured over
    training batches only: data loading and the step, excluding validation and each fit's first
    batch), the peak memory (:func:`peak_memory`) and the final per-layer selection
    (:func:`layer_ratios`).

    ``status`` is ``fitted``; the CLI adds the test metrics after fit and sets it to ``complete``
    (a sweep re-runs anything not complete). The history and the throughput counters are saved in
    checkpoints, so a resumed run's summary covers the whole run.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.train_samples = 0
        self._mark: float | None = None
        self._first = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # NOTE: trainer.log_dir is a collective under DDP: resolved here, on every rank.
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._path = Path(trainer.default_root_dir) / SUMMARY_FILE
        self._started = time.time()
        self._first = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = None  # validation time is not training time

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # NOTE: read here, not in on_validation_epoch_end: Lightning calls the callbacks' epoch-end
        # hooks before the module's, where a task may log its scores (segmentation's mIoU), so the
        # metrics there are the previous validation's. on_validation_end comes after every
        # epoch-end hook and after the epoch's metrics are reduced (no logging is allowed in it),
        # and before ModelCheckpoint's (Lightning runs checkpoint callbacks last), so a checkpoint
        # saved at this validation already holds it in the history.
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            values = _metrics({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")})
            if values:
                self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **values})
        self._mark = time.perf_counter()  # training resumes (mid-epoch validation) from here

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._mark is not None and not self._first:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            n = len(x) if hasattr(x, "__len__") else getattr(trainer.datamodule, "batch_size", 0) or 0
            self.train_seconds += now - self._mark
            self.train_samples += n * trainer.world_size
        self._first = False
        self._mark = now

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "train_seconds": self.train_seconds, "train_samples": self.train_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.train_seconds, self.train_samples = state_dict["train_seconds"], state_dict["train_samples"]

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = _metrics(trainer.callback_metrics)
        if self.history:  # a resumed run with nothing left to train validated nothing this time
            metrics = {**{k: v for k, v in self.history[-1].items() if k not in ("epoch", "step")}, **metrics}
        keys = {k for h in self.history for k in h if k not in ("epoch", "step")}
        for k in sorted(keys):
            values = [h[k] for h in self.history if k in h]
            metrics[f"best/{k}"] = _better(k)(values)
        memory, memory_kind = peak_memory(pl_module.device)
        config = None
        config_file = self._log_dir / "config.yaml"
        if config_file.is_file():
            import yaml

            config = yaml.safe_load(config_file.read_text())
        info = pl_module.run_info() if hasattr(pl_module, "run_info") else {}
        return {
            **info,
            "status": "fitted",
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "ckpt_path": trainer.ckpt_path,
            "fit_seconds": time.time() - self._started,
            "train_seconds": self.train_seconds,
            "train_samples": self.train_samples,
            "throughput": self.train_samples / self.train_seconds if self.train_seconds > 0 else None,
            "peak_memory_mb": memory,
            "peak_memory_kind": memory_kind,
            "device": str(pl_module.device),
            "metrics": metrics,
            "history": self.history,
            "selection": layer_ratios(pl_module),
            "hparams": json.loads(json.dumps(dict(pl_module.hparams), default=str)),
            "config": config,
            # NOTE: the identity's keys again, apart from the measurements beside them at the top
            # level, so compare knows which top-level fields tell experiments apart.
            "run_info": json.loads(json.dumps(info, default=str)),
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        summary = self.summary(trainer, pl_module)
        if trainer.is_global_zero:
            write_text_atomic(self._path, json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")


def complete_summary(trainer: pl.Trainer, results: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Mark the run's summary ``complete`` after the CLI's post-fit steps, with their test metrics
    (``results``: name -> ``trainer.test`` output; ``model``'s keep their names, others are
    prefixed, e.g. ``exported/test/acc1``). Rank zero writes; no summary, nothing to do."""
    path = Path(trainer.default_root_dir) / SUMMARY_FILE
    if not trainer.is_global_zero or not path.is_file():
        return
    metrics: dict[str, float] = {}
    for name, res in (results or {}).items():
        for k, v in _metrics(res[0] if res else {}).items():
            metrics[k if name == "model" else f"{name}/{k}"] = v
    update_summary(path, metrics=metrics, status="complete")
