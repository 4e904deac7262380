"""The real small segmentation run: DeepLabV3 (mmseg) on the nuclei image shipped in the stardist wheel,
fine-tuned from our own Fashion-MNIST classification checkpoints, one row per normalizer.

    python benchmarks/seg_real_run.py                       # ssn, bn, gn with the configs' budget
    python benchmarks/seg_real_run.py --norms ssn --steps 60 --crop 64 --batch 4

1. Data: ``stardist/data/images/{img2d,mask2d}.tif`` (a real 512x512 fluorescence image with its
   instance mask, Kaggle DSB 2018, CC0; read with tifffile, stardist itself is not imported) ->
   binary labels (background 0 / nucleus 1); the left 384 columns train, the right 128 columns are
   held out for validation; written in mmseg's layout under ``OUT/data``.
2. Backbone: a torchvision ResNet-18 (one input channel) trained here on real Fashion-MNIST with the
   same normalizer through ``tasks.cli.run`` (the arguments are printed; reused when its
   ``last.ckpt`` exists), passed as ``--model.init_args.pretrained`` (the task's shared loading:
   backbone without ``fc``, ratios and latches kept).
3. Segmentation: ``configs/nuclei/deeplabv3_r18_nuclei-128x128.yaml`` with the normalizer's overlays through
   ``tasks.cli.run`` (fit, validated on the held-out part at the last step). Each run's
   ``summary.json`` gives the table (the report's writer: mIoU / mAcc / aAcc, fit seconds) against
   the best all-one-class prediction, and the per-layer selection of backbone and heads for SN/SSN;
   writes ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.callbacks import selection_table
from tasks.cli import run as run_cli
from tasks.report import aggregate, load_records, markdown_table
from tasks.sweep import config_args

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("val/mIoU", "val/mAcc", "val/aAcc", "fit_seconds")
PARTS = ("backbone", "decode_head", "auxiliary_head")  # the SemanticSegmenter's model.<part>


def prepare_nuclei(out: Path, split_col: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """Write the stardist nuclei image/mask as mmseg folders; returns the held-out label."""
    import cv2
    import tifffile

    spec = importlib.util.find_spec("stardist")  # NOTE: locates the wheel without importing it
    if spec is None or spec.origin is None:
        raise SystemExit(
            "needs the stardist wheel's data: pip install --no-deps stardist==0.9.2 "
            "(see requirements/extras-seg.txt)"
        )
    images = Path(spec.origin).parent / "data" / "images"
    img, mask = tifffile.imread(images / "img2d.tif"), tifffile.imread(images / "mask2d.tif")
    if img.shape != mask.shape or img.max() > 255:
        raise SystemExit(f"unexpected nuclei data: image {img.shape} max {img.max()}, mask {mask.shape}")
    img, label = img.astype(np.uint8), (mask > 0).astype(np.uint8)
    parts = {"train": np.s_[:, :split_col], "val": np.s_[:, split_col:]}
    for split, cols in parts.items():
        for sub, array in (("img_dir", img), ("ann_dir", label)):
            path = out / sub / split / "nuclei.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.ascontiguousarray(array[cols]))
    return img[parts["val"]], label[parts["val"]]


def pretrain(norm: str, root: Path, epochs: float) -> Path:
    """Our classification checkpoint for ``norm`` (ResNet-18, one channel, real Fashion-MNIST)."""
    ckpt = root / norm / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt
    args = [
        "fit",
        *config_args(ROOT / "configs/fashion_mnist/resnet_small_fashionmnist-28.yaml", norm),
        "--model.init_args.arch",
        "resnet18",
        "--trainer.max_epochs",
        str(max(1, round(epochs))),
        "--trainer.default_root_dir",
        str(root / norm),
        "--trainer.logger.init_args.save_dir",
        str(root / norm),
        "--export",
        "false",
    ]
    print("pretraining: ssn-bench", " ".join(args), flush=True)
    run_cli(args)
    return ckpt


def one_class_baseline(label: np.ndarray) -> float:
    """The best mIoU of predicting a single class everywhere (mmseg's NaN-mean over classes)."""
    from tasks.segmentation import seg_scores

    best = 0.0
    for c in (0, 1):
        cm = torch.zeros(2, 2, dtype=torch.long)
        for t in (0, 1):
            cm[t, c] = int((label == t).sum())
        best = max(best, float(seg_scores(cm)["mIoU"]))
    return best


def run(norm: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Fit ``norm``'s segmenter through the CLI; returns its ``summary.json``."""
    out = args.out / norm
    configs = config_args(ROOT / "configs/nuclei/deeplabv3_r18_nuclei-128x128.yaml", norm)
    overrides = [
        f"--data.init_args.root={data}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--export=false",
    ]
    if args.steps:
        overrides += [f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.steps}"]
    if args.crop:
        crop = f"[{args.crop}, {args.crop}]"
        overrides += [f"--data.init_args.crop_size={crop}", f"--model.init_args.crop_size={crop}"]
    if args.batch:
        overrides += [f"--data.init_args.batch_size={args.batch}"]
    if not args.scratch:
        overrides += [
            f"--model.init_args.pretrained={pretrain(norm, args.pretrained_root, args.pretrain_epochs)}"
        ]
    return run_cli(["fit", *configs, *overrides])


def part_selections(summary: dict[str, Any]) -> dict[str, str]:
    """The selection table of each part (backbone, heads) from the summary's per-layer rows."""
    tables = {}
    for part in PARTS:
        prefix = f"model.{part}."
        rows = [
            {**r, "layer": r["layer"][len(prefix) :]}
            for r in summary.get("selection") or []
            if r["layer"].startswith(prefix)
        ]
        if rows:
            tables[part] = selection_table(rows)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--norms", nargs="+", default=["ssn", "bn", "gn"])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--crop", type=int, default=None, help="training crop side (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: the config's)")
    parser.add_argument("--scratch", action="store_true", help="no pretrained backbone")
    parser.add_argument("--pretrain-epochs", type=float, default=1)
    parser.add_argument("--pretrained-root", type=Path, default=ROOT / "outputs/seg_pretrain")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/nuclei")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = args.out / "data"
    _, val_label = prepare_nuclei(data)
    baseline = one_class_baseline(val_label)
    summaries = {norm: run(norm, args, data) for norm in args.norms}
    records = load_records([args.out / norm / "summary.json" for norm in args.norms])
    group_by = ["norm", "pretrained", "global_step"]
    lines = [
        f"held-out part: {val_label.shape[1]}x{val_label.shape[0]} px, nucleus fraction "
        f"{val_label.mean():.3f}; best all-one-class mIoU {baseline:.4f}",
        "",
        markdown_table(aggregate(records, group_by, METRICS), group_by, METRICS),
    ]
    for norm, summary in summaries.items():
        for part, table in part_selections(summary).items():
            lines += ["", f"{norm} {part}:", "```", table, "```"]
    text = "\n".join(lines)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    rows = [
        {
            "norm": norm,
            "pretrained": s.get("pretrained"),
            "steps": s.get("global_step"),
            **s.get("metrics", {}),
        }
        for norm, s in summaries.items()
    ]
    (args.out / "results.json").write_text(json.dumps({"baseline_mIoU": baseline, "rows": rows}, indent=1))
    # NOTE: the run asserts learning: SSN from a classification checkpoint must clearly beat the
    # best all-one-class prediction on the held-out part.
    ssn_pre = [
        r["val/mIoU"]
        for r in rows
        if r["norm"] == "ssn" and not args.scratch and r.get("val/mIoU") is not None
    ]
    if ssn_pre and max(ssn_pre) < baseline + 0.05:
        raise SystemExit(
            f"SSN did not learn: mIoU {max(ssn_pre):.4f} against the one-class baseline {baseline:.4f}"
        )


if __name__ == "__main__":
    main()
