"""The ``ssn-bench compare`` report as a wandb workspace, built from code (``wandb-workspaces``).

The workspace is built from the report's own grouping (:func:`tasks.report.compare`: groups that
differ only by their seed): its runset keeps the compared runs (a filter on each group key's
values) and groups them by the keys that tell the groups apart (normalizer, per-device batch...),
so every panel shows one line or bar per report group with the seeds' spread. Its sections:

* the chosen metric against step per group (mean ± std over the seeds: the validation curve of a
  ``test/`` metric), ``train/loss`` likewise, and the final metric per group;
* the final metric against the per-device batch, per normalizer (a scatter of the runs, a
  parallel-coordinates plot normalizer -> batch -> metric, and the report's own plot);
* the SSN selection per layer: each run's ``ssn/selection`` table and ``ssn/heatmap``, the layers
  latched, and the report's selection plot;
* throughput and memory: each run's ``summary/throughput`` and ``summary/peak_memory_mb`` per group,
  and the report's table (``compare/table``) when the report logged one.

Offline (the default) nothing is sent: :func:`write_workspace` writes the definition (the
workspace's wandb view, as ``wandb-workspaces`` serialises it) to ``workspace.json`` in the report
folder; ``python -m tasks.workspace REPORT/workspace.json [--entity E]`` saves it later, online
(:func:`save_workspace`). ``ssn-bench compare ... --workspace --wandb online`` saves it at once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssn import NORM_ORDER

from .report import FIGURES

__all__ = [
    "COMPARE_KEYS",
    "RUN_KEYS",
    "WORKSPACE_FILE",
    "build_workspace",
    "load_workspace",
    "logged_keys",
    "panel_keys",
    "save_workspace",
    "wandb_config_key",
    "wandb_metric",
    "write_workspace",
]

WORKSPACE_FILE = "workspace.json"

# Keys the runs log to wandb whatever their metric, and where (tests/test_workspace.py checks each
# file still logs it). The metrics themselves come from the summaries (``metrics``, ``history``).
RUN_KEYS = {
    "train/loss": ("tasks/classification.py", "tasks/segmentation.py", "tasks/video.py"),
    "ssn/selection": ("tasks/callbacks/ratio_monitor.py",),  # SN/SSN runs: a table, when fitting ends
    "ssn/heatmap": ("tasks/callbacks/ratio_monitor.py",),  # an image at each validation
    "ssn/latched_layers": ("tasks/callbacks/ratio_monitor.py",),  # a summary value
    "summary/throughput": ("tasks/callbacks/run_summary.py",),  # summary values, when fitting ends
    "summary/peak_memory_mb": ("tasks/callbacks/run_summary.py",),
}
# What the report's own run logs (``compare --wandb``, :func:`tasks.report.log_to_wandb`).
COMPARE_KEYS = ("compare/table", *(f"compare/{name}" for name in FIGURES))
SSN_KEYS = ("ssn/selection", "ssn/heatmap", "ssn/latched_layers")


def _ws() -> tuple[Any, Any, Any]:
    """The package's modules (``pip install wandb-workspaces``, the ``workspace`` extra)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "the wandb workspace needs `wandb-workspaces`: pip install 'ssn-bench[workspace]'"
        ) from e
    return ws, wr, expr


def wandb_config_key(key: str, record: dict[str, Any]) -> str | None:
    """The run's wandb config key for a report key, or None when the runs do not log it.

    The runs log their identity (``NormTask.run_info``: task, norm, batch_size...) and the
    module's hyperparameters (``model.lr`` -> ``lr``) to the wandb config; other config values
    (``data.*``, ``trainer.*``) are not in it."""
    if "." not in key:
        return key if key in record.get("_identity", ()) else None
    section, _, rest = key.partition(".")
    return rest if section == "model" and rest != "class_path" else None


def wandb_metric(metric: str) -> tuple[str, str]:
    """The wandb key of a report metric and a note when it is not the same value: ``best/val/x``
    (computed by the summary) is shown as ``val/x`` (wandb's last value); ``exported/test/x`` (the
    exported program's test) as ``test/x``, which that test logs again."""
    if metric.startswith("best/"):
        key = metric[len("best/") :]
        return key, f"{metric} is computed by the summary, not logged: wandb shows {key} (its last value)"
    if metric.startswith("exported/"):
        key = metric[len("exported/") :]
        return key, f"{metric} is logged by the exported program's test as {key}"
    return metric, ""


def curve_key(metric: str, records: list[dict[str, Any]]) -> str:
    """The key to plot against step for a metric: its validation counterpart when the runs log one
    (``test/acc1`` -> ``val/acc1``), else the metric."""
    key = wandb_metric(metric)[0]
    val = "val/" + key[len("test/") :] if key.startswith("test/") else key
    return val if val in logged_keys(records) else key


def logged_keys(records: list[dict[str, Any]]) -> set[str]:
    """The keys the runs log to wandb: their metrics (less the summary's own ``best/`` and
    ``exported/``), their validation history's keys, :data:`RUN_KEYS` (the SSN ones for runs with
    SN/SSN layers)."""
    keys = {"train/loss", "summary/throughput", "summary/peak_memory_mb"}
    for r in records:
        keys |= {k for k in r.get("_metrics", ()) if not k.startswith(("best/", "exported/"))}
        keys |= {k for h in r.get("history") or () for k in h if k not in ("epoch", "step")}
        if r.get("selection"):
            keys |= set(SSN_KEYS)
    return keys


def _filter_value(v: Any) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def _sort(v: Any) -> tuple:
    if isinstance(v, str) and v in NORM_ORDER:
        return (0, NORM_ORDER.index(v), "")
    return (1, 0, str(v))


def build_workspace(
    result: dict[str, Any],
    metric: str,
    *,
    project: str = "ssn-bench",
    entity: str = "",
    title: str = "",
    name: str | None = None,
    compare_run: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The workspace of a :func:`tasks.report.compare` result and what it was built from.

    ``metric``: the report's first metric; ``title``: the report's. ``compare_run``: the display
    name of the report's own wandb run (``compare --wandb``), kept in the runset beside the
    compared runs so its table and plots show. Returns (the ``wandb_workspaces`` Workspace, the
    grouping: the report's group keys, their wandb config keys, the keys the workspace groups by,
    the normalizers, the metric keys, the notes)."""
    ws, wr, expr = _ws()
    records: list[dict[str, Any]] = result["records"]
    group_by: list[str] = list(result["group_by"])
    notes: list[str] = []
    mapped = {k: wandb_config_key(k, records[0]) for k in group_by}
    unmapped = [k for k, v in mapped.items() if v is None]
    if unmapped:
        notes.append(
            f"not in the runs' wandb config, so neither grouped nor filtered on: {', '.join(unmapped)}"
        )
    # Group by the keys that split the runs, in the report's order, each only if it splits them
    # further (global_batch_size beside batch_size on one device does not): the report's groups.
    groupby: list[str] = []
    seen: set[tuple] = {()}
    for k in group_by:
        if mapped[k] is None:
            continue
        split = {
            tuple(json.dumps(r.get(x), sort_keys=True, default=str) for x in (*groupby, k)) for r in records
        }
        if len(split) > len(seen):
            groupby.append(k)
            seen = split
    # Filters: each mapped group key's values among the compared runs (the report's --filter too)
    filters = []
    for k in group_by:
        values = sorted({r.get(k) for r in records if _filter_value(r.get(k))}, key=_sort)
        if mapped[k] is None or not values:
            continue
        cfg = expr.Config(mapped[k])
        filters.append(cfg == values[0] if len(values) == 1 else cfg.isin(values))
    runs_filter: Any = expr.And(*filters) if len(filters) > 1 else filters[0] if filters else None
    if compare_run and runs_filter is not None:
        report_run = expr.And(expr.Metric("JobType") == "compare", expr.Metric("Name") == compare_run)
        runs_filter = expr.Or(runs_filter, report_run)
    key, note = wandb_metric(metric)
    if note:
        notes.append(note)
    curve = curve_key(metric, records)
    norms = sorted({str(r.get("norm")) for r in records if r.get("norm") is not None}, key=_sort)
    grouped = dict(groupby_aggfunc="mean", groupby_rangefunc="stddev")
    spread = "mean ± std over the seeds of each group"
    about = "\n".join(
        [
            f"## {title or 'Comparison'}: {metric}",
            f"{len(records)} runs in {len(result['rows'])} groups. {result['grouping']}",
            f"Runs grouped by {', '.join(groupby) or 'nothing'}; lines and bars: {spread}.",
            *(f"- {n}" for n in notes),
        ]
    )
    sections = [
        ws.Section(
            name=f"{metric} by group",
            is_open=True,
            panels=[
                wr.MarkdownPanel(markdown=about),
                wr.LinePlot(title=f"{curve} against step ({spread})", x="Step", y=[curve], **grouped),
                wr.BarPlot(title=f"final {key} per group ({spread})", metrics=[key], **grouped),
                wr.LinePlot(
                    title=f"train/loss against step ({spread})", x="Step", y=["train/loss"], **grouped
                ),
            ],
        ),
    ]
    against_batch = []
    # the per-device batch (the loader's batch over the virtual devices) where the runs record it
    batch = next((k for k in ("device_batch_size", "batch_size") if k in groupby), None)
    if batch is not None:
        against_batch = [
            wr.ScatterPlot(
                title=f"final {key} against per-device batch (runs; colour: group)",
                x=wr.Config(batch),
                y=wr.SummaryMetric(key),
                log_x=True,
            ),
            wr.ParallelCoordinatesPlot(
                title=f"normalizer -> per-device batch -> final {key}",
                columns=[
                    wr.ParallelCoordinatesPlotColumn(metric=wr.Config(mapped["norm"] or "norm")),
                    wr.ParallelCoordinatesPlotColumn(metric=wr.Config(batch), log=True),
                    wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(key)),
                ],
            ),
        ]
    if compare_run:
        against_batch.append(
            wr.MediaBrowser(
                title=f"the report: {metric} against per-device batch, per normalizer",
                media_keys=["compare/metric_vs_batch"],
            )
        )
    if against_batch:
        sections.append(
            ws.Section(
                name=f"{key} against per-device batch, per normalizer", is_open=True, panels=against_batch
            )
        )
    if any(r.get("selection") for r in records):
        panels = [
            wr.WeavePanelSummaryTable(table_name="ssn/selection"),
            wr.MediaBrowser(
                title="ratios per layer (IN, LN, BN) at each validation",
                media_keys=["ssn/heatmap"],
                gallery_axis="run",
            ),
            wr.BarPlot(title="layers latched (mean and variance)", metrics=["ssn/latched_layers"], **grouped),
        ]
        if compare_run:
            panels.append(
                wr.MediaBrowser(
                    title="the report: selection per layer, every SSN run", media_keys=["compare/selection"]
                )
            )
            panels.append(
                wr.MediaBrowser(
                    title="the report: SSN's choices latched to IN, LN, BN against per-device batch",
                    media_keys=["compare/selection_vs_batch"],
                )
            )
        sections.append(ws.Section(name="SSN selection per layer", is_open=True, panels=panels))
    panels = [
        wr.BarPlot(
            title="training samples/s per group (mean ± std)", metrics=["summary/throughput"], **grouped
        ),
        wr.BarPlot(
            title="peak memory (MB) per group (mean ± std)", metrics=["summary/peak_memory_mb"], **grouped
        ),
        wr.MarkdownPanel(
            markdown="samples/s: training throughput over all devices (training batches only); "
            "peak memory: the CUDA allocator's peak, or the process RSS on a CPU."
        ),
    ]
    if compare_run:
        panels.insert(0, wr.WeavePanelSummaryTable(table_name="compare/table"))
    sections.append(ws.Section(name="throughput and memory", is_open=True, panels=panels))
    workspace = ws.Workspace(
        entity=entity,
        project=project,
        name=name or f"compare: {title or metric}",
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=max(10, len(records) + 1)),
        runset_settings=ws.RunsetSettings(
            groupby=[expr.Config(mapped[k]) for k in groupby],
            filters=runs_filter if runs_filter is not None else "",
        ),
    )
    grouping = {
        "group_by": group_by,
        "wandb_config": mapped,
        "groupby": groupby,
        "metric": metric,
        "wandb_metric": key,
        "curve": curve,
        "normalizers": norms,
        "compare_run": compare_run,
        "notes": notes,
    }
    return workspace, grouping


def panel_keys(view: dict[str, Any]) -> set[str]:
    """Every metric, media and table key the panels of a view definition name."""
    keys: set[str] = set()
    for section in view["spec"]["section"]["panelBankConfig"]["sections"]:
        for p in section["panels"]:
            c = p.get("config", {})
            keys |= set(c.get("metrics") or ()) | set(c.get("mediaKeys") or ())
            for axis in ("yAxis", "xAxis"):
                if str(c.get(axis, "")).startswith("summary:"):
                    keys.add(c[axis].split(":", 1)[1])
            for col in c.get("columns") or ():
                if str(col.get("accessor", "")).startswith("summary:"):
                    keys.add(col["accessor"].split(":", 1)[1])
            if p.get("viewType") == "Weave":
                keys |= _weave_keys(c)
    return keys


def _weave_keys(obj: Any) -> set[str]:
    """The ``runs.summary[KEY]`` a Weave table panel picks."""
    if isinstance(obj, dict):
        if obj.get("nodeType") == "const" and obj.get("type") == "string" and isinstance(obj.get("val"), str):
            return {obj["val"]}
        return set().union(*(_weave_keys(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_weave_keys(v) for v in obj)) if obj else set()
    return set()


def write_workspace(workspace: Any, grouping: dict[str, Any], out: str | Path) -> Path:
    """Write the workspace's definition to ``out/workspace.json``: the wandb view it saves
    (``wandb-workspaces``' model, by its aliases) and the report grouping it was built from."""
    from importlib.metadata import version

    from ssn.io import write_text_atomic

    path = Path(out) / WORKSPACE_FILE
    doc = {
        "about": "A wandb workspace of this comparison (ssn-bench compare --workspace); save it online with "
        f"`python -m tasks.workspace {path} [--entity ENTITY]`.",
        "wandb_workspaces": version("wandb-workspaces"),
        "grouping": grouping,
        "view": workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    write_text_atomic(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return path


def load_workspace(path: str | Path) -> Any:
    """The Workspace of a definition written by :func:`write_workspace` (no network)."""
    ws, _, _ = _ws()
    from wandb_workspaces.workspaces import internal

    doc = json.loads(Path(path).read_text())
    return ws.Workspace._from_model(internal.View.model_validate(doc["view"]))


def save_workspace(workspace: Any, *, entity: str | None = None, project: str | None = None) -> str:
    """Save a workspace (or a definition file) to wandb, online; returns its URL. ``entity``
    default: the workspace's, else the API key's default entity."""
    if isinstance(workspace, (str, Path)):
        workspace = load_workspace(workspace)
    if entity or not workspace.entity:
        import wandb

        workspace.entity = entity or wandb.Api().default_entity
    if project:
        workspace.project = project
    workspace.save()
    return str(workspace.url)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tasks.workspace",
        description="Save a workspace definition (compare --workspace) to wandb, online.",
    )
    p.add_argument("definition", help=f"the report's {WORKSPACE_FILE}")
    p.add_argument(
        "--entity", default=None, help="wandb entity (default: the definition's, else your default)"
    )
    p.add_argument("--project", default=None, help="wandb project (default: the definition's)")
    ns = p.parse_args(argv)
    print(f"workspace saved: {save_workspace(ns.definition, entity=ns.entity, project=ns.project)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
