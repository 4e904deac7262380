"""ssn-bench sweep and compare: the grid, SLURM/wandb files, resuming after a killed run, the run
summary, and the report (table, CSV, plots) on runs with known values."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest
import yaml

from tasks.cli import command
from tasks.report import compare, load_records
from tasks.sweep import build_grid, run_status

from helpers import ROOT, run_summary, write_summary

FMNIST = "configs/fashion_mnist/resnet_small_fashionmnist-28.yaml"
DIGITS = "configs/digits/resnet_small_digits-28.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def test_grid_composes_norm_overlays_and_names_groups_and_tags(tmp_path):
    runs = build_grid(
        [FMNIST],
        norms=["bn", "gn", "ssn"],
        batch_sizes=[2, 8],
        seeds=[0, 1],
        grid=["model.init_args.lr=0.1,0.2"],
        sets=["trainer.max_epochs=1"],
        extra=["--export=false"],
        out=tmp_path / "sw",
    )
    assert len(runs) == 3 * 2 * 2 * 2 and [r.index for r in runs] == list(range(24))
    gn = next(r for r in runs if r.norm == "gn")
    overlays = ["--config", "configs/norms/gn.yaml", "--config", "configs/fashion_mnist/norms/gn.yaml"]
    assert gn.args[1:7] == ["--config", "configs/base/trainer.yaml", "--config", FMNIST, *overlays[:2]]
    assert gn.args[7:9] == overlays[2:]  # the task's own GN overlay (its groups) after the common one
    assert not any(a.startswith("--model.init_args.norm=") for a in gn.args)
    r = runs[0]
    assert (
        r.name == "resnet_small_fashionmnist-28-bn-b2-lr0.1-s0"
        and r.group == "resnet_small_fashionmnist-28-bn-b2-lr0.1"
    )
    assert f"--trainer.default_root_dir={tmp_path / 'sw' / r.name}" in r.args
    assert (
        f"--trainer.logger.init_args.group={r.group}" in r.args
        and "--trainer.logger.init_args.job_type=bn" in r.args
    )
    assert "--trainer.logger.init_args.tags=[sw, resnet_small_fashionmnist-28, bn, batch2]" in r.args
    assert r.args[-4:] == [
        "--data.init_args.batch_size=2",
        "--seed_everything=0",
        "--model.init_args.lr=0.1",
        "--export=false",
    ]
    # no task overlay for BN on digits: the common one alone
    d = build_grid([DIGITS], norms=["bn"], out=tmp_path / "d")[0]
    assert "configs/norms/bn.yaml" in d.args and "configs/digits/norms/bn.yaml" not in d.args
    assert d.name == "resnet_small_digits-28-bn" and run_status(d.dir) == "new"
    # no overlay for the normalizer at all: it is set on the command line
    s = build_grid([DIGITS], norms=["syncssn"], out=tmp_path / "d")[0]
    assert "--model.init_args.norm=syncssn" in s.args and not any("configs/norms/" in a for a in s.args)
    # the task file alone (no --norms) runs with its own normalizer (here NormTask's default)
    assert build_grid([DIGITS], out=tmp_path / "d")[0].args[1:5] == [
        "--config",
        "configs/base/trainer.yaml",
        "--config",
        DIGITS,
    ]


def test_sweep_writes_slurm_array_and_wandb_sweep_and_dry_runs(tmp_path, capsys):
    out, script, wsweep = tmp_path / "sw", tmp_path / "job.sh", tmp_path / "sweep.yaml"
    args = [
        "sweep",
        "--task",
        FMNIST,
        "--norms",
        "bn",
        "sn",
        "ssn",
        "--batch-sizes",
        "2",
        "32",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
        "--set",
        "trainer.max_epochs=1",
    ]
    assert (
        command(
            [
                *args,
                "--slurm",
                str(script),
                "--slurm-option=--gres=gpu:1",
                "--wandb-sweep",
                str(wsweep),
                "--jobs",
                "4",
                "--",
                "--export=false",
            ]
        )
        == 0
    )
    text = script.read_text()
    assert "#SBATCH --array=0-11%4\n" in text and "#SBATCH --gres=gpu:1\n" in text
    assert '--index "$SLURM_ARRAY_TASK_ID" -- --export=false' in text and " sweep --out " in text
    assert not list(out.glob("*/"))  # nothing ran
    spec = yaml.safe_load(wsweep.read_text())
    assert spec["method"] == "grid" and spec["parameters"]["index"]["values"] == list(range(12))
    assert (
        spec["project"] == "ssn-bench"
        and "${args}" in spec["command"]
        and spec["command"][-2:] == ["--", "--export=false"]
    )
    grid = json.loads((out / "grid.json").read_text())
    assert [g["name"] for g in grid][:2] == [
        "resnet_small_fashionmnist-28-bn-b2-s0",
        "resnet_small_fashionmnist-28-bn-b2-s1",
    ]
    capsys.readouterr()
    assert command([*args, "--dry-run", "--index", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith(f"5\t{grid[5]['name']}\tnew\t") and "fit --config" in lines[0]
    )


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


def test_report_on_runs_with_known_values(tmp_path):
    runs = tmp_path / "runs"
    accs = {
        ("bn", 2): [0.50, 0.60, 0.70],
        ("bn", 32): [0.90, 0.92],
        ("ssn", 2): [0.80, 0.84, 0.82],
        ("ssn", 32): [0.91],
    }
    ssn_latches = {
        2: [("in", "in"), ("ln", "bn"), ("bn", "bn")],
        32: [("bn", "bn"), ("bn", None), ("ln", "bn")],
    }
    for (norm, bs), values in accs.items():
        for seed, acc in enumerate(values):
            write_summary(
                runs,
                f"{norm}-b{bs}-s{seed}",
                run_summary(norm, bs, seed, acc, latches=ssn_latches[bs] if norm == "ssn" else None),
            )
    res = compare([runs], tmp_path / "report", metrics=["test/acc1"], title="known")
    rows = {(r["norm"], r["batch_size"]): r for r in res["rows"]}
    assert list(rows) == [("bn", 2), ("bn", 32), ("ssn", 2), ("ssn", 32)]  # normalizer order, then batch
    assert rows["bn", 2]["test/acc1 mean"] == pytest.approx(0.6) and rows["bn", 2][
        "test/acc1 std"
    ] == pytest.approx(0.1)
    assert rows["bn", 32]["test/acc1 std"] == pytest.approx(statistics.stdev([0.90, 0.92]))
    assert rows["ssn", 32]["test/acc1 std"] is None and rows["ssn", 32]["n"] == 1  # one seed: no std
    assert rows["bn", 2]["seeds"] == [0, 1, 2] and rows["bn", 2]["peak_memory_mb"] == 502.0
    assert rows["bn", 2]["throughput"] == 200.0 and rows["bn", 2]["latched_in"] is None  # no SN/SSN layers
    # batch 2: choices IN,IN, LN,BN, BN,BN -> IN 2/6, LN 1/6, BN 3/6; batch 32: one var not latched
    assert [rows["ssn", 2][f"latched_{s}"] for s in ("in", "ln", "bn")] == pytest.approx(
        [2 / 6, 1 / 6, 3 / 6]
    )
    assert [rows["ssn", 32][f"latched_{s}"] for s in ("in", "ln", "bn")] == pytest.approx([0, 1 / 6, 4 / 6])
    md = (tmp_path / "report" / "report.md").read_text()
    assert (
        "| ImageClassifier | FashionMNISTDataModule | resnet_small | bn | 2 | 2 | 0,1,2 | 0.6000 ± 0.1000 "
        "| 200 | 502 | — |" in md
    )
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
    with pytest.raises(ValueError, match="no run under .* matches norm=gn"):
        compare([runs], tmp_path / "r4", filters=["norm=gn"])
    # the command line: prints the table, writes the files
    assert (
        command(["compare", str(runs), "--out", str(tmp_path / "r5"), "--no-plots", "--filter", "norm=bn"])
        == 0
    )
    assert "| bn | 32 | 32 | 0,1 | 0.9100 ± 0.0141 |" in (tmp_path / "r5" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sweep_survives_a_killed_run_and_resumes_it_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    """Real runs (digits, 4 steps per epoch, 3 epochs), each its own process: the SSN run is
    SIGKILLed at step 6 (after the epoch-1 checkpoint); the BN run after it still runs. The sweep
    run again skips BN and resumes SSN from last.ckpt to step 12; compare then reports exactly the
    runs' own values."""
    base = tmp_path / "trainer.yaml"  # the base trainer with a CSV logger (quicker to start than wandb)
    cfg = yaml.safe_load((ROOT / "configs/base/trainer.yaml").read_text())
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path)},
    }
    base.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sw"
    sweep = [
        "sweep",
        "--config",
        str(base),
        "--task",
        DIGITS,
        "--norms",
        "ssn",
        "bn",
        "--out",
        str(out),
        "--threads",
        "1",
        "--set",
        "model.init_args.pretrained=null",
        "--set",
        "trainer.max_epochs=3",
        "--set",
        "trainer.limit_train_batches=4",
        "--set",
        "trainer.limit_val_batches=1",
        "--set",
        "trainer.num_sanity_val_steps=0",
        "--set",
        "trainer.enable_progress_bar=false",
        "--set",
        "trainer.enable_model_summary=false",
        "--",
        "--export=false",
    ]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    kill = [
        "--trainer.callbacks+=sweep_fault.KillAt",
        "--trainer.callbacks.step=6",
        "--trainer.callbacks.norm=ssn",
    ]
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


def _experiment(task: str, seed: int, acc: float, *, info: dict, model: dict, root: str) -> dict:
    """A summary as the CLI writes it: identity (also under run_info), resolved config whose output
    paths name the run's own folder, and a resume source for some."""
    info = {
        "task": task,
        "dataset": "D",
        "norm": "ssn",
        "batch_size": 8,
        "global_batch_size": 8,
        "seed": seed,
        "world_size": 1,
        **info,
    }
    config = {
        "seed_everything": seed,
        "ckpt_path": "last" if seed else None,
        "model": {"class_path": f"tasks.{task}", "init_args": {"norm": "ssn", "lr": 0.1, **model}},
        "data": {"class_path": "datamodules.D", "init_args": {"batch_size": 8, "root": "/data"}},
        "trainer": {
            "default_root_dir": root,
            "max_epochs": 2,
            "logger": {"class_path": "WandbLogger", "init_args": {"save_dir": root, "name": root[-9:]}},
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": f"{root}/ckpt"}}],
        },
    }
    return {
        **info,
        "run_info": info,
        "status": "complete",
        "metrics": {"test/mIoU": acc},
        "config": config,
        "selection": [],
        "throughput": 10.0,
        "peak_memory_mb": 1.0,
        "device": f"cuda:{seed}",
    }


def test_default_groups_differ_only_by_seed_and_name_their_keys(tmp_path):
    runs = tmp_path / "runs"
    for depth, accs in ((18, [0.40, 0.42]), (50, [0.60, 0.62])):  # DeepLabV3 R18 and R50: no `arch`
        for seed, acc in enumerate(accs):
            name = f"seg-r{depth}-s{seed}"
            write_summary(
                runs,
                name,
                _experiment(
                    "SemanticSegmenter",
                    seed,
                    acc,
                    info={"arch": None},
                    model={"depth": depth},
                    root=str(runs / name),
                ),
            )
    for mode, accs in (
        (None, [0.7, 0.72]),
        ("keep", [0.8, 0.82]),
        ("reopen", [0.9, 0.92]),
    ):  # scratch, fine-tunes
        for seed, acc in enumerate(accs):
            name = f"cls-{mode}-s{seed}"
            pretrained = None if mode is None else "/ckpt/src.ckpt"
            write_summary(
                runs,
                name,
                _experiment(
                    "ImageClassifier",
                    seed,
                    acc,
                    info={"arch": "resnet18", "pretrained": pretrained, "pretrained_ratios": mode},
                    model={"pretrained": pretrained, "pretrained_ratios": mode or "keep"},
                    root=str(runs / name),
                ),
            )
    res = compare([runs], tmp_path / "report", metrics=["test/mIoU"], plots=False)
    assert [(r["n"], r["seeds"]) for r in res["rows"]] == [
        (2, [0, 1])
    ] * 5  # every group: two seeds, nothing else
    means = sorted(r["test/mIoU mean"] for r in res["rows"])
    assert means == pytest.approx([0.41, 0.61, 0.71, 0.81, 0.91])
    keys = res["group_by"]
    assert {"task", "model.depth", "pretrained_ratios"} <= set(keys)
    assert not any(
        k.startswith(("trainer.", "seed", "ckpt")) or k in ("device", "seed_everything") for k in keys
    )
    assert "model.pretrained" in res["implied"] and "model.class_path" in res["implied"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "differ only by their seed, told apart by task, dataset, arch, norm, batch_size" in md
    assert "model.depth" in md.split("\n\n")[2] and "| model.depth |" in md
    # an explicit --group-by that pools experiments says which keys it averages over
    pooled = compare([runs], tmp_path / "r2", metrics=["test/mIoU"], group_by=["task"], plots=False)
    assert (
        "WARNING: runs of a group also differ in" in pooled["grouping"]
        and "model.depth" in pooled["grouping"]
    )


def test_malformed_and_incomplete_summaries_are_named_and_the_rest_compared(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_summary(runs, "good-s0", run_summary("bn", 2, 0, 0.5))
    write_summary(runs, "good-s1", run_summary("bn", 2, 1, 0.7))
    bad = {
        "half": json.dumps(run_summary("bn", 2, 2, 0.9))[:200],  # killed while writing (no atomic rename)
        "list": "[1, 2]",
        "empty": "",
        "metric-text": json.dumps({**run_summary("bn", 2, 3, 0.9), "metrics": {"test/acc1": "high"}}),
        "metric-nan": json.dumps({**run_summary("bn", 2, 4, 0.9), "metrics": {"test/acc1": float("nan")}}),
        "config-list": json.dumps({**run_summary("bn", 2, 5, 0.9), "config": ["model"]}),
        "selection-junk": json.dumps({**run_summary("bn", 2, 6, 0.9), "selection": [{"layer": 3}]}),
        "throughput-text": json.dumps({**run_summary("bn", 2, 7, 0.9), "throughput": "fast"}),
        "fitted": json.dumps({**run_summary("bn", 2, 8, 0.9), "status": "fitted"}),
    }
    for name, text in bad.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(text)
    (runs / "latin1").mkdir()
    (runs / "latin1" / "summary.json").write_bytes(b"\xff\xfe{")
    (runs / "grid.json").write_text(json.dumps([{"name": "good-s0"}, {"name": "never-ran"}]))
    res = compare([runs], tmp_path / "report", plots=False)
    assert len(res["rows"]) == 1 and res["rows"][0]["n"] == 2
    assert res["rows"][0]["test/acc1 mean"] == pytest.approx(0.6)  # none of the bad runs' 0.9
    md = (tmp_path / "report" / "report.md").read_text()
    for name in [*bad, "latin1", "never-ran"]:
        assert str(runs / name) in md, name
    assert (
        "incomplete (status 'fitted')" in md and "'test/acc1' is 'high'" in md and "not a JSON object" in md
    )
    # the incomplete run counts when asked for
    assert compare([runs], tmp_path / "r3", plots=False, include_incomplete=True)["rows"][0]["n"] == 3
    # one summary file, default --out: the report goes beside it
    assert command(["compare", str(runs / "good-s0" / "summary.json"), "--no-plots"]) == 0
    assert (runs / "good-s0" / "report" / "report.md").is_file()
    assert command(["compare", str(runs), "--no-plots", "--out", str(tmp_path / "r4")]) == 0
    assert f"left out: {runs / 'list' / 'summary.json'}: malformed" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no usable run summary.*\n.*half"):
        compare([runs / "half"], tmp_path / "r5")
    with pytest.raises(ValueError, match="is a file"):
        compare([runs], runs / "good-s0" / "summary.json")


def test_typos_in_metric_group_by_and_filter_name_the_valid_keys(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_summary(runs, "a", run_summary("bn", 2, 0, 0.5))
    write_summary(runs, "b", run_summary("gn", 2, 0, 0.6))
    with pytest.raises(ValueError, match=r"--metric 'test/acc': no run has it; did you mean test/acc1\?"):
        compare([runs], tmp_path / "r", metrics=["test/acc"], plots=False)
    with pytest.raises(ValueError, match=r"--group-by 'nrom'.*did you mean norm\?.*Valid: .*model\.lr"):
        compare([runs], tmp_path / "r", group_by=["nrom"], plots=False)
    with pytest.raises(ValueError, match=r"--filter 'model.nrom'.*model\.norm"):
        compare([runs], tmp_path / "r", filters=["model.nrom=bn"], plots=False)
    with pytest.raises(SystemExit):
        command(["compare", str(runs), "--metric", "val/acc"])
    assert "did you mean val/acc1" in capsys.readouterr().err


def test_sweep_checks_norms_and_keys_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "sw"
    base = ["sweep", "--task", FMNIST, "--out", str(out), "--dry-run"]
    with pytest.raises(SystemExit):
        command([*base, "--norms", "bn", "ssm"])
    assert "--norms ssm: unknown normalizer; known: bn, syncbn, gn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command([*base, "--norms", "bn", "--grid", "model.init_args.lrr=0.1,0.2"])
    err = capsys.readouterr().err
    assert "its arguments do not parse; no run was started" in err and "'lrr' is not accepted" in err
    with pytest.raises(SystemExit):
        command([*base, "--set", "trainer.max_epochz=1"])
    assert "unrecognized arguments: --trainer.max_epochz=1" in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing started
    assert command([*base, "--norms", "bn", "--grid", "model.init_args.lr=0.1,0.2"]) == 0


def test_virtual_devices_make_batch_sizes_per_device(tmp_path, capsys):
    # the paper's "8 GPUs x 2 images" on one process: the loader's batch is 16, each norm layer
    # computes statistics per group of 2, and the run's name says both
    runs = build_grid(
        [FMNIST], norms=["gn", "ssn"], batch_sizes=[2, 32], out=tmp_path / "sw", virtual_devices=8
    )
    assert [r.name for r in runs] == [
        "resnet_small_fashionmnist-28-gn-b2x8",
        "resnet_small_fashionmnist-28-gn-b32x8",
        "resnet_small_fashionmnist-28-ssn-b2x8",
        "resnet_small_fashionmnist-28-ssn-b32x8",
    ]
    ssn2 = runs[2]
    assert "--model.init_args.norm_kwargs.virtual_devices=8" in ssn2.args
    assert (
        "--data.init_args.batch_size=16" in ssn2.args and ssn2.batch_size == 2 and ssn2.virtual_devices == 8
    )
    assert "--data.init_args.batch_size=256" in runs[1].args
    # without batch sizes the device count still names the run
    assert build_grid([FMNIST], norms=["bn"], out=tmp_path / "sw", virtual_devices=4)[0].name.endswith(
        "-bn-x4"
    )
    with pytest.raises(ValueError, match="--virtual-devices must be at least 1, got 0"):
        build_grid([FMNIST], norms=["bn"], out=tmp_path / "sw", virtual_devices=0)
    with pytest.raises(ValueError, match="syncssn: virtual_devices=8 takes per-device statistics"):
        build_grid([FMNIST], norms=["ssn", "syncssn"], out=tmp_path / "sw", virtual_devices=8)
    # the command line: the key parses (GN's groups are kept beside it), the grid lists G, the
    # SLURM script re-invokes each entry with the same G
    out, script = tmp_path / "cli", tmp_path / "job.sh"
    args = ["sweep", "--task", FMNIST, "--norms", "gn", "ssn", "--batch-sizes", "2", "--virtual-devices", "8"]
    assert command([*args, "--out", str(out), "--slurm", str(script)]) == 0
    assert " --virtual-devices 8 " in script.read_text()
    grid = json.loads((out / "grid.json").read_text())
    assert [(g["batch_size"], g["virtual_devices"]) for g in grid] == [(2, 8), (2, 8)]
    from tasks.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*runs[0].args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["norm_kwargs"] == {"groups": 8, "virtual_devices": 8}
    assert printed["data"]["init_args"]["batch_size"] == 16


def test_report_plots_against_the_per_device_batch(tmp_path):
    # 8 virtual devices: the loader's batch is 8x the per-device one; the table, the plots and the
    # selection are by the per-device batch
    runs = tmp_path / "runs"
    latches = {2: [("in", "in"), ("ln", "ln")], 32: [("bn", "bn"), ("bn", "in")]}
    for norm in ("bn", "ssn"):
        for dev in (2, 32):
            for seed in (0, 1):
                s = run_summary(norm, 8 * dev, seed, 0.8 + dev / 1000 + seed / 100, latches=latches[dev])
                s.update(device_batch_size=dev, virtual_devices=8, global_batch_size=8 * dev)
                write_summary(runs, f"{norm}-b{dev}x8-s{seed}", s)
    res = compare([runs], tmp_path / "report")
    assert res["group_by"][:6] == ["task", "dataset", "arch", "norm", "device_batch_size", "batch_size"]
    rows = {(r["norm"], r["device_batch_size"]): r for r in res["rows"]}
    assert list(rows) == [("bn", 2), ("bn", 32), ("ssn", 2), ("ssn", 32)]
    assert rows["ssn", 2]["batch_size"] == 16 and rows["ssn", 2]["test/acc1 mean"] == pytest.approx(0.807)
    assert rows["ssn", 2]["virtual_devices"] == 8  # every run of the group: the plots' axis says so
    assert [rows["ssn", 32][f"latched_{s}"] for s in ("in", "ln", "bn")] == pytest.approx([1 / 4, 0, 3 / 4])
    for name in ("metric_vs_batch.png", "selection_vs_batch.png", "selection.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(PNG)
        assert f"]({name})" in res["markdown"]
    assert "device_batch_size=2 batch_size=16 seed=0: mean IN 1, LN 1, BN 0" in res["markdown"]
    # the per-device batch is the plots' x axis
    from tasks.report import device_batch

    assert [device_batch(r) for r in res["rows"]] == [2, 32, 2, 32]
    assert device_batch({"batch_size": 64}) == 64  # a summary from before virtual devices
