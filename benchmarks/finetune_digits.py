"""Fine-tuning end to end on real data: the main job's SSN checkpoint (Fashion-MNIST) on scikit-learn's
handwritten digits, in `keep` and `reopen` modes, against the same network trained from scratch on
the same budget, each through ``tasks.cli.run``. Prints the report's Markdown table of the runs'
``summary.json`` (test accuracy, fit seconds, latched fractions) and the per-layer selection before
and after; heatmaps land in each run's folder.

    python benchmarks/finetune_digits.py [--pretrained outputs/checkpoints/last.ckpt]
        [--epochs 10] [--train-sizes 1000 100] [--seeds 0]

Run `make demo` first (it writes the checkpoint).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tasks.callbacks import selection_table
from tasks.cli import run as run_cli
from tasks.report import aggregate, load_records, markdown_table
from tasks.sweep import norm_overlays

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("test/acc1", "fit_seconds")
GROUP_BY = ("data.train_size", "pretrained_ratios", "pretrained")
TASK = ROOT / "configs/digits/resnet_small_digits-28.yaml"
# NOTE: the task and the SSN overlays alone, without configs/base/trainer.yaml, as these figures were
# measured (Lightning's default trainer; logger and progress bar off below)
CONFIGS = [a for f in (TASK, *norm_overlays(TASK, "ssn")) for a in ("--config", str(f))]
MODES = {
    "keep": ["--model.init_args.pretrained_ratios=keep"],
    "reopen": ["--model.init_args.pretrained_ratios=reopen"],
    "scratch": ["--model.init_args.pretrained=null"],
}


def run_dir(mode: str, train_size: int, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.out) / f"{mode}-n{train_size}-s{seed}"


def run(mode: str, train_size: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fine-tuning (or scratch) run through the CLI; returns its ``summary.json``."""
    cli_args = [
        "fit",
        *CONFIGS,
        *MODES[mode],
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={args.epochs}",
        f"--data.init_args.train_size={train_size}",
        "--data.init_args.batch_size=" + str(min(64, train_size // 2)),
        f"--trainer.default_root_dir={run_dir(mode, train_size, seed, args)}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if mode != "scratch":
        cli_args.append(f"--model.init_args.pretrained={args.pretrained}")
    return run_cli(cli_args)


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
    runs = {(m, n, s): run(m, n, s, args) for n in args.train_sizes for m in MODES for s in args.seeds}
    records = load_records([run_dir(*key, args) / "summary.json" for key in runs])
    print(
        f"\nFine-tuning on scikit-learn digits, {args.epochs} epochs, seeds {args.seeds} "
        f"(test accuracy on 500 held-out digits; pretrained — is the run from scratch)\n"
    )
    print(markdown_table(aggregate(records, GROUP_BY, METRICS), GROUP_BY, METRICS))
    if before.is_file():
        print("\nSelection of the pretrained (Fashion-MNIST) network:\n```\n" + before.read_text() + "```")
    for m in ("keep", "reopen", "scratch"):
        (mode, n, _), summary = next((k, v) for k, v in runs.items() if k[0] == m)
        print(
            f"\nSelection after fine-tuning ({mode}, {n} images):\n"
            f"```\n{selection_table(summary['selection'])}\n```"
        )


if __name__ == "__main__":
    main()
