"""``RadiusSchedule``: the SparsestMax radius of every SSN layer, ramped per optimizer step, and
the latches decided once per step."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

import ssn
from ssn.schedule import radius_at, ramp_end

__all__ = ["RadiusSchedule"]


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
        self,
        end: float | None = None,
        start: float | None = None,
        ramp_fraction: float = 1.0,
        delay_fraction: float = 0.0,
    ) -> None:
        self.end = ramp_end(start, end, ramp_fraction, delay_fraction)
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
