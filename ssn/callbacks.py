"""Lightning callbacks (the only module of ``ssn`` that imports Lightning)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from .functional import max_radius
from .norm import STATS
from .surgery import set_radius

__all__ = ["RadiusSchedule", "radius_at"]


def radius_at(step: int, ramp_steps: int, start: float, end: float, delay: int = 0) -> float:
    """Radius in force for optimizer step ``step`` (0-based): ``start`` for ``delay`` steps, then
    a linear ramp that reaches ``end`` at step ``delay + ramp_steps - 1``, so a ramp over the
    whole run ends at full radius on the last step (where every SSN layer latches)."""
    if step < delay:
        return start
    if ramp_steps <= 0:
        return end
    return start + (end - start) * min(1.0, (step - delay + 1) / ramp_steps)


class RadiusSchedule(pl.Callback):
    """Ramp the SparsestMax radius of every SSN layer per optimizer step.

    Args:
        end: final radius; default ``sqrt(2/3)``, the radius at which every ratio over the three
            statistics is one-hot.
        start: radius at step 0 (default 0: SSN starts as sparsemax).
        ramp_fraction: fraction of the run's optimizer steps over which to ramp (default: all).
        delay_fraction: fraction of the steps spent at ``start`` before the ramp, letting the
            ratios learn as sparsemax first (default 0). ``delay + ramp`` must not exceed 1.

    The ramp length is fixed when training starts (from ``trainer.estimated_stepping_batches``)
    and saved in checkpoints with the callback, so a resumed run continues the same ramp from its
    global step even if the trainer's length is computed differently on resume.
    """

    def __init__(
        self, end: float | None = None, start: float = 0.0, ramp_fraction: float = 1.0, delay_fraction: float = 0.0
    ) -> None:
        if not 0.0 < ramp_fraction <= 1.0 or not 0.0 <= delay_fraction < 1.0 or delay_fraction + ramp_fraction > 1.0:
            raise ValueError(
                f"need 0 < ramp_fraction <= 1, 0 <= delay_fraction and their sum <= 1, "
                f"got ramp_fraction={ramp_fraction}, delay_fraction={delay_fraction}"
            )
        self.end = max_radius(len(STATS)) if end is None else float(end)
        if not 0.0 <= start <= self.end:
            raise ValueError(f"need 0 <= start <= end, got start={start}, end={self.end}")
        self.start = float(start)
        self.ramp_fraction, self.delay_fraction = ramp_fraction, delay_fraction
        self.ramp_steps: int | None = None
        self.delay_steps = 0
        self.radius = self.start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ramp_steps is None:  # not restored from a checkpoint
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("RadiusSchedule needs a finite run: set max_epochs or max_steps")
            self.ramp_steps = max(1, round(total * self.ramp_fraction))
            self.delay_steps = round(total * self.delay_fraction)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.ramp_steps is not None
        self.radius = radius_at(trainer.global_step, self.ramp_steps, self.start, self.end, self.delay_steps)
        set_radius(pl_module, self.radius)
        pl_module.log("ssn/radius", self.radius, on_step=True, on_epoch=False)

    _STATE = ("ramp_steps", "delay_steps", "start", "end", "ramp_fraction", "delay_fraction", "radius")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, state_dict[k])
