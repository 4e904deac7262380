"""Fine-tuning end to end on real data: the main job's SSN checkpoint (Fashion-MNIST) on scikit-learn's
handwritten digits, in `keep` and `reopen` modes, against the same network trained from scratch on
the same budget. Prints a Markdown table (test accuracy, wall time, latched layers) and the
per-layer selection before and after; heatmaps land in each run's folder.

    .venv/bin/python benchmarks/finetune_digits.py [--pretrained outputs/checkpoints/last.ckpt]
        [--epochs 10] [--train-sizes 1000 100] [--seeds 0]

Run `make demo` first (it writes the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/digits/resnet_small_ssn_digits-28.yaml"
MODES = {"keep": ["--model.init_args.pretrained_ratios=keep"],
         "reopen": ["--model.init_args.pretrained_ratios=reopen"],
         "scratch": ["--model.init_args.pretrained=null"]}


def run(mode: str, train_size: int, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{mode}-n{train_size}-s{seed}"
    cmd = [sys.executable, "-m", "tasks.cli", "fit", "--config", str(CONFIG), *MODES[mode],
           f"--seed_everything={seed}", f"--trainer.max_epochs={args.epochs}", f"--data.init_args.train_size={train_size}",
           "--data.init_args.batch_size=" + str(min(64, train_size // 2)),
           f"--trainer.default_root_dir={out}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false"]
    if mode != "scratch":
        cmd.append(f"--model.init_args.pretrained={args.pretrained}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    acc = float(proc.stdout.split("test (model): ")[1].split("test/acc1 ")[1].split(",")[0])
    sel = json.loads((out / "ssn" / "selection.json").read_text())
    latched = sum(bool(r["mean_latch"] and r["var_latch"]) for r in sel)
    return {"mode": mode, "n": train_size, "seed": seed, "acc": acc, "wall": wall, "latched": latched,
            "layers": len(sel), "selection": (out / "ssn" / "selection.txt").read_text()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default=str(ROOT / "outputs/checkpoints/last.ckpt"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-sizes", type=int, nargs="+", default=[1000, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=str(ROOT / "outputs/finetune_digits"))
    args = ap.parse_args()
    if not Path(args.pretrained).is_file():
        raise SystemExit(f"no checkpoint at {args.pretrained}: run `make demo` first")
    before = Path(args.pretrained).parent.parent / "ssn" / "selection.txt"
    results = [run(m, n, s, args) for n in args.train_sizes for m in MODES for s in args.seeds]
    print(f"\nFine-tuning on scikit-learn digits, {args.epochs} epochs, seeds {args.seeds} "
          f"(test accuracy on 500 held-out digits; wall time per run, CLI start-up included)\n")
    print("| train images | mode | test acc | wall (s) | layers latched at the end |")
    print("|---:|---|---:|---:|---:|")
    for n in args.train_sizes:
        for m in MODES:
            rs = [r for r in results if r["n"] == n and r["mode"] == m]
            accs = [r["acc"] for r in rs]
            acc = f"{statistics.mean(accs):.4f}" + (f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else "")
            print(f"| {n} | {m} | {acc} | {statistics.mean(r['wall'] for r in rs):.0f} | "
                  f"{rs[0]['latched']}/{rs[0]['layers']} |")
    if before.is_file():
        print("\nSelection of the pretrained (Fashion-MNIST) network:\n```\n" + before.read_text() + "```")
    for m in ("keep", "reopen", "scratch"):
        r = next(r for r in results if r["mode"] == m)
        print(f"\nSelection after fine-tuning ({m}, {r['n']} images):\n```\n{r['selection']}```")


if __name__ == "__main__":
    main()
