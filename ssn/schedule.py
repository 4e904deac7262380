"""The SparsestMax radius schedule (pure function; the Lightning callback lives in ``tasks``)."""

from __future__ import annotations

__all__ = ["AUTHORS_RADIUS_END", "radius_at", "ramp_end"]

# The released ImageNet script (switchablenorms/Sparse_SwitchNorm, train_imagenet.py) sets the
# radius to ``step / total_steps``: linear from 0 to 1.0 over the whole run. With three statistics
# every ratio is one-hot from sqrt(2/3) = 0.816 on, so every layer has latched by ~82% of the run
# and the last ~18% trains the latched (native-cost) network.
AUTHORS_RADIUS_END = 1.0


def radius_at(step: int, ramp_steps: int, start: float, end: float, delay: int = 0) -> float:
    """Radius in force at optimizer step ``step`` (0-based): ``start`` for ``delay`` steps, then
    linear, ``start + (end - start) * (step - delay) / ramp_steps``, held at ``end`` after the ramp.

    With ``delay=0``, ``start=0``, ``end=1`` and ``ramp_steps`` the run's steps this is the
    authors' schedule exactly (their radius at step s is s / total).
    """
    if step < delay:
        return start
    if ramp_steps <= 0:
        return end
    return start + (end - start) * min(1.0, (step - delay) / ramp_steps)


def ramp_end(start: float | None, end: float | None, ramp_fraction: float, delay_fraction: float) -> float:
    """The ramp's end radius (the authors' when ``end`` is None), after checking a schedule given as
    fractions of the run: ``0 < ramp_fraction``, ``0 <= delay_fraction``, their sum ``<= 1``, and
    ``0 <= start <= end``. What the Lightning callback and the mmengine hook both take."""
    if not (
        0.0 < ramp_fraction <= 1.0 and 0.0 <= delay_fraction < 1.0 and delay_fraction + ramp_fraction <= 1.0
    ):
        raise ValueError(
            f"need 0 < ramp_fraction <= 1, 0 <= delay_fraction and their sum <= 1, "
            f"got ramp_fraction={ramp_fraction}, delay_fraction={delay_fraction}"
        )
    stop = AUTHORS_RADIUS_END if end is None else float(end)
    if start is not None and not 0.0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= end, got start={start}, end={stop}")
    return stop
