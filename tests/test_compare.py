"""ssn-bench sweep and compare: the grid, SLURM/wandb files, resuming after a killed run, the run
summary, and the report (table, CSV, plots) on runs with known values."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.compare import build_grid, command, compare, load_records, run_status

ROOT = Path(__file__).resolve().parents[1]
FMNIST_SSN = "configs/fashion_mnist/resnet_small_ssn_fashionmnist-28.yaml"
DIGITS = "configs/digits/resnet_small_ssn_digits-28.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def test_grid_swaps_per_norm_configs_and_names_groups_and_tags(tmp_path):
    runs = build_grid([FMNIST_SSN], norms=["bn", "gn", "ssn"], batch_sizes=[2, 8], seeds=[0, 1],
                      grid=["model.init_args.lr=0.1,0.2"], sets=["trainer.max_epochs=1"], extra=["--export=false"],
                      out=tmp_path / "sw")
    assert len(runs) == 3 * 2 * 2 * 2 and [r.index for r in runs] == list(range(24))
    gn = next(r for r in runs if r.norm == "gn")
    assert "configs/fashion_mnist/resnet_small_gn_fashionmnist-28.yaml" in gn.args  # carries GN's groups
    assert not any(a.startswith("--model.init_args.norm=") for a in gn.args)
    r = runs[0]
    assert r.name == "resnet_small_fashionmnist-28-bn-b2-lr0.1-s0" and r.group == "resnet_small_fashionmnist-28-bn-b2-lr0.1"
    assert f"--trainer.default_root_dir={tmp_path / 'sw' / r.name}" in r.args
    assert f"--trainer.logger.init_args.group={r.group}" in r.args and "--trainer.logger.init_args.job_type=bn" in r.args
    assert "--trainer.logger.init_args.tags=[sw, resnet_small_fashionmnist-28, bn, batch2]" in r.args
    assert r.args[-4:] == ["--data.init_args.batch_size=2", "--seed_everything=0", "--model.init_args.lr=0.1",
                           "--export=false"]
    # no per-norm sibling file: the normalizer is overridden instead
    d = build_grid([DIGITS], norms=["bn"], out=tmp_path / "d")[0]
    assert "--model.init_args.norm=bn" in d.args and d.name == "resnet_small_digits-28-bn"
    assert run_status(d.dir) == "new"


def test_sweep_writes_slurm_array_and_wandb_sweep_and_dry_runs(tmp_path, capsys):
    out, script, wsweep = tmp_path / "sw", tmp_path / "job.sh", tmp_path / "sweep.yaml"
    args = ["sweep", "--task", FMNIST_SSN, "--norms", "bn", "sn", "ssn", "--batch-sizes", "2", "32", "--seeds", "0", "1",
            "--out", str(out), "--set", "trainer.max_epochs=1"]
    assert command([*args, "--slurm", str(script), "--slurm-option=--gres=gpu:1", "--wandb-sweep", str(wsweep),
                    "--jobs", "4", "--", "--export=false"]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-11%4\n" in text and "#SBATCH --gres=gpu:1\n" in text
    assert '--index "$SLURM_ARRAY_TASK_ID" -- --export=false' in text and " sweep --out " in text
    assert not list(out.glob("*/"))  # nothing ran
    spec = yaml.safe_load(wsweep.read_text())
    assert spec["method"] == "grid" and spec["parameters"]["index"]["values"] == list(range(12))
    assert spec["project"] == "ssn-bench" and "${args}" in spec["command"] and spec["command"][-2:] == ["--", "--export=false"]
    grid = json.loads((out / "grid.json").read_text())
    assert [g["name"] for g in grid][:2] == ["resnet_small_fashionmnist-28-bn-b2-s0", "resnet_small_fashionmnist-28-bn-b2-s1"]
    capsys.readouterr()
    assert command([*args, "--dry-run", "--index", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"5\t{grid[5]['name']}\tnew\t") and "fit --config" in lines[0]


def test_run_status_tells_complete_running_interrupted_and_new(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    assert run_status(run) == "new"
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert run_status(run) == "interrupted"
    (run / "run.pid").write_text(f"{os.getpid()}\n")  # alive: another sweep is running it
    assert run_status(run) == "running"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.pid").write_text(f"{dead.pid}\n")  # its sweep was killed with it
    assert run_status(run) == "interrupted"
    (run / "summary.json").write_text(json.dumps({"status": "fitted"}))  # fit ended, the test did not
    assert run_status(run) == "interrupted"
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert run_status(run) == "complete"


def _summary(norm: str, bs: int, seed: int, acc: float, *, lr: float = 0.1, latches=None) -> dict:
    selection = [{"layer": f"net.l{i}", "mean_in": 0.0, "mean_ln": 0.0, "mean_bn": 1.0, "var_in": 0.0, "var_ln": 0.0,
                  "var_bn": 1.0, "mean_latch": m, "var_latch": v} for i, (m, v) in enumerate(latches or [])]
    return {
        "task": "ImageClassifier", "dataset": "FashionMNISTDataModule", "arch": "resnet_small", "norm": norm,
        "batch_size": bs, "global_batch_size": bs, "seed": seed, "status": "complete", "global_step": 10,
        "throughput": 100.0 * bs, "peak_memory_mb": 500.0 + seed, "peak_memory_kind": "cpu_max_rss",
        "metrics": {"test/acc1": acc, "val/acc1": acc - 0.01}, "selection": selection,
        "config": {"model": {"class_path": "tasks.ImageClassifier", "init_args": {"lr": lr, "norm": norm}}},
    }


def _write(root: Path, name: str, summary: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(summary))


def test_report_on_runs_with_known_values(tmp_path):
    runs = tmp_path / "runs"
    accs = {("bn", 2): [0.50, 0.60, 0.70], ("bn", 32): [0.90, 0.92], ("ssn", 2): [0.80, 0.84, 0.82], ("ssn", 32): [0.91]}
    ssn_latches = {2: [("in", "in"), ("ln", "bn"), ("bn", "bn")], 32: [("bn", "bn"), ("bn", None), ("ln", "bn")]}
    for (norm, bs), values in accs.items():
        for seed, acc in enumerate(values):
            _write(runs, f"{norm}-b{bs}-s{seed}", _summary(norm, bs, seed, acc, latches=ssn_latches[bs] if norm == "ssn" else None))
    res = compare([runs], tmp_path / "report", metrics=["test/acc1"], title="known")
    rows = {(r["norm"], r["batch_size"]): r for r in res["rows"]}
    assert list(rows) == [("bn", 2), ("bn", 32), ("ssn", 2), ("ssn", 32)]  # normalizer order, then batch
    assert rows["bn", 2]["test/acc1 mean"] == pytest.approx(0.6) and rows["bn", 2]["test/acc1 std"] == pytest.approx(0.1)
    assert rows["bn", 32]["test/acc1 std"] == pytest.approx(statistics.stdev([0.90, 0.92]))
    assert rows["ssn", 32]["test/acc1 std"] is None and rows["ssn", 32]["n"] == 1  # one seed: no std
    assert rows["bn", 2]["seeds"] == [0, 1, 2] and rows["bn", 2]["peak_memory_mb"] == 502.0
    assert rows["bn", 2]["throughput"] == 200.0 and rows["bn", 2]["latched_in"] is None  # no SN/SSN layers
    # batch 2: choices IN,IN, LN,BN, BN,BN -> IN 2/6, LN 1/6, BN 3/6; batch 32: one var not latched
    assert [rows["ssn", 2][f"latched_{s}"] for s in ("in", "ln", "bn")] == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    assert [rows["ssn", 32][f"latched_{s}"] for s in ("in", "ln", "bn")] == pytest.approx([0, 1 / 6, 4 / 6])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| ImageClassifier | FashionMNISTDataModule | resnet_small | bn | 2 | 2 | 0,1,2 | 0.6000 ± 0.1000 | 200 | 502 | — |" in md
    assert "| ssn | 32 | 32 | 0 | 0.9100 | 3200 | 500 | 0.00 / 0.17 / 0.67 |" in md
    assert "mean IN 1, LN 1, BN 1; var IN 1, LN 0, BN 2" in md  # the SSN selection of batch 2, seed 0
    with open(tmp_path / "report" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and float(table[0]["test/acc1 mean"]) == pytest.approx(0.6)
    assert table[3]["test/acc1 std"] == "" and table[0]["runs"] == "bn-b2-s0;bn-b2-s1;bn-b2-s2"
    assert len(list(csv.DictReader(open(tmp_path / "report" / "runs.csv")))) == 9
    for name in ("metric_vs_batch.png", "selection.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
        import matplotlib.image

        assert matplotlib.image.imread(tmp_path / "report" / name).ndim == 3
    # filters and grouping by any config field
    only = compare([runs], tmp_path / "r2", filters=["norm=ssn", "batch_size!=32"], plots=False)
    assert [(r["norm"], r["batch_size"], r["n"]) for r in only["rows"]] == [("ssn", 2, 3)]
    by_lr = compare([runs], tmp_path / "r3", group_by=["model.lr"], filters=["model.norm=bn"], plots=False)
    assert len(by_lr["rows"]) == 1 and by_lr["rows"][0]["n"] == 5
    assert load_records([runs / "bn-b2-s0" / "summary.json"])[0]["model.lr"] == 0.1
    with pytest.raises(ValueError, match="no run summary"):
        compare([runs], tmp_path / "r4", filters=["norm=gn"])
    # the command line: prints the table, writes the files
    assert command(["compare", str(runs), "--out", str(tmp_path / "r5"), "--no-plots", "--filter", "norm=bn"]) == 0
    assert "| bn | 32 | 32 | 0,1 | 0.9100 ± 0.0141 |" in (tmp_path / "r5" / "report.md").read_text()


@pytest.mark.timeout(400)
def test_sweep_survives_a_killed_run_and_resumes_it_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    """Real runs (digits, 4 steps per epoch, 3 epochs), each its own process: the SSN run is
    SIGKILLed at step 6 (after the epoch-1 checkpoint); the BN run after it still runs. The sweep
    run again skips BN and resumes SSN from last.ckpt to step 12; compare then reports exactly the
    runs' own values."""
    base = tmp_path / "trainer.yaml"  # the base trainer with a CSV logger (quicker to start than wandb)
    cfg = yaml.safe_load((ROOT / "configs/base/trainer.yaml").read_text())
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
    base.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sw"
    sweep = ["sweep", "--config", str(base), "--task", DIGITS, "--norms", "ssn", "bn", "--out", str(out), "--threads", "1",
             "--set", "model.init_args.pretrained=null", "--set", "trainer.max_epochs=3",
             "--set", "trainer.limit_train_batches=4", "--set", "trainer.limit_val_batches=1",
             "--set", "trainer.num_sanity_val_steps=0", "--set", "trainer.enable_progress_bar=false",
             "--set", "trainer.enable_model_summary=false", "--", "--export=false"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    kill = ["--trainer.callbacks+=sweep_fault.KillAt", "--trainer.callbacks.step=6", "--trainer.callbacks.norm=ssn"]
    assert command([*sweep, *kill]) == 1  # one run failed ...
    first = capsys.readouterr().out
    ssn_dir, bn_dir = out / "resnet_small_digits-28-ssn", out / "resnet_small_digits-28-bn"
    assert "1 done, 1 failed" in first and "FAILED (exit -9)" in first
    assert run_status(bn_dir) == "complete"  # ... the other ran
    assert run_status(ssn_dir) == "interrupted" and not (ssn_dir / "summary.json").exists()
    bn_before = (bn_dir / "summary.json").read_bytes()

    assert command(sweep) == 0, (ssn_dir / "run.log").read_text()[-3000:]
    second = capsys.readouterr().out
    assert "resnet_small_digits-28-bn: complete, skipped" in second
    assert "resnet_small_digits-28-ssn: resumed from last.ckpt" in second
    assert (bn_dir / "summary.json").read_bytes() == bn_before
    s = json.loads((ssn_dir / "summary.json").read_text())
    assert s["status"] == "complete" and s["global_step"] == 12 and s["ckpt_path"].endswith("last.ckpt")
    assert [h["epoch"] for h in s["history"]] == [0, 1, 2]  # the validations before the kill are kept
    assert s["norm"] == "ssn" and s["batch_size"] == 64 and s["seed"] == 0 and len(s["selection"]) == 9
    assert s["throughput"] > 0 and s["peak_memory_mb"] > 50 and s["config"]["trainer"]["max_epochs"] == 3
    assert s["metrics"]["best/val/acc1"] == max(h["val/acc1"] for h in s["history"])

    res = compare([out], tmp_path / "report", metrics=["val/acc1"])
    rows = {r["norm"]: r for r in res["rows"]}
    b = json.loads((bn_dir / "summary.json").read_text())
    assert rows["ssn"]["val/acc1 mean"] == pytest.approx(s["metrics"]["val/acc1"])
    assert rows["bn"]["val/acc1 mean"] == pytest.approx(b["metrics"]["val/acc1"])
    fr = [rows["ssn"][f"latched_{k}"] for k in ("in", "ln", "bn")]
    assert sum(fr) == pytest.approx(1.0)  # every layer latched
    assert (tmp_path / "report" / "selection.png").read_bytes().startswith(PNG)
