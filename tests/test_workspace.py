"""``ssn-bench compare --workspace``: the wandb workspace built from the report's grouping, offline.

As ``wandb-workspaces``' own tests do: the workspace model round-trips through its definition, and
saving goes through a mocked ``wandb.Api`` that receives the expected view; offline nothing is
sent. Every panel names a key the runs (or the report's run) really log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("wandb_workspaces")

import wandb
from wandb_workspaces.workspaces import internal

from tasks.cli import command
from tasks.report import compare
from tasks.workspace import (
    COMPARE_KEYS,
    RUN_KEYS,
    WORKSPACE_FILE,
    build_workspace,
    load_workspace,
    logged_keys,
    panel_keys,
    write_workspace,
)

from helpers import ROOT, run_summary, write_summary


def _runs(root: Path, lrs=(0.1,), devices: int | None = None) -> Path:
    """BN and SSN at per-device batch 2 and 32, two seeds each (and each learning rate); with
    ``devices``, that many virtual devices of that batch each."""
    for lr in lrs:
        for norm in ("bn", "ssn"):
            for bs in (2, 32):
                for seed in (0, 1):
                    s = run_summary(
                        norm,
                        bs,
                        seed,
                        0.5 + bs / 100 + seed / 50,
                        lr=lr,
                        latches=[("bn", "bn"), ("in", None)] if norm == "ssn" else None,
                    )
                    s["metrics"]["best/val/acc1"] = 0.5
                    if devices:
                        s.update(batch_size=bs * devices, global_batch_size=bs * devices)
                        s.update(virtual_devices=devices, device_batch_size=bs)
                    s["history"] = [
                        {"epoch": 0, "step": 5, "val/acc1": 0.4},
                        {"epoch": 1, "step": 10, "val/acc1": 0.5},
                    ]
                    write_summary(root, f"{norm}-b{bs}-lr{lr}-s{seed}", s)
    return root


def _panels(view: dict) -> list[dict]:
    return [p for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]


def test_workspace_groups_filters_and_panels_follow_the_report(tmp_path):
    runs = _runs(tmp_path / "runs")
    res = compare([runs], tmp_path / "report", plots=False)
    workspace, grouping = build_workspace(res, "test/acc1", title="small batch", compare_run="compare report")
    path = write_workspace(workspace, grouping, tmp_path / "report")
    doc = json.loads(path.read_text())
    view = doc["view"]
    assert path.name == WORKSPACE_FILE and view["project"] == "ssn-bench" and view["entity"] == ""
    # the runset groups by the keys that tell the report's groups apart: normalizer, then batch
    assert res["group_by"] == ["task", "dataset", "arch", "norm", "batch_size", "global_batch_size"]
    assert grouping["groupby"] == ["norm", "batch_size"] and grouping["normalizers"] == ["bn", "ssn"]
    runset = view["spec"]["section"]["runSets"][0]
    assert runset["grouping"] == [
        {"section": "config", "name": "norm.value"},
        {"section": "config", "name": "batch_size.value"},
    ]
    groups = {(r["norm"], r["batch_size"]) for r in res["records"]}
    assert groups == {(row["norm"], row["batch_size"]) for row in res["rows"]} and len(groups) == 4
    # filters: every group key's values among the compared runs, or the report's own run
    filters = workspace.runset_settings.filters
    assert (
        "Config(\"task\") == 'ImageClassifier'" in filters and "Config(\"norm\") in ['bn', 'ssn']" in filters
    )
    assert 'Config("batch_size") in [2, 32]' in filters
    assert "Metric(\"JobType\") == 'compare' and Metric(\"Name\") == 'compare report'" in filters
    # the metric against step (its validation curve) and per group, both mean ± std over the seeds
    panels = _panels(view)
    lines = [p["config"] for p in panels if p["viewType"] == "Run History Line Plot"]
    assert lines[0]["metrics"] == ["val/acc1"] and lines[0]["xAxis"] == "_step"
    assert all(c["groupAgg"] == "mean" and c["groupArea"] == "stddev" for c in lines)
    bars = [p["config"] for p in panels if p["viewType"] == "Bar Chart"]
    assert bars[0]["metrics"] == ["test/acc1"] and bars[0]["groupArea"] == "stddev"
    scatter = next(p["config"] for p in panels if p["viewType"] == "Scatter Plot")
    assert scatter["xAxis"] == "config:batch_size.value" and scatter["yAxis"] == "summary:test/acc1"
    names = [s["name"] for s in view["spec"]["section"]["panelBankConfig"]["sections"]]
    assert names == [
        "test/acc1 by group",
        "test/acc1 against per-device batch, per normalizer",
        "SSN selection per layer",
        "throughput and memory",
    ]
    # every panel names a key the runs or the report's run log
    keys = panel_keys(view)
    assert {"val/acc1", "test/acc1", "train/loss", "ssn/selection", "ssn/heatmap", "compare/table"} <= keys
    assert keys <= logged_keys(res["records"]) | set(COMPARE_KEYS)
    for key, files in RUN_KEYS.items():
        for f in files:
            assert f'"{key}"' in (ROOT / f).read_text(), (key, f)
    report_src = (ROOT / "tasks" / "report.py").read_text()
    assert all(f'"{k.split("/")[0]}/{{key}}"' in report_src or f'"{k}"' in report_src for k in COMPARE_KEYS)
    # the model round-trips through its definition
    again = load_workspace(path)
    assert again._to_model().model_dump(mode="json", by_alias=True, exclude_none=True) == view
    assert again.runset_settings.filters == filters and len(again.sections) == 4


def test_workspace_maps_config_keys_and_a_filtered_report(tmp_path):
    runs = _runs(tmp_path / "runs", lrs=(0.1, 0.2))
    res = compare([runs], tmp_path / "report", metrics=["best/val/acc1"], filters=["norm=ssn"], plots=False)
    assert "model.lr" in res["group_by"]
    workspace, grouping = build_workspace(res, "best/val/acc1")  # no report run: no compare panels
    assert grouping["wandb_config"]["model.lr"] == "lr"  # the module's hyperparameter in the wandb config
    assert grouping["groupby"] == ["batch_size", "model.lr"] and grouping["normalizers"] == ["ssn"]
    assert grouping["wandb_metric"] == "val/acc1" and any("best/val/acc1" in n for n in grouping["notes"])
    assert "Config(\"norm\") == 'ssn'" in workspace.runset_settings.filters
    assert 'Config("lr") in [0.1, 0.2]' in workspace.runset_settings.filters
    assert "JobType" not in workspace.runset_settings.filters
    view = workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)
    assert panel_keys(view) <= logged_keys(res["records"]) and not panel_keys(view) & set(COMPARE_KEYS)


def test_workspace_plots_against_the_per_device_batch_of_virtual_devices(tmp_path):
    runs = _runs(tmp_path / "runs", devices=8)
    res = compare([runs], tmp_path / "report", plots=False)
    workspace, grouping = build_workspace(res, "test/acc1", compare_run="compare report")
    assert grouping["groupby"] == ["norm", "device_batch_size"]  # the loader's batch splits nothing more
    assert 'Config("device_batch_size") in [2, 32]' in workspace.runset_settings.filters
    assert 'Config("batch_size") in [16, 256]' in workspace.runset_settings.filters
    panels = _panels(workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True))
    scatter = next(p["config"] for p in panels if p["viewType"] == "Scatter Plot")
    assert scatter["xAxis"] == "config:device_batch_size.value"


class _ServiceApi:
    """What ``wandb.Api()`` hands ``wandb-workspaces`` (wandb >= 0.28: ``api._service_api``)."""

    app_url = "https://wandb.example/"

    def __init__(self, sent: list) -> None:
        self.sent = sent

    def execute_graphql(self, query, variables=None):
        assert "upsertView" in query
        self.sent.append(variables)
        return {"upsertView": {"view": {"name": "nw-abc123-v", "id": "VIEW1"}, "inserted": True}}


class _Api:
    def __init__(self, sent: list) -> None:
        self._service_api = _ServiceApi(sent)
        self.default_entity = "me"


def test_offline_writes_the_definition_and_sends_nothing_online_saves_it(tmp_path, monkeypatch, capsys):
    runs = _runs(tmp_path / "runs")

    def no_network(*args, **kwargs):
        raise AssertionError("offline: no wandb API call")

    monkeypatch.setattr(wandb, "Api", no_network)
    monkeypatch.setattr(internal, "upsert_view2", no_network)
    logged = []
    monkeypatch.setattr(
        "tasks.report.log_to_wandb",
        lambda result, **kw: (
            logged.append(kw) or {"entity": "team", "project": kw["project"], "name": kw["name"]}
        ),
    )
    out = tmp_path / "report"
    assert (
        command(["compare", str(runs), "--out", str(out), "--no-plots", "--workspace", "--wandb", "offline"])
        == 0
    )
    text = capsys.readouterr().out
    path = out / WORKSPACE_FILE
    assert f"python -m tasks.workspace {path}" in text and "workspace saved" not in text
    assert logged[0]["mode"] == "offline" and logged[0]["name"] == "compare report"
    doc = json.loads(path.read_text())
    assert doc["view"]["entity"] == "team" and doc["grouping"]["compare_run"] == "compare report"
    # --wandb off: the definition alone, without the report's run (or its panels)
    assert command(["compare", str(runs), "--out", str(tmp_path / "r2"), "--no-plots", "--workspace"]) == 0
    assert len(logged) == 1 and "compare/table" not in panel_keys(
        json.loads((tmp_path / "r2" / WORKSPACE_FILE).read_text())["view"]
    )
    # online: saved through wandb.Api, which receives the view of the definition written
    monkeypatch.undo()
    sent: list = []
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: _Api(sent))
    monkeypatch.setattr(
        "tasks.report.log_to_wandb",
        lambda result, **kw: {"entity": "team", "project": kw["project"], "name": kw["name"]},
    )
    out3 = tmp_path / "r3"
    assert (
        command(
            [
                "compare",
                str(runs),
                "--out",
                str(out3),
                "--no-plots",
                "--workspace",
                "--wandb",
                "online",
                "--title",
                "sb",
            ]
        )
        == 0
    )
    assert "workspace saved: https://wandb.example/team/ssn-bench?nw=abc123" in capsys.readouterr().out
    (variables,) = sent
    written = json.loads((out3 / WORKSPACE_FILE).read_text())["view"]
    assert variables["entityName"] == "team" and variables["projectName"] == "ssn-bench"
    assert variables["displayName"] == "compare: sb" and json.loads(variables["spec"]) == written["spec"]
    # later, from the file: python -m tasks.workspace DEFINITION --entity E
    from tasks.workspace import main

    assert main([str(out3 / WORKSPACE_FILE), "--entity", "other"]) == 0
    assert sent[1]["entityName"] == "other" and json.loads(sent[1]["spec"]) == written["spec"]
