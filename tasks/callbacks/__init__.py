"""Lightning callbacks, one concern per module (the tasks add them: ``NormTask.configure_callbacks``).

* :mod:`.radius_schedule`: ``RadiusSchedule``, the SSN radius ramp and the per-step latches.
* :mod:`.ratio_monitor`: ``NormRatioMonitor``, per-layer ratios, heatmaps and the final selection.
* :mod:`.run_summary`: ``RunSummary``, the run's ``summary.json`` (format: :mod:`tasks.summary`).

The classes are re-exported here: YAML names them ``tasks.callbacks.RadiusSchedule`` etc.
"""

from ..summary import layer_ratios
from .radius_schedule import RadiusSchedule
from .ratio_monitor import NormRatioMonitor, heatmap, selection_table
from .run_summary import RunSummary

__all__ = ["NormRatioMonitor", "RadiusSchedule", "RunSummary", "heatmap", "layer_ratios", "selection_table"]
