"""``NormRatioMonitor``: every SN/SSN layer's ratios at each validation and the final selection.

Everything goes to wandb when a WandbLogger is attached, and always to local files under
``<log dir>/ssn/`` (``ratios.jsonl``, ``heatmap-epoch{N}.png``, ``selection.json``,
``selection.txt``), so nothing depends on wandb being reachable.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

import ssn
from ssn.io import write_text_atomic

from ..summary import COLUMNS, layer_ratios

__all__ = ["NormRatioMonitor", "heatmap", "selection_table"]


def _choice(row: dict[str, Any], kind: str) -> str:
    values = [row[f"{kind}_{s}"] for s in ssn.STATS]
    best = ssn.STATS[ssn.selected_stat(row[f"{kind}_latch"], values)]
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
        + "; var: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts["var"].items()))
    )
    return "\n".join(lines)


def heatmap(rows: list[dict[str, Any]], title: str) -> Any:
    """Figure: layers x (IN, LN, BN), for the mean and the variance ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 0.25 * len(rows) + 1.5), sharey=True)
    for ax, kind in zip(axes, ("mean", "var"), strict=True):
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
        self._out = Path(dirpath or "ssn")  # resolved in setup (the trainer's log dir)
        self._run = ""  # tells apart runs appending to ratios.jsonl, set in setup

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
            wb.experiment.log(
                {"ssn/ratios": table, "ssn/heatmap": wandb.Image(fig), "trainer/global_step": step}
            )
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

            wb.experiment.summary["ssn/latched_layers"] = sum(
                bool(r["mean_latch"] and r["var_latch"]) for r in rows
            )
            wb.experiment.log(
                {"ssn/selection": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])}
            )
