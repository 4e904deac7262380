"""``ssn-bench sweep``: launch a grid of ``ssn-bench fit`` runs, each its own process,
resumable; or write a SLURM job array / wandb sweep file for the same grid.

    ssn-bench sweep --task configs/fashion_mnist/resnet_small_fashionmnist-28.yaml \\
        --norms bn gn sn ssn --batch-sizes 2 8 32 --seeds 0 1 2 --set trainer.max_epochs=2 \\
        --out outputs/sweeps/small-batch [--jobs 2] [--dry-run] [--slurm job.sh] [--wandb-sweep sweep.yaml]

A run's folder is ``<out>/<name>/`` (checkpoints, offline wandb run, ``summary.json``,
``run.log``). A sweep skips runs whose summary is ``complete`` (:mod:`tasks.summary`), resumes
runs that have a ``checkpoints/last.ckpt`` with ``--ckpt_path last``, and starts the others; a
failing run does not stop the rest (the exit status says how many failed). The runs' report is
``ssn-bench compare`` (:mod:`tasks.report`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssn import NORM_NAMES, get_norm_layer

from .summary import summary_status

__all__ = [
    "GridRun",
    "build_grid",
    "check_runs",
    "run_status",
    "slurm_script",
    "sweep",
    "sweep_main",
    "wandb_sweep_file",
]

DEFAULT_BASE = "configs/base/trainer.yaml"


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
    virtual_devices: int | None = None

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


def norm_overlays(task: str | Path, norm: str) -> list[str]:
    """The overlays that make ``task`` (``configs/<task>/<base>.yaml``) train with ``norm``:
    ``configs/norms/<norm>.yaml``, then ``configs/<task>/norms/<norm>.yaml`` where the normalizer's
    recipe differs for the task. Empty when there is no ``configs/norms/<norm>.yaml``."""
    task = Path(task)
    common = task.parent.parent / "norms" / f"{norm}.yaml"
    if not common.is_file():
        return []
    own = task.parent / "norms" / f"{norm}.yaml"
    return [str(common), *([str(own)] if own.is_file() else [])]


def config_args(task: str | Path, norm: str, *, quiet: bool = True) -> list[str]:
    """The CLI arguments that compose ``task`` (a task base file, ``configs/<task>/<base>.yaml``)
    with ``norm``: the base trainer, the task, the normalizer's overlays (or
    ``--model.init_args.norm`` where it has none) and, with ``quiet``, ``configs/base/quiet.yaml``."""
    task = Path(task)
    base = task.parent.parent / "base"
    overlays = norm_overlays(task, norm)
    files = [base / "trainer.yaml", task, *overlays, *([base / "quiet.yaml"] if quiet else [])]
    args = [a for f in files for a in ("--config", str(f))]
    return args if overlays else [*args, f"--model.init_args.norm={norm}"]


def _task_configs(path: str, norm: str | None) -> tuple[list[str], str, str, bool]:
    """(config files of ``path`` with ``norm``, the task label, the normalizer, whether
    ``--model.init_args.norm`` must set it: no overlay for it). ``norm`` None or the file's own:
    the file alone. The label is the file's name, less its normalizer for a file that names one
    (``resnet_small_ssn_digits-28`` -> ``resnet_small_digits-28``)."""
    p = Path(path)
    own = _get(_yaml(path), "model.init_args.norm")
    token = f"_{own}_" if own else None
    label = p.stem.replace(token, "_", 1) if token and token in p.stem else p.stem
    if norm is None or norm == own:
        return [path], label, own or _default_norm(), False
    overlays = norm_overlays(p, norm)
    return [path, *overlays], label, norm, not overlays


def _default_norm() -> str:
    """``NormTask``'s ``norm`` default (a task file that sets none trains with it)."""
    import inspect

    from .base import NormTask

    return str(inspect.signature(NormTask.__init__).parameters["norm"].default)


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
    tasks: Sequence[str],
    *,
    base: Sequence[str] = (DEFAULT_BASE,),
    norms: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    grid: Sequence[str] = (),
    sets: Sequence[str] = (),
    extra: Sequence[str] = (),
    out: str | Path = "outputs/sweep",
    sweep_name: str | None = None,
    virtual_devices: int | None = None,
) -> list[GridRun]:
    """The runs of a sweep, in a fixed order (task, normalizer, batch size, seed, then the
    ``grid`` keys): the same arguments always give the same indices (SLURM array tasks rely on it).

    Args:
        tasks: task base files (``configs/<task>/<base>.yaml``); each normalizer of ``norms`` is
            composed after it (``configs/norms/<norm>.yaml``, then ``configs/<task>/norms/<norm>.yaml``
            where there is one; ``--model.init_args.norm`` where there is no overlay).
        base: config files composed before each task file (default: the base trainer).
        norms, batch_sizes, seeds: the usual axes (None: the config's value, no axis).
        grid: ``KEY=V1,V2,...`` more axes over any config key (e.g. ``model.init_args.lr=0.1,0.2``).
        sets: ``KEY=VALUE`` overrides of every run.
        extra: raw ``ssn-bench fit`` arguments appended to every run (not part of its identity).
        out: the sweep folder; each run writes into ``out/<name>``.
        sweep_name: tag of every run (default: the folder's name).
        virtual_devices: G virtual devices per process (``norm_kwargs.virtual_devices``): each
            batch size of ``batch_sizes`` is then per (virtual) device, the loader's batch is G
            times it, and the run's name says both (``-b2x8``: 8 devices of 2 images).
    """
    if virtual_devices is not None and virtual_devices < 1:
        raise ValueError(f"--virtual-devices must be at least 1, got {virtual_devices}")
    g = virtual_devices or 1
    unknown = [n for n in norms or [] if n not in NORM_NAMES]
    if unknown:
        raise ValueError(f"--norms {' '.join(unknown)}: unknown normalizer; known: {', '.join(NORM_NAMES)}")
    if virtual_devices:
        for n in norms or []:  # NormTask's own check (a sync* name refuses them), before any run
            get_norm_layer(n, virtual_devices=virtual_devices)
    out = Path(out)
    sweep_name = sweep_name or out.name
    axes = [(k, v.split(",")) for k, v in _pairs(grid, "--grid")]
    runs: list[GridRun] = []
    for task_path, norm, bs, seed, *values in itertools.product(
        tasks, norms or [None], batch_sizes or [None], seeds or [None], *[vals for _, vals in axes]
    ):
        task_configs, label, norm_name, override = _task_configs(task_path, norm)
        configs = [*base, *task_configs]
        chosen = {k: v for (k, _), v in zip(axes, values, strict=True)}
        suffix = "".join(f"-{_safe(k.split('.')[-1])}{_safe(v)}" for k, v in chosen.items())
        devices = f"x{g}" if virtual_devices else ""
        batch_tag = f"-b{bs}{devices}" if bs is not None else (f"-{devices}" if devices else "")
        group = f"{label}-{norm_name}{batch_tag}{suffix}"
        name = group + (f"-s{seed}" if seed is not None else "")
        run_dir = out / name
        args = ["fit"]
        for c in configs:
            args += ["--config", c]
        args += [f"--trainer.default_root_dir={run_dir}"]
        if _wandb_logger(configs):
            tags = [sweep_name, label, norm_name] + ([f"batch{bs}"] if bs is not None else [])
            logger = "--trainer.logger.init_args"
            args += [
                f"{logger}.save_dir={run_dir}",
                f"{logger}.name={name}",
                f"{logger}.group={group}",
                f"{logger}.job_type={norm_name}",
                f"{logger}.tags=[{', '.join(tags)}]",
            ]
        if override:
            args += [f"--model.init_args.norm={norm_name}"]
        if virtual_devices:
            args += [f"--model.init_args.norm_kwargs.virtual_devices={virtual_devices}"]
        args += [f"--{k}={v}" for k, v in _pairs(sets, "--set")]
        if bs is not None:
            args += [f"--data.init_args.batch_size={bs * g}"]
        if seed is not None:
            args += [f"--seed_everything={seed}"]
        args += [f"--{k}={v}" for k, v in chosen.items()]
        args += list(extra)
        runs.append(
            GridRun(
                len(runs), name, group, label, norm_name, bs, seed, chosen, run_dir, args, virtual_devices
            )
        )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("two grid entries have the same name (a task file given twice?)")
    return runs


# The arguments that only name a run's outputs or vary its seed and batch (argparse checked their
# types): runs equal in the rest parse alike, so one of them is checked.
_PER_RUN = (
    "--trainer.default_root_dir=",
    "--trainer.logger.init_args.",
    "--seed_everything=",
    "--data.init_args.batch_size=",
)


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
            message = text[text.rfind("error:") :].strip() if "error:" in text else text.strip()[-2000:]
            raise ValueError(f"run {run.name}: its arguments do not parse; no run was started.\n{message}")


def run_status(run_dir: Path) -> str:
    """``complete`` (summary says so), ``running`` (its process is alive), ``interrupted`` (a
    ``checkpoints/last.ckpt`` to resume from) or ``new``."""
    if summary_status(run_dir) == "complete":
        return "complete"
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
    for flag, values in (
        ("--config", ns.config),
        ("--task", ns.task),
        ("--norms", ns.norms),
        ("--batch-sizes", ns.batch_sizes),
        ("--seeds", ns.seeds),
        ("--virtual-devices", [ns.virtual_devices] if ns.virtual_devices else None),
    ):
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
        f'{call} --index "$SLURM_ARRAY_TASK_ID"{extra}\n'
    )


def wandb_sweep_file(ns: argparse.Namespace, runs: Sequence[GridRun], project: str | None) -> str:
    """A wandb sweep (method grid over the entry index) for online users: ``wandb sweep FILE``,
    then ``wandb agent ...``; each agent run executes one grid entry (its wandb run joins the sweep)."""
    import yaml

    cmd = ["${env}", sys.executable, "-m", "tasks.cli", "sweep", "${args}", *_argv(ns)]
    if ns.extra:
        cmd += ["--", *ns.extra]
    spec = {
        "name": Path(ns.out).name,
        "method": "grid",
        "program": "tasks/cli.py",
        "parameters": {"index": {"values": [r.index for r in runs]}},
        "command": cmd,
    }
    if project:
        spec["project"] = project
    legend = "".join(f"#   {r.index}: {r.name}\n" for r in runs)
    return (
        f"# wandb sweep of {len(runs)} runs (go online: --set trainer.logger.init_args.offline=false).\n"
        f"# index -> run:\n{legend}" + yaml.safe_dump(spec, sort_keys=False)
    )


def sweep_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="ssn-bench sweep",
        description="Launch a grid of ssn-bench fit runs.",
        epilog="Arguments after `--` are passed to every run as they are.",
    )
    p.add_argument("--task", nargs="+", required=True, help="task base config file(s), one grid axis")
    p.add_argument("--config", nargs="+", default=[DEFAULT_BASE], help="base config(s) before each task file")
    p.add_argument(
        "--norms",
        nargs="+",
        help="normalizers (each composed from configs/norms/<norm>.yaml and the task's own overlay)",
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, help="per-device batch sizes (lr scales linearly)")
    p.add_argument("--seeds", nargs="+", type=int, help="seed_everything values")
    p.add_argument(
        "--virtual-devices",
        type=int,
        metavar="G",
        help="G virtual devices per process (the paper's per-GPU statistics on one process): "
        "--batch-sizes are then per device, each run's batch is G times it",
    )
    p.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="more axes: any config key"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--out", default="outputs/sweep", help="sweep folder (one subfolder per run)")
    p.add_argument("--name", help="sweep name, a wandb tag of every run (default: the folder's name)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (SLURM: array tasks at a time)")
    p.add_argument("--threads", type=int, help="torch threads of each run (OMP_NUM_THREADS)")
    p.add_argument("--index", type=int, action="append", help="run only these entries (SLURM, wandb agents)")
    p.add_argument("--dry-run", action="store_true", help="print each run's status and command, run nothing")
    p.add_argument("--slurm", metavar="FILE", help="write a SLURM job array script instead of running")
    p.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="OPT",
        help="an #SBATCH line, e.g. --slurm-option=--gres=gpu:1",
    )
    p.add_argument("--wandb-sweep", metavar="FILE", help="write a wandb grid sweep file instead of running")
    ns = p.parse_args(argv)
    ns.extra = extra
    try:
        runs = build_grid(
            ns.task,
            base=ns.config,
            norms=ns.norms,
            batch_sizes=ns.batch_sizes,
            seeds=ns.seeds,
            grid=ns.grid,
            sets=ns.set,
            extra=extra,
            out=ns.out,
            sweep_name=ns.name,
            virtual_devices=ns.virtual_devices,
        )
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

    listing = [
        {
            "index": r.index,
            "name": r.name,
            "group": r.group,
            "task": r.task,
            "norm": r.norm,
            "batch_size": r.batch_size,
            "virtual_devices": r.virtual_devices,
            "seed": r.seed,
            "values": r.values,
            "dir": str(r.dir),
            "command": shlex.join(r.command()),
        }
        for r in runs
    ]
    write_text_atomic(out / "grid.json", json.dumps(listing, indent=1) + "\n")
    if ns.slurm or ns.wandb_sweep:
        if ns.slurm:
            write_text_atomic(ns.slurm, slurm_script(ns, len(runs)))
            print(f"wrote {ns.slurm}: a job array of {len(runs)} runs (sbatch {ns.slurm})")
        if ns.wandb_sweep:
            project = next(
                (
                    _get(_yaml(c), "trainer.logger.init_args.project")
                    for c in reversed(ns.config)
                    if _get(_yaml(c), "trainer.logger.init_args.project")
                ),
                None,
            )
            write_text_atomic(ns.wandb_sweep, wandb_sweep_file(ns, runs, project))
            print(
                f"wrote {ns.wandb_sweep}: a wandb grid sweep of {len(runs)} runs "
                f"(wandb sweep {ns.wandb_sweep})"
            )
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
