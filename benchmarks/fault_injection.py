"""Fault injection: break an ``ssn-bench`` run in the ways clusters and datasets do, and report what
survived. Every trial runs the real CLI in its own process (killed with SIGKILL where it says so).

    python benchmarks/fault_injection.py            # every trial (~5-10 min on 2 cores)
    python benchmarks/fault_injection.py --short    # kill-save and corrupt-idx (what CI runs: tests/test_faults.py)

Trials:
  kill-train    SIGKILL mid-epoch, resume with --ckpt_path last: final weights vs the uninterrupted run
  kill-save     SIGKILL in the middle of writing last.ckpt, TMPDIR on another filesystem (/dev/shm)
  corrupt-img   ImageNet layout with 2 broken JPEGs (skipped, counted), then with every image broken
  corrupt-idx   a Fashion-MNIST root with a truncated idx file
  diverge       lr = NaN (stops at step 0 with the layer named, nothing saved); a NaN loss with
                nonfinite=skip (the step is skipped, the run finishes finite)
  compare-malformed  a sweep folder with half-written, list, empty, wrong-typed and incomplete
                summaries and a grid run without one: compare names each and reports the good runs;
                `compare RUN/summary.json` with the default --out
  typos         compare --metric/--group-by and sweep --norms/--grid typos: exit 2 at once, naming
                the valid choice, nothing started
Exit status 1 if any trial did not end as expected.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST = "configs/fashion_mnist/resnet_small_{}_fashionmnist-28.yaml"
EVERY_STEP = "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args: {save_last: true, every_n_train_steps: 1}\n"


def cli(out: Path, *extra: str, norm: str = "ssn", config: str | None = None) -> list[str]:
    return [sys.executable, "-m", "tasks.cli", "fit", "--config", "configs/base/trainer.yaml",
            "--config", config or FMNIST.format(norm), f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=2", "--export=false", *extra]


def child_env(**extra: str) -> dict[str, str]:
    """A child process's environment: the repo importable, and without this process's wandb
    service (a killed child's run would stay registered in a shared one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]), **extra)
    return env


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=900)


def last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln and ":" in ln]
    return lines[-1].strip()[:240] if lines else f"exit {proc.returncode}"


def trial_kill_train(tmp: Path) -> tuple[bool, str]:
    (tmp / "every.yaml").write_text(EVERY_STEP)
    short = ["--config", str(tmp / "every.yaml"), "--trainer.limit_train_batches=5", "--trainer.max_epochs=2",
             "--data.batch_size=16"]
    full = run(cli(tmp / "full", *short))
    killed = run([*cli(tmp / "cut", *short), "--trainer.callbacks+=faults.KillAt", "--trainer.callbacks.step=3"])
    resumed = run([*cli(tmp / "cut", *short), "--ckpt_path=last"])
    if full.returncode or killed.returncode != -9 or resumed.returncode:
        return False, f"exit codes full {full.returncode}, killed {killed.returncode}, resumed {resumed.returncode}"
    a = torch.load(tmp / "full/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp / "cut/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    same = sum(torch.equal(a[k], b[k]) for k in a)
    return same == len(a), f"killed at step 3 of 10, resumed: {same}/{len(a)} tensors bit-identical to the uninterrupted run"


KILL_SAVE = textwrap.dedent("""
    import sys, time, io, torch
    from tasks.checkpointing import AtomicCheckpointIO
    path, ready = sys.argv[1], sys.argv[2]
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(2_000_000)}, path)
    real = torch.save
    def half_then_hang(obj, f):
        buf = io.BytesIO(); real(obj, buf); f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        open(ready, "w").close(); time.sleep(300)
    torch.save = half_then_hang
    AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(2_000_000)}, path)
""")


def trial_kill_save(tmp: Path) -> tuple[bool, str]:
    path, ready = tmp / "ckpt" / "last.ckpt", tmp / "ready"
    env = child_env(TMPDIR="/dev/shm" if os.path.isdir("/dev/shm") else str(tmp))
    child = subprocess.Popen([sys.executable, "-c", KILL_SAVE, str(path), str(ready)], cwd=ROOT, env=env)
    while not ready.exists() and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if child.returncode != -signal.SIGKILL:
        return False, f"the child ended with {child.returncode} before it was killed mid-save"
    try:
        kept = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        return False, f"last.ckpt unreadable after the kill: {e}"
    partial = len(list(path.parent.glob(".last.ckpt.*.tmp")))
    from tasks.checkpointing import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    left = sorted(p.name for p in path.parent.iterdir())
    ok = (kept["step"] == 1 and torch.equal(kept["w"], torch.ones(2_000_000)) and partial == 1
          and torch.load(path, weights_only=True)["step"] == 3 and left == ["last.ckpt"])
    return ok, (f"killed half-way through a save (TMPDIR={env['TMPDIR']}): last.ckpt still the previous one "
                f"(step {kept['step']}); {partial} partial file removed by the next save; folder now {left}")


def _imagenet(root: Path, broken: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in range(2):
            d = root / split / f"n0000000{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    files = sorted((root / "train").rglob("*.JPEG"))
    for f in files if broken == "all" else files[:2]:
        f.write_bytes(b"\xff\xd8\xff broken")


def trial_corrupt_images(tmp: Path) -> tuple[bool, str]:
    results = []
    for broken in ("two", "all"):
        root = tmp / f"imagenet-{broken}"
        _imagenet(root, broken)
        proc = run(cli(tmp / f"out-{broken}", "--model.init_args.arch=resnet18", f"--data.init_args.root={root}",
                       "--data.init_args.crop_size=32", "--data.init_args.resize_size=36", "--data.init_args.batch_size=4",
                       "--data.init_args.num_workers=0", "--trainer.max_epochs=1",
                       config="configs/imagenet/resnet50_bn_imagenet-224.yaml"))
        results.append((broken, proc))
    two, every = results[0][1], results[1][1]
    warned = two.stderr.count("skipping unreadable image")
    ok = two.returncode == 0 and warned == 2 and every.returncode != 0 and "every training batch was unreadable" in every.stderr
    return ok, (f"2 broken JPEGs: exit {two.returncode}, {warned} logged with their paths and skipped; "
                f"every JPEG broken: exit {every.returncode}: {last_error(every)}")


def trial_corrupt_idx(tmp: Path) -> tuple[bool, str]:
    from datamodules.fashion_mnist import DEBIAN_ROOT

    root = tmp / "fmnist"
    root.mkdir()
    for f in DEBIAN_ROOT.glob("*-ubyte.gz"):
        shutil.copy(f, root / f.name)
    labels = root / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:6]))  # cut inside the header
    proc = run(cli(tmp / "out", f"--data.init_args.root={root}", "--trainer.max_epochs=1"))
    ok = proc.returncode != 0 and "truncated idx header" in proc.stderr and str(labels) in proc.stderr
    return ok, f"train labels cut inside the header: exit {proc.returncode}: {last_error(proc)}"


def trial_diverge(tmp: Path) -> tuple[bool, str]:
    nan_lr = run(cli(tmp / "nan-lr", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--model.init_args.lr=.nan"))
    saved = list((tmp / "nan-lr").rglob("*.ckpt"))
    skip = run(cli(tmp / "skip", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                   "--model.init_args.nonfinite=skip", "--trainer.callbacks+=faults.NaNInputAt", "--trainer.callbacks.step=1"))
    final = tmp / "skip/checkpoints/last.ckpt"
    finite = final.is_file() and all(torch.isfinite(v).all() for v in torch.load(final, weights_only=True)["state_dict"].values()
                                     if v.is_floating_point())
    ok = nan_lr.returncode != 0 and "FloatingPointError" in nan_lr.stderr and not saved and skip.returncode == 0 and finite
    return ok, (f"lr=NaN: exit {nan_lr.returncode}, {len(saved)} checkpoints: {last_error(nan_lr)}; "
                f"NaN loss with nonfinite=skip: exit {skip.returncode}, final weights finite: {finite}")


# ------------------------------------------------------------------------------ compare
def _summary(norm: str, seed: int, acc: float) -> str:
    """A complete run's summary.json as RunSummary and the CLI write it (no training needed)."""
    info = {"task": "ImageClassifier", "dataset": "FashionMNISTDataModule", "arch": "resnet_small", "norm": norm,
            "batch_size": 8, "global_batch_size": 8, "seed": seed}
    return json.dumps({**info, "run_info": info, "status": "complete", "metrics": {"test/acc1": acc},
                       "selection": [], "config": {"model": {"init_args": {"norm": norm, "lr": 0.1}}}})


def compare_cli(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "tasks.cli", *args])


def trial_compare_malformed(tmp: Path) -> tuple[bool, str]:
    sweep = tmp / "sweep"
    good = {"bn-s0": _summary("bn", 0, 0.5), "bn-s1": _summary("bn", 1, 0.7)}
    bad = {"half-written": _summary("bn", 2, 0.9)[:90], "a-list": "[1, 2]", "empty": "",
           "metric-text": _summary("bn", 3, 0.9).replace("0.9", '"high"'),
           "fitted": _summary("bn", 4, 0.9).replace('"complete"', '"fitted"')}
    for name, text in {**good, **bad}.items():
        (sweep / name).mkdir(parents=True)
        (sweep / name / "summary.json").write_text(text)
    (sweep / "grid.json").write_text(json.dumps([{"name": n} for n in [*good, *bad, "never-ran"]]))
    folder = compare_cli("compare", str(sweep), "--no-plots")
    single = compare_cli("compare", str(sweep / "bn-s0" / "summary.json"), "--no-plots")  # default --out
    named = [n for n in [*bad, "never-ran"] if f"{sweep / n}" in folder.stdout]
    mean = "0.6000 ± 0.1414" in folder.stdout
    ok = (folder.returncode == 0 and len(named) == len(bad) + 1 and mean and single.returncode == 0
          and (sweep / "bn-s0" / "report" / "report.md").is_file())
    return ok, (f"{len(bad)} bad summaries ({', '.join(bad)}) and a grid run without one beside 2 good runs: "
                f"exit {folder.returncode}, {len(named)}/{len(bad) + 1} named as left out, the good pair's mean "
                f"{'reported' if mean else 'MISSING'}; one summary file with the default --out: exit "
                f"{single.returncode}, report beside it: {(sweep / 'bn-s0' / 'report' / 'report.md').is_file()}")


def trial_typos(tmp: Path) -> tuple[bool, str]:
    runs = tmp / "runs"
    for name, (norm, seed, acc) in {"bn-s0": ("bn", 0, 0.5), "gn-s0": ("gn", 0, 0.6)}.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(_summary(norm, seed, acc))
    tries = {
        "compare --metric test/acc": (compare_cli("compare", str(runs), "--metric", "test/acc"), "test/acc1"),
        "compare --group-by nrom": (compare_cli("compare", str(runs), "--group-by", "nrom"), "did you mean norm"),
        "sweep --norms ssm": (compare_cli("sweep", "--task", FMNIST.format("ssn"), "--norms", "ssm", "--dry-run",
                                          "--out", str(tmp / "sw")), "unknown normalizer"),
        "sweep --grid model.init_args.lrr": (compare_cli(
            "sweep", "--task", FMNIST.format("ssn"), "--grid", "model.init_args.lrr=0.1,0.2", "--dry-run",
            "--out", str(tmp / "sw")), "'lrr' is not accepted"),
    }
    caught = [k for k, (proc, text) in tries.items() if proc.returncode == 2 and text in proc.stderr]
    ok = len(caught) == len(tries) and not (tmp / "sw").exists()
    return ok, (f"{len(caught)}/{len(tries)} typos stopped at once with a message naming the valid choice "
                f"({'; '.join(f'{k}: exit {p.returncode}' for k, (p, _) in tries.items())}); "
                f"sweep folder created: {(tmp / 'sw').exists()}")


TRIALS = {"kill-train": trial_kill_train, "kill-save": trial_kill_save, "corrupt-img": trial_corrupt_images,
          "corrupt-idx": trial_corrupt_idx, "diverge": trial_diverge, "compare-malformed": trial_compare_malformed,
          "typos": trial_typos}
SHORT = ("kill-save", "corrupt-idx")  # CI (tests/test_faults.py); the rest are in tests/test_resume.py, test_reliability.py


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help=f"only {', '.join(SHORT)}")
    parser.add_argument("trials", nargs="*", choices=[*TRIALS, []], help="default: all (or the short set)")
    args = parser.parse_args()
    names = args.trials or (SHORT if args.short else list(TRIALS))
    failed = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as tmp:
            start = time.perf_counter()
            ok, what = TRIALS[name](Path(tmp))
            print(f"[{'survived' if ok else 'FAILED'}] {name} ({time.perf_counter() - start:.0f} s): {what}", flush=True)
            if not ok:
                failed.append(name)
    print(f"\n{len(names) - len(failed)}/{len(names)} faults handled" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
