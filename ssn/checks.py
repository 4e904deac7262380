"""Range checks of numeric options, with messages that name the option and the accepted range."""

from __future__ import annotations

import math

__all__ = ["check_range"]


def check_range(name: str, value: object, interval: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a number inside ``interval``.

    Args:
        name: the option, as the user spells it (``"backbone_lr_scale"``).
        value: its value; ``None`` passes (optional options check only when given).
        interval: written as in mathematics, ``"[0, 1)"``, ``"(0, inf)"``: brackets closed,
            parentheses open. NaN is outside every interval, infinity outside any open at ``inf``.
    """
    if value is None:
        return
    lo, hi = (float(s) for s in interval[1:-1].split(","))
    inside = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not math.isnan(value)
        and (lo <= value if interval[0] == "[" else lo < value)
        and (value <= hi if interval[-1] == "]" else value < hi)
    )
    if not inside:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
