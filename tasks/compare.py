"""Comparing normalizers: ``ssn-bench sweep`` (a grid of runs, each its own process, resumable;
or a SLURM job array / wandb sweep file) and ``ssn-bench compare`` (a table, Markdown, CSV and
plots from the runs' ``summary.json``, written by ``tasks.callbacks.RunSummary``).

    ssn-bench sweep --task configs/fashion_mnist/resnet_small_ssn_fashionmnist-28.yaml \\
        --norms bn gn sn ssn --batch-sizes 2 8 32 --seeds 0 1 2 --set trainer.max_epochs=2 \\
        --out outputs/sweeps/small-batch [--jobs 2] [--dry-run] [--slurm job.sh] [--wandb-sweep sweep.yaml]
    ssn-bench compare outputs/sweeps/small-batch --out outputs/sweeps/small-batch/report \\
        [--metric test/acc1] [--filter norm=bn,ssn] [--group-by task norm batch_size]

A run's folder is ``<out>/<name>/`` (checkpoints, offline wandb run, ``summary.json``,
``run.log``). A sweep skips runs whose summary is ``complete``, resumes runs that have a
``checkpoints/last.ckpt`` with ``--ckpt_path last``, and starts the others; a failing run does not
stop the rest (the exit status says how many failed).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ssn import NORM_NAMES, STATS  # STATS: the statistics in ratio order: in, ln, bn

from .callbacks import SUMMARY_FILE

__all__ = ["GridRun", "build_grid", "check_runs", "command", "compare", "group_keys", "load_records", "run_status",
           "sweep"]

NORM_ORDER = ("bn", "syncbn", "gn", "in", "ln", "sn", "syncsn", "ssn", "syncssn")
DEFAULT_BASE = "configs/base/trainer.yaml"


# =============================================================================== the grid
@dataclass
class GridRun:
    """One entry of a sweep's grid: its identity, folder and ``ssn-bench fit`` arguments."""

    index: int
    name: str
    group: str
    task: str
    norm: str
    batch_size: int | None
    seed: int | None
    values: dict[str, str]
    dir: Path
    args: list[str] = field(default_factory=list)

    def command(self, resume: bool = False) -> list[str]:
        return [sys.executable, "-m", "tasks.cli", *self.args, *(["--ckpt_path", "last"] if resume else [])]


def _yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config {path} not found")
    return yaml.safe_load(p.read_text()) or {}


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _task_config(path: str, norm: str | None) -> tuple[str, str, str, bool]:
    """(config file for ``norm``, task label, the norm, whether ``--model.init_args.norm`` must
    override it). The per-normalizer sibling file (``{arch}_{norm}_{dataset}-{crop}.yaml``) is
    preferred: it carries the normalizer's own arguments (e.g. GN's groups)."""
    p = Path(path)
    own = _get(_yaml(path), "model.init_args.norm")
    token = f"_{own}_" if own else None
    label = p.stem.replace(token, "_", 1) if token and token in p.stem else p.stem
    if norm is None or norm == own:
        return path, label, own or "?", False
    if token and token in p.name:
        sibling = p.with_name(p.name.replace(token, f"_{norm}_", 1))
        if sibling.is_file():
            return str(sibling), label, norm, False
    return path, label, norm, True


def _wandb_logger(configs: Sequence[str]) -> bool:
    """Whether the composed configs' logger is a WandbLogger (the last file that sets one wins)."""
    logger = None
    for c in configs:
        value = _get(_yaml(c), "trainer.logger")
        if value is not None:
            logger = value
    return isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)


def _pairs(items: Sequence[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        out.append((key.removeprefix("--"), value))
    return out


def build_grid(
    tasks: Sequence[str], *, base: Sequence[str] = (DEFAULT_BASE,), norms: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
    grid: Sequence[str] = (), sets: Sequence[str] = (), extra: Sequence[str] = (),
    out: str | Path = "outputs/sweep",
    sweep_name: str | None = None,
) -> list[GridRun]:
    """The runs of a sweep, in a fixed order (task, normalizer, batch size, seed, then the
    ``grid`` keys): the same arguments always give the same indices (SLURM array tasks rely on it).

    Args:
        tasks: task config files (a per-normalizer file is swapped for its sibling of each norm).
        base: config files composed before each task file (default: the base trainer).
        norms, batch_sizes, seeds: the usual axes (None: the config's value, no axis).
        grid: ``KEY=V1,V2,...`` more axes over any config key (e.g. ``model.init_args.lr=0.1,0.2``).
        sets: ``KEY=VALUE`` overrides of every run.
        extra: raw ``ssn-bench fit`` arguments appended to every run (not part of its identity).
        out: the sweep folder; each run writes into ``out/<name>``.
        sweep_name: tag of every run (default: the folder's name).
    """
    unknown = [n for n in norms or [] if n not in NORM_NAMES]
    if unknown:
        raise ValueError(f"--norms {' '.join(unknown)}: unknown normalizer; known: {', '.join(NORM_NAMES)}")
    out = Path(out)
    sweep_name = sweep_name or out.name
    axes = [(k, v.split(",")) for k, v in _pairs(grid, "--grid")]
    runs: list[GridRun] = []
    for task_path, norm, bs, seed, *values in itertools.product(
        tasks, norms or [None], batch_sizes or [None], seeds or [None], *[vals for _, vals in axes]
    ):
        config, label, norm_name, override = _task_config(task_path, norm)
        configs = [*base, config]
        chosen = {k: v for (k, _), v in zip(axes, values)}
        suffix = "".join(f"-{_safe(k.split('.')[-1])}{_safe(v)}" for k, v in chosen.items())
        group = f"{label}-{norm_name}" + (f"-b{bs}" if bs is not None else "") + suffix
        name = group + (f"-s{seed}" if seed is not None else "")
        run_dir = out / name
        args = ["fit"]
        for c in configs:
            args += ["--config", c]
        args += [f"--trainer.default_root_dir={run_dir}"]
        if _wandb_logger(configs):
            tags = [sweep_name, label, norm_name] + ([f"batch{bs}"] if bs is not None else [])
            logger = "--trainer.logger.init_args"
            args += [f"{logger}.save_dir={run_dir}", f"{logger}.name={name}", f"{logger}.group={group}",
                     f"{logger}.job_type={norm_name}", f"{logger}.tags=[{', '.join(tags)}]"]
        if override:
            args += [f"--model.init_args.norm={norm_name}"]
        args += [f"--{k}={v}" for k, v in _pairs(sets, "--set")]
        if bs is not None:
            args += [f"--data.init_args.batch_size={bs}"]
        if seed is not None:
            args += [f"--seed_everything={seed}"]
        args += [f"--{k}={v}" for k, v in chosen.items()]
        args += list(extra)
        runs.append(GridRun(len(runs), name, group, label, norm_name, bs, seed, chosen, run_dir, args))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("two grid entries have the same name (a task file given twice?)")
    return runs


# The arguments that only name a run's outputs or vary its seed and batch (argparse checked their
# types): runs equal in the rest parse alike, so one of them is checked.
_PER_RUN = ("--trainer.default_root_dir=", "--trainer.logger.init_args.", "--seed_everything=",
            "--data.init_args.batch_size=")


def check_runs(runs: Sequence[GridRun]) -> None:
    """Parse every distinct run's ``ssn-bench fit`` arguments as the run would (``--print_config``:
    no model is built), so a mistyped ``--grid``/``--set`` key or a value of the wrong type stops
    the sweep before its first run, not in each run's log. Raises ``ValueError`` naming the run
    and the parser's error."""
    import contextlib
    import io

    from .cli import main

    seen: set[tuple[str, ...]] = set()
    for run in runs:
        key = tuple(a for a in run.args if not a.startswith(_PER_RUN))
        if key in seen:
            continue
        seen.add(key)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                main([*run.args, "--print_config"])
                code: Any = 0
            except SystemExit as e:
                code = e.code
        if code not in (0, None):
            text = err.getvalue()
            message = text[text.rfind("error:"):].strip() if "error:" in text else text.strip()[-2000:]
            raise ValueError(f"run {run.name}: its arguments do not parse; no run was started.\n{message}")


def run_status(run_dir: Path) -> str:
    """``complete`` (summary says so), ``running`` (its process is alive), ``interrupted`` (a
    ``checkpoints/last.ckpt`` to resume from) or ``new``."""
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("status") == "complete":
                return "complete"
        except (OSError, ValueError):
            pass
    pid_file = run_dir / "run.pid"
    if pid_file.is_file():
        try:
            os.kill(int(pid_file.read_text().split()[0]), 0)
            return "running"
        except (OSError, ValueError, IndexError):
            pass
    return "interrupted" if (run_dir / "checkpoints" / "last.ckpt").is_file() else "new"


def _launch(run: GridRun, threads: int | None, total: int) -> tuple[GridRun, str, int]:
    status = run_status(run.dir)
    if status in ("complete", "running"):
        print(f"[{run.index + 1}/{total}] {run.name}: {status}, skipped", flush=True)
        return run, status, 0
    resume = status == "interrupted"
    cmd = run.command(resume)
    run.dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    what = "resumed from last.ckpt" if resume else "started"
    print(f"[{run.index + 1}/{total}] {run.name}: {what}", flush=True)
    start = time.time()
    with open(run.dir / "run.log", "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        (run.dir / "run.pid").write_text(f"{proc.pid}\n")
        rc = proc.wait()
    (run.dir / "run.pid").unlink(missing_ok=True)
    final = run_status(run.dir)
    ok = rc == 0 and final == "complete"
    outcome = "done" if ok else f"FAILED (exit {rc}), see {run.dir / 'run.log'}"
    print(f"[{run.index + 1}/{total}] {run.name}: {outcome} in {time.time() - start:.0f} s", flush=True)
    return run, "done" if ok else "failed", rc


def sweep(runs: Sequence[GridRun], *, jobs: int = 1, threads: int | None = None) -> dict[str, str]:
    """Run every entry not yet complete, each in its own process (``jobs`` at a time); returns
    name -> ``complete`` (skipped), ``running`` (skipped: alive elsewhere), ``done`` or ``failed``."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda r: _launch(r, threads, len(runs)), runs))
    return {run.name: status for run, status, _ in results}


def _argv(ns: argparse.Namespace, *, index: bool = False) -> list[str]:
    """The sweep's own arguments (to re-invoke one grid entry from SLURM or a wandb agent)."""
    args = ["--out", str(ns.out)]
    if ns.name:
        args += ["--name", ns.name]
    for flag, values in (("--config", ns.config), ("--task", ns.task), ("--norms", ns.norms),
                         ("--batch-sizes", ns.batch_sizes), ("--seeds", ns.seeds)):
        if values:
            args += [flag, *map(str, values)]
    for flag, values in (("--grid", ns.grid), ("--set", ns.set)):
        for v in values:
            args += [flag, v]
    if ns.threads:
        args += ["--threads", str(ns.threads)]
    if index:
        args += ["--index"]
    return args


def slurm_script(ns: argparse.Namespace, n: int) -> str:
    """An sbatch job array whose task ``i`` runs grid entry ``i`` (resuming it when requeued)."""
    out = Path(ns.out).resolve()
    call = shlex.join([sys.executable, "-m", "tasks.cli", "sweep", *_argv(ns)])
    extra = (" -- " + shlex.join(ns.extra)) if ns.extra else ""
    limit = f"%{ns.jobs}" if ns.jobs and ns.jobs > 1 else ""
    options = "".join(f"#SBATCH {o}\n" for o in ns.slurm_option)
    return (
        "#!/bin/bash\n"
        f"# {n} runs of the sweep {out.name}: task i runs grid entry i ({out / 'grid.json'} lists them).\n"
        "# Submit: sbatch THIS_FILE. A task that is requeued or resubmitted resumes its run from\n"
        "# checkpoints/last.ckpt; a complete run is skipped.\n"
        f"#SBATCH --job-name={_safe('ssn-' + out.name)}\n"
        f"#SBATCH --array=0-{n - 1}{limit}\n"
        f"#SBATCH --output={out}/slurm-%A_%a.log\n"
        f"{options}"
        "set -euo pipefail\n"
        f"cd {shlex.quote(os.getcwd())}\n"
        f"{call} --index \"$SLURM_ARRAY_TASK_ID\"{extra}\n"
    )


def wandb_sweep_file(ns: argparse.Namespace, runs: Sequence[GridRun], project: str | None) -> str:
    """A wandb sweep (method grid over the entry index) for online users: ``wandb sweep FILE``,
    then ``wandb agent ...``; each agent run executes one grid entry (its wandb run joins the sweep)."""
    import yaml

    cmd = ["${env}", sys.executable, "-m", "tasks.cli", "sweep", "${args}", *_argv(ns)]
    if ns.extra:
        cmd += ["--", *ns.extra]
    spec = {
        "name": Path(ns.out).name, "method": "grid", "program": "tasks/cli.py",
        "parameters": {"index": {"values": [r.index for r in runs]}}, "command": cmd,
    }
    if project:
        spec["project"] = project
    legend = "".join(f"#   {r.index}: {r.name}\n" for r in runs)
    return (f"# wandb sweep of {len(runs)} runs (go online: --set trainer.logger.init_args.offline=false).\n"
            f"# index -> run:\n{legend}" + yaml.safe_dump(spec, sort_keys=False))


def sweep_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(prog="ssn-bench sweep", description="Launch a grid of ssn-bench fit runs.",
                                epilog="Arguments after `--` are passed to every run as they are.")
    p.add_argument("--task", nargs="+", required=True, help="task config file(s), one grid axis")
    p.add_argument("--config", nargs="+", default=[DEFAULT_BASE], help="base config(s) before each task file")
    p.add_argument("--norms", nargs="+", help="normalizers (per-norm sibling configs are used when present)")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="per-device batch sizes (lr scales linearly)")
    p.add_argument("--seeds", nargs="+", type=int, help="seed_everything values")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="more axes: any config key")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--out", default="outputs/sweep", help="sweep folder (one subfolder per run)")
    p.add_argument("--name", help="sweep name, a wandb tag of every run (default: the folder's name)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (SLURM: array tasks at a time)")
    p.add_argument("--threads", type=int, help="torch threads of each run (OMP_NUM_THREADS)")
    p.add_argument("--index", type=int, action="append", help="run only these entries (SLURM, wandb agents)")
    p.add_argument("--dry-run", action="store_true", help="print each run's status and command, run nothing")
    p.add_argument("--slurm", metavar="FILE", help="write a SLURM job array script instead of running")
    p.add_argument("--slurm-option", action="append", default=[], metavar="OPT",
                   help="an #SBATCH line, e.g. --slurm-option=--gres=gpu:1")
    p.add_argument("--wandb-sweep", metavar="FILE", help="write a wandb grid sweep file instead of running")
    ns = p.parse_args(argv)
    ns.extra = extra
    try:
        runs = build_grid(ns.task, base=ns.config, norms=ns.norms, batch_sizes=ns.batch_sizes, seeds=ns.seeds,
                          grid=ns.grid, sets=ns.set, extra=extra, out=ns.out, sweep_name=ns.name)
        if ns.index is not None:
            bad = [i for i in ns.index if not 0 <= i < len(runs)]
            if bad:
                p.error(f"--index {bad}: the grid has {len(runs)} entries (0-{len(runs) - 1})")
        check_runs(runs if ns.index is None else [runs[i] for i in ns.index])
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    from ssn.io import write_text_atomic

    listing = [{"index": r.index, "name": r.name, "group": r.group, "task": r.task, "norm": r.norm,
                "batch_size": r.batch_size, "seed": r.seed, "values": r.values, "dir": str(r.dir),
                "command": shlex.join(r.command())} for r in runs]
    write_text_atomic(out / "grid.json", json.dumps(listing, indent=1) + "\n")
    if ns.slurm or ns.wandb_sweep:
        if ns.slurm:
            write_text_atomic(ns.slurm, slurm_script(ns, len(runs)))
            print(f"wrote {ns.slurm}: a job array of {len(runs)} runs (sbatch {ns.slurm})")
        if ns.wandb_sweep:
            project = next((_get(_yaml(c), "trainer.logger.init_args.project") for c in reversed(ns.config)
                            if _get(_yaml(c), "trainer.logger.init_args.project")), None)
            write_text_atomic(ns.wandb_sweep, wandb_sweep_file(ns, runs, project))
            print(f"wrote {ns.wandb_sweep}: a wandb grid sweep of {len(runs)} runs "
                  f"(wandb sweep {ns.wandb_sweep})")
        return 0
    if ns.index is not None:
        runs = [runs[i] for i in ns.index]
    if ns.dry_run:
        for r in runs:
            status = run_status(r.dir)
            print(f"{r.index}\t{r.name}\t{status}\t{shlex.join(r.command(status == 'interrupted'))}")
        return 0
    results = sweep(runs, jobs=ns.jobs, threads=ns.threads)
    failed = [n for n, s in results.items() if s == "failed"]
    counts = {s: sum(v == s for v in results.values()) for s in ("done", "complete", "running", "failed")}
    print("sweep: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" (of {len(results)})")
    for n in failed:
        print(f"  failed: {n}")
    return 1 if failed else 0


# ============================================================================= the report
def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a config, ``init_args`` levels dropped (``model.lr``, ``data.batch_size``);
    a list of objects is indexed (``trainer.callbacks.0.dirpath``), other lists are values."""
    if isinstance(cfg, list) and cfg and all(isinstance(v, dict) for v in cfg):
        cfg = {str(i): v for i, v in enumerate(cfg)}
    if not isinstance(cfg, dict):
        return {prefix: cfg} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = prefix if k == "init_args" else f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, (dict, list)) else {key: v})
    return out


def selection_fractions(selection: list[dict[str, Any]]) -> dict[str, float] | None:
    """Fraction of the layers' mean and variance choices latched to IN, LN and BN (each layer counts
    twice: its mean and its variance); None for a run without SN/SSN layers."""
    if not selection:
        return None
    choices = [r[f"{k}_latch"] for r in selection for k in ("mean", "var")]
    return {s: sum(c == s for c in choices) / len(choices) for s in STATS}


# What a summary's top-level scalars measure rather than define (summaries without ``run_info``).
MEASURED = frozenset({"status", "global_step", "epochs", "ckpt_path", "fit_seconds", "train_seconds",
                      "train_samples", "throughput", "peak_memory_mb", "peak_memory_kind", "device"})
# Settings that never tell two experiments apart: where outputs go, how progress is shown, what a
# resumed run resumes from (the same run), the logger (it only records). The seed is the other one.
OUTPUT_KEYS = frozenset({"trainer.default_root_dir", "ckpt_path", "trainer.enable_progress_bar",
                         "trainer.enable_model_summary"})
OUTPUT_LEAVES = frozenset({"dirpath", "filename", "save_dir", "log_dir"})
NUMERIC = ("throughput", "peak_memory_mb", "batch_size", "global_batch_size", "global_step")


def is_seed(key: str) -> bool:
    """``seed_everything``, the summary's ``seed`` and any ``*.seed`` (e.g. a data split's)."""
    return key.rsplit(".", 1)[-1] in ("seed", "seed_everything")


def _names_outputs(key: str) -> bool:
    return (key in OUTPUT_KEYS or key.startswith("trainer.logger.") or key == "trainer.logger"
            or key.rsplit(".", 1)[-1] in OUTPUT_LEAVES)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def malformed(s: Any) -> str | None:
    """What is wrong with a parsed ``summary.json`` for compare, or None."""
    if not isinstance(s, dict):
        return f"not a JSON object but a {type(s).__name__}"
    for key in ("metrics", "config", "run_info", "hparams"):
        if s.get(key) is not None and not isinstance(s[key], dict):
            return f"{key!r} is a {type(s[key]).__name__}, not an object"
    for k, v in (s.get("metrics") or {}).items():
        if not _is_number(v):
            return f"metric {k!r} is {v!r}, not a finite number"
    for k in NUMERIC:
        if s.get(k) is not None and not _is_number(s[k]):
            return f"{k!r} is {s[k]!r}, not a finite number"
    if s.get("status") is not None and not isinstance(s["status"], str):
        return f"'status' is {s['status']!r}, not a string"
    sel = s.get("selection")
    if sel is not None and not isinstance(sel, list):
        return f"'selection' is a {type(sel).__name__}, not a list"
    for row in sel or []:
        values = [row.get(f"{k}_{st}") for k in ("mean", "var") for st in STATS] if isinstance(row, dict) else []
        latches = [row.get(f"{k}_latch") for k in ("mean", "var")] if isinstance(row, dict) else []
        if (not values or not all(map(_is_number, values)) or not isinstance(row.get("layer"), str)
                or any(x not in (None, *STATS) for x in latches)):
            return f"a 'selection' row is not a layer's ratios and latches: {str(row)[:80]}"
    return None


def _record(f: Path, s: dict[str, Any]) -> dict[str, Any]:
    config = s.get("config")
    if config is None:  # not from the CLI: the module's hyperparameters stand for its config
        config = {"model": {k: v for k, v in (s.get("hparams") or {}).items() if not k.startswith("_")}}
    flat = _flatten(config)
    rec: dict[str, Any] = dict(flat)
    rec.update({k: v for k, v in s.items() if not isinstance(v, (dict, list))})
    rec.update(s.get("metrics") or {})
    info = s.get("run_info")
    top = info if isinstance(info, dict) else {k: v for k, v in s.items() if k not in MEASURED}
    rec["_identity"] = [k for k in (*top, *flat) if k in rec and not isinstance(rec[k], dict)
                        and not is_seed(k) and not _names_outputs(k)]
    rec["_metrics"] = list(s.get("metrics") or {})
    rec["run"] = f.parent.name
    rec["path"] = str(f.parent)
    rec["selection"] = s.get("selection") or []
    fr = selection_fractions(rec["selection"])
    for st in STATS:
        rec[f"latched_{st}"] = fr[st] if fr else None
    return rec


def _grid_missing(folder: Path) -> list[tuple[str, str]]:
    """The runs a sweep folder's ``grid.json`` lists that have no summary yet."""
    try:
        grid = json.loads((folder / "grid.json").read_text())
        names = [str(g["name"]) for g in grid]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    return [(str(folder / n), "no summary.json (not run, running, or killed before fit ended)")
            for n in names if not (folder / n / SUMMARY_FILE).exists()]


def load_records(
    paths: Sequence[str | Path], *, skipped: list[tuple[str, str]] | None = None, include_incomplete: bool = False,
) -> list[dict[str, Any]]:
    """One flat record per run: the summary's scalars, its metrics (``test/acc1``,
    ``best/val/acc1``...), its config flattened (``model.lr``...) and ``run`` (its folder).

    A summary that cannot be read or is malformed, a run that is not ``complete`` (unless
    ``include_incomplete``) and a sweep's run without a summary are left out and appended to
    ``skipped`` as (path, reason): one bad run never hides the others."""
    skipped = [] if skipped is None else skipped
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob(SUMMARY_FILE))
            skipped += _grid_missing(p)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such run folder or summary file")
    records = []
    for f in files:
        try:
            s = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            skipped.append((str(f), f"unreadable: {type(e).__name__}: {e}"))
            continue
        problem = malformed(s)
        if problem:
            skipped.append((str(f), f"malformed: {problem}"))
        elif s.get("status") != "complete" and not include_incomplete:
            skipped.append((str(f), f"incomplete (status {s.get('status')!r}): fit or its test did not finish"))
        else:
            records.append(_record(f, s))
    return records


def _match(value: Any, wanted: str) -> bool:
    for w in wanted.split(","):
        if str(value) == w or (str(value).lower() in ("true", "false") and str(value).lower() == w.lower()):
            return True
        try:
            if value is not None and float(value) == float(w):
                return True
        except (TypeError, ValueError):
            pass
    return False


def check_keys(records: list[dict[str, Any]], keys: Sequence[str], what: str, *, metrics: bool = False) -> None:
    """A ``KeyError``-like ``ValueError`` naming the valid keys when no run has one of ``keys``
    (a typo would otherwise give an empty column or one merged row, silently)."""
    import difflib

    valid = sorted({k for r in records for k in (r["_metrics"] if metrics else r) if not k.startswith("_")})
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"{what} {key!r}: no run has it{hint} Valid: {', '.join(valid)}")


def filter_records(records: list[dict[str, Any]], filters: Sequence[str]) -> list[dict[str, Any]]:
    """Keep records matching every ``KEY=V1,V2`` (any of the values); ``KEY!=V`` excludes."""
    out = records
    for f in filters:
        neg = "!=" in f
        key, _, wanted = f.partition("!=" if neg else "=")
        if not _:
            raise ValueError(f"--filter expects KEY=VALUE or KEY!=VALUE, got {f!r}")
        check_keys(records, [key], "--filter")
        out = [r for r in out if _match(r.get(key), wanted) != neg]
    return out


def _canon(value: Any) -> str:
    """A hashable, exact form of a config value (lists and objects included)."""
    return json.dumps(value, sort_keys=True, default=str)


DEFAULT_GROUP = ("task", "dataset", "arch", "norm", "batch_size", "global_batch_size")


def group_keys(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The keys that make each group differ only by seed: every identity value (summary identity
    and resolved config, less the seed and output-only settings) that differs between the runs.

    Returns (the keys shown: the usual columns any run has, then each differing key that splits
    the runs further; the differing keys that split nothing more, e.g. ``model.norm`` beside
    ``norm``). Grouping by the first gives the same groups as grouping by all of them."""
    identity = {k for r in records for k in r["_identity"]}
    order = [k for k in DEFAULT_GROUP if k in identity]
    order += sorted(identity - set(order), key=lambda k: ("." in k, k))  # summary fields, then config
    differing = [k for k in order if len({_canon(r.get(k)) for r in records}) > 1]
    shown = [k for k in DEFAULT_GROUP if any(k in r for r in records)]
    n_groups = len({tuple(_canon(r.get(k)) for k in shown) for r in records})
    implied = []
    for k in differing:
        if k in shown:
            continue
        n = len({tuple(_canon(r.get(x)) for x in (*shown, k)) for r in records})
        if n > n_groups:
            shown.append(k)
            n_groups = n
        else:
            implied.append(k)
    return shown, implied


def pooled_keys(records: list[dict[str, Any]], group_by: Sequence[str]) -> list[str]:
    """Identity keys that differ inside some group of ``group_by`` (other than the seed): an
    explicit ``--group-by`` that averages different experiments says so."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(_canon(r.get(k)) for k in group_by), []).append(r)
    keys = sorted({k for r in records for k in r["_identity"]} - set(group_by))
    return [k for k in keys if any(len({_canon(r.get(k)) for r in g}) > 1 for g in groups.values())]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (2, "")
    if isinstance(value, str) and value in NORM_ORDER:
        return (0, NORM_ORDER.index(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def aggregate(
    records: list[dict[str, Any]], group_by: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per distinct ``group_by`` values: mean and sample std (over the runs, i.e. the seeds)
    of each metric, mean throughput, peak memory (max), mean fraction of choices latched to each
    statistic, and the seeds and runs."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(_canon(r.get(k)) for k in group_by), []).append(r)
    rows = []
    for rs in sorted(groups.values(), key=lambda g: tuple(_sort_key(g[0].get(k)) for k in group_by)):
        row: dict[str, Any] = {k: rs[0].get(k) for k in group_by}
        row["n"] = len(rs)
        row["seeds"] = sorted({r.get("seed") for r in rs}, key=_sort_key)
        for m in metrics:
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            row[f"{m} mean"], row[f"{m} std"] = _mean_std(vals)
            row[f"{m} n"] = len(vals)
        thr = [r["throughput"] for r in rs if r.get("throughput")]
        row["throughput"] = statistics.fmean(thr) if thr else None
        mem = [r["peak_memory_mb"] for r in rs if r.get("peak_memory_mb")]
        row["peak_memory_mb"] = max(mem) if mem else None
        kinds = {str(r.get("peak_memory_kind")) for r in rs if r.get("peak_memory_mb")}
        row["peak_memory_kind"] = ",".join(sorted(kinds))
        for st in STATS:
            vals = [r[f"latched_{st}"] for r in rs if r.get(f"latched_{st}") is not None]
            row[f"latched_{st}"] = statistics.fmean(vals) if vals else None
        row["runs"] = [r["run"] for r in rs]
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def markdown_table(rows: list[dict[str, Any]], group_by: Sequence[str], metrics: Sequence[str]) -> str:
    head = [*group_by, "seeds", *[f"{m} (mean ± std)" for m in metrics], "samples/s", "peak MiB",
            "latched IN / LN / BN"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < len(group_by) + 1 else "---:"
                                                          for i in range(len(head))) + "|"]
    for r in rows:
        cells = [_fmt(r[k]) for k in group_by] + [_fmt(r["seeds"])]
        for m in metrics:
            mean, std = r[f"{m} mean"], r[f"{m} std"]
            cells.append("—" if mean is None else f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}")
        cells.append(_fmt(r["throughput"], 0))
        cells.append(_fmt(r["peak_memory_mb"], 0))
        fr = [r[f"latched_{s}"] for s in STATS]
        cells.append("—" if fr[0] is None else " / ".join(f"{x:.2f}" for x in fr))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    from ssn.io import atomic_write

    def write(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else ";".join(map(str, r[c])) if isinstance(r.get(c), list) else r[c]
                        for c in columns])

    atomic_write(path, write, binary=False)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_batch(
    rows: list[dict[str, Any]], metric: str, path: Path, title: str = "",
    panels: Sequence[str] = ("task", "dataset", "arch"),
) -> bool:
    """Metric (mean ± std over seeds) against the per-device batch (log scale), one line per
    normalizer, one panel per value of the ``panels`` keys (the other group keys: one experiment
    per line). False when no row has a batch size."""
    rows = [r for r in rows if r.get("batch_size") is not None and r.get(f"{metric} mean") is not None]
    if not rows:
        return False
    plt = _plt()

    def panel_of(r: dict[str, Any]) -> tuple[str, ...]:
        return tuple(f"{k}={_fmt(r.get(k))}" if "." in k or k.startswith("pretrained") else _fmt(r.get(k))
                     for k in panels)

    names = sorted({panel_of(r) for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, panel in zip(axes[0], names):
        sub = [r for r in rows if panel_of(r) == panel]
        for norm in sorted({r.get("norm") for r in sub}, key=_sort_key):
            line = sorted((r for r in sub if r.get("norm") == norm), key=lambda r: r["batch_size"])
            xs = [r["batch_size"] for r in line]
            ys = [r[f"{metric} mean"] for r in line]
            es = [r[f"{metric} std"] or 0.0 for r in line]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=str(norm).upper())
        ax.set_xscale("log", base=2)
        xs = sorted({r["batch_size"] for r in sub})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("per-device batch size")
        ax.set_ylabel(metric)
        label = " / ".join(p for p in panel if p != "—")
        ax.set_title(label if len(names) > 1 else title or label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_selection(records: list[dict[str, Any]], path: Path) -> bool:
    """Which statistic each layer of each SSN run chose, by depth (rows: layers in network order;
    columns: runs by batch size and seed; left the mean, right the variance). A faded cell is not
    latched (its current argmax). False when no run has SSN layers."""
    runs = [r for r in records if r["selection"] and "ssn" in str(r.get("norm", "")).lower()]
    if not runs:
        return False
    runs.sort(key=lambda r: (_sort_key(r.get("task")), _sort_key(r.get("batch_size")), _sort_key(r.get("seed"))))
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = ["#4c72b0", "#dd8452", "#55a868"]  # IN, LN, BN
    layers = [row["layer"] for row in runs[0]["selection"]]
    n = max(len(r["selection"]) for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 0.45 * len(runs) * 2, 1.2 + 0.32 * n), sharey=True)
    for ax, kind in zip(axes, ("mean", "var")):
        grid = [[math.nan] * len(runs) for _ in range(n)]
        for j, r in enumerate(runs):
            for i, row in enumerate(r["selection"]):
                values = [row[f"{kind}_{s}"] for s in STATS]
                choice = STATS.index(row[f"{kind}_latch"]) if row[f"{kind}_latch"] else values.index(max(values))
                grid[i][j] = choice
                if not row[f"{kind}_latch"]:
                    ax.text(j, i, "?", ha="center", va="center", fontsize=7, color="white")
        ax.imshow(grid, cmap=ListedColormap(colours), vmin=-0.5, vmax=2.5, aspect="auto")
        labels = [f"b{r.get('batch_size')} s{r.get('seed')}" for r in runs]
        if len({r.get("task") for r in runs}) > 1:
            labels = [f"{r.get('arch')} {lab}" for r, lab in zip(runs, labels)]
        ax.set_xticks(range(len(runs)), labels, rotation=90, fontsize=7)
        ax.set_title(kind)
    axes[0].set_yticks(range(len(layers)), layers, fontsize=7)
    axes[0].set_ylabel("layer (input -> output)")
    fig.legend(handles=[Patch(color=c, label=s.upper()) for c, s in zip(colours, STATS)], loc="upper right",
               ncol=3, fontsize=7)
    fig.suptitle("SSN selection per layer (? = not latched: argmax)", fontsize=9, x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def selection_summary(records: list[dict[str, Any]], group_by: Sequence[str]) -> str:
    """Per group of SSN runs: the counts of each statistic over the layers (mean; var) and the
    per-layer choices of each run."""
    lines = []
    runs = [r for r in records if r["selection"] and "ssn" in str(r.get("norm", "")).lower()]
    runs.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in (*group_by, "seed")))
    for r in runs:
        sel = r["selection"]
        pick = {k: [(row[f"{k}_latch"] or "(" + STATS[max(range(3), key=lambda i: row[f"{k}_{STATS[i]}"])] + ")")
                    for row in sel] for k in ("mean", "var")}
        counts = {k: ", ".join(f"{s.upper()} {sum(c == s for c in pick[k])}" for s in STATS) for k in pick}
        ident = " ".join(f"{k}={_fmt(r.get(k))}" for k in (*group_by, "seed") if r.get(k) is not None)
        lines.append(f"- {ident}: mean {counts['mean']}; var {counts['var']} — per layer (mean/var): "
                     + " ".join(f"{m.upper()}/{v.upper()}" for m, v in zip(pick["mean"], pick["var"])))
    return "\n".join(lines)


def default_out(paths: Sequence[str | Path]) -> Path:
    """``report/`` beside the first run argument: inside it for a folder, beside it for a file."""
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / "report"


def compare(
    paths: Sequence[str | Path], out: str | Path | None = None, *, metrics: Sequence[str] = ("test/acc1",),
    group_by: Sequence[str] | None = None, filters: Sequence[str] = (), plots: bool = True, title: str = "",
    include_incomplete: bool = False,
) -> dict[str, Any]:
    """Read the runs' summaries under ``paths``, write ``report.md``, ``report.csv`` (one row per
    group), ``runs.csv`` (one row per run) and the plots into ``out`` (default
    :func:`default_out`); return the rows, files and the runs left out.

    ``group_by`` None: groups of runs that differ only by their seed (:func:`group_keys`). Runs
    whose summary is unreadable, malformed or not ``complete`` are left out and named in the
    report (:func:`load_records`)."""
    from ssn.io import write_text_atomic

    skipped: list[tuple[str, str]] = []
    loaded = load_records(paths, skipped=skipped, include_incomplete=include_incomplete)
    left_out = "".join(f"\n  {path}: {why}" for path, why in skipped)
    if not loaded:
        raise ValueError(f"no usable run summary ({SUMMARY_FILE}) under {', '.join(map(str, paths))}"
                         + (f"; left out:{left_out}" if left_out else ""))
    check_keys(loaded, metrics, "--metric", metrics=True)
    if group_by is not None:
        check_keys(loaded, group_by, "--group-by")
    records = filter_records(loaded, filters)
    if not records:
        raise ValueError(f"no run under {', '.join(map(str, paths))} matches {' '.join(filters)}")
    implied: list[str] = []
    if group_by is None:
        group_by, implied = group_keys(records)
        grouping = (f"Groups: runs that differ only by their seed, told apart by {', '.join(group_by) or 'nothing'}"
                    + (f" (also differing, implied by those: {', '.join(implied)})" if implied else "") + ".")
    else:
        pooled = pooled_keys(records, group_by)
        grouping = (f"Groups: by {', '.join(group_by)} (--group-by)"
                    + (f"; WARNING: runs of a group also differ in {', '.join(pooled)}, averaged as if seeds"
                       if pooled else "; the runs of a group differ only by their seed") + ".")
    out = Path(out) if out is not None else default_out(paths)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records, group_by, metrics)
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "runs": out / "runs.csv"}
    cols = [*group_by, "n", "seeds"]
    for m in metrics:
        cols += [f"{m} mean", f"{m} std", f"{m} n"]
    cols += ["throughput", "peak_memory_mb", "peak_memory_kind", *(f"latched_{s}" for s in STATS), "runs"]
    write_csv(files["csv"], rows, cols)
    run_cols = ["run", *[k for k in group_by if k not in ("run",)], "seed", "status", "global_step", *metrics,
                "throughput", "peak_memory_mb", *(f"latched_{s}" for s in STATS), "path"]
    write_csv(files["runs"], sorted(records, key=lambda r: tuple(_sort_key(r.get(k)) for k in (*group_by, "seed"))),
              run_cols)
    if plots:
        panels = [k for k in group_by if k not in ("norm", "batch_size", "global_batch_size")]
        if plot_metric_vs_batch(rows, metrics[0], out / "metric_vs_batch.png", title, panels=panels):
            files["metric_vs_batch"] = out / "metric_vs_batch.png"
        if plot_selection(records, out / "selection.png"):
            files["selection"] = out / "selection.png"
    kinds = sorted({str(r.get("peak_memory_kind")) for r in records if r.get("peak_memory_kind")})
    md = [f"# {title or 'Comparison'}", "",
          f"{len(records)} runs in {len(rows)} groups; mean ± sample std over the runs of a group (the seeds); "
          f"samples/s: training throughput over all devices (training batches only); peak MiB: {', '.join(kinds)} "
          "(max over the group); latched IN / LN / BN: fraction of the layers' mean and variance choices "
          "latched to each statistic.", "", grouping, ""]
    if skipped:
        md += [f"Left out: {len(skipped)} runs (not in the table).", "",
               *(f"- {path}: {why}" for path, why in skipped), ""]
    md += [markdown_table(rows, group_by, metrics), ""]
    sel = selection_summary(records, [k for k in group_by if k in ("task", "arch", "batch_size")])
    if sel:
        md += ["## SSN selection per run (layers from input to output; (x): not latched, argmax)", "", sel, ""]
    for key in ("metric_vs_batch", "selection"):
        if key in files:
            md += [f"![{key}]({files[key].name})", ""]
    write_text_atomic(files["markdown"], "\n".join(md))
    return {"rows": rows, "records": records, "files": files, "markdown": "\n".join(md), "group_by": list(group_by),
            "implied": implied, "grouping": grouping, "skipped": skipped}


def log_to_wandb(result: dict[str, Any], *, project: str, mode: str, name: str | None) -> None:
    """The report as a wandb table and images (``mode``: ``online`` or ``offline``)."""
    import wandb

    rows = result["rows"]
    cols = [k for k in rows[0] if k != "runs"]
    run = wandb.init(project=project, job_type="compare", name=name, mode=mode)
    data = [[json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in cols] for r in rows]
    payload: dict[str, Any] = {"compare/table": wandb.Table(columns=cols, data=data)}
    for key in ("metric_vs_batch", "selection"):
        if key in result["files"]:
            payload[f"compare/{key}"] = wandb.Image(str(result["files"][key]))
    run.log(payload)
    run.finish()


def compare_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="ssn-bench compare", description="Compare runs from their summary.json.")
    p.add_argument("runs", nargs="+", help="run folders, sweep folders (searched) or summary files")
    p.add_argument("--out", default=None, help="report folder (default: <first RUNS>/report)")
    p.add_argument("--metric", nargs="+", default=["test/acc1"], help="metrics to tabulate (the first is plotted)")
    p.add_argument("--group-by", nargs="+", default=None,
                   help="fields (any summary field or config key: model.lr); default: every identity and config "
                        "value that differs between the runs except the seed and output paths")
    p.add_argument("--include-incomplete", action="store_true",
                   help="also tabulate runs whose summary is not `complete` (fitted, not tested)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=V1,V2",
                   help="keep matching runs (KEY!=V drops)")
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--wandb", choices=["off", "offline", "online"], default="off",
                   help="also log the report to wandb")
    p.add_argument("--wandb-project", default="ssn-bench")
    ns = p.parse_args(list(argv))
    try:
        result = compare(ns.runs, ns.out, metrics=ns.metric, group_by=ns.group_by, filters=ns.filter,
                         plots=not ns.no_plots, title=ns.title, include_incomplete=ns.include_incomplete)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(result["grouping"] + "\n")
    for path, why in result["skipped"]:
        print(f"left out: {path}: {why}")
    print(markdown_table(result["rows"], result["group_by"], ns.metric))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in result["files"].items()))
    if ns.wandb != "off":
        log_to_wandb(result, project=ns.wandb_project, mode=ns.wandb, name=ns.title or None)
    return 0


def command(argv: Sequence[str]) -> int:
    """``ssn-bench sweep ...`` / ``ssn-bench compare ...`` (``argv[0]`` is the subcommand)."""
    if not argv or argv[0] not in ("sweep", "compare"):
        raise ValueError("expected `sweep` or `compare`")
    return sweep_main(argv[1:]) if argv[0] == "sweep" else compare_main(argv[1:])
