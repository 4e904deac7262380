"""Fault injection: break an ``ssn-bench`` run in the ways clusters and datasets do, and report what
survived. Every trial runs the real CLI in its own process (killed with SIGKILL where it says so).

    python benchmarks/fault_injection.py            # every trial (~5-10 min on 2 cores)
    python benchmarks/fault_injection.py --short    # kill-save and corrupt-idx (CI: tests/test_faults.py)

Trials:
  kill-train    SIGKILL mid-epoch, resume with --ckpt_path last: final weights vs the uninterrupted run
  kill-save     SIGKILL in the middle of writing last.ckpt, TMPDIR on another filesystem (/dev/shm)
  corrupt-img   ImageNet layout with 2 broken JPEGs (skipped, counted), then with every image broken
  corrupt-idx   a Fashion-MNIST root with a truncated idx file
  diverge       lr 1e4 with weight decay 1e38 (the first update overflows: stops at step 0 with the
                layer named, nothing saved); a NaN loss with
                nonfinite=skip (the step is skipped, the run finishes finite)
  compare-malformed  a sweep folder with half-written, list, empty, wrong-typed and incomplete
                summaries and a grid run without one: compare names each and reports the good runs;
                `compare RUN/summary.json` with the default --out
  typos         compare --metric/--group-by and sweep --norms/--grid typos: exit 2 at once, naming
                the valid choice, nothing started
  seg-data      Cityscapes layout with a trainId 200, a 3-channel label, a missing label, 2 images
                for batch 4, bn at batch 1 (ASPP): each refused before a step, naming the file or
                the sizes, no summary written
  video-lists   Kinetics lists with a negative label, a label past the classes, a line without
                one: refused at setup naming the list file and line
  finetune-inputs  pretrained with a NaN tensor, inside this run's checkpoint folder, the exported
                program; backbone_lr_scale -1 (each refused, nothing saved); freeze + export +
                test ends `complete`
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
FMNIST = "configs/fashion_mnist/resnet_small_fashionmnist-28.yaml"
EVERY_STEP = (
    "trainer:\n"
    "  callbacks:\n"
    "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
    "      init_args: {save_last: true, every_n_train_steps: 1}\n"
)


def compose(base: str, norm: str) -> list[str]:
    """The --config arguments of a task's base file with a normalizer's overlays."""
    overlay = Path(base).parent / "norms" / f"{norm}.yaml"
    return [
        "--config",
        base,
        "--config",
        f"configs/norms/{norm}.yaml",
        *(["--config", str(overlay)] if (ROOT / overlay).is_file() else []),
    ]


def cli(out: Path, *extra: str, norm: str = "ssn", config: str | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tasks.cli",
        "fit",
        "--config",
        "configs/base/trainer.yaml",
        *compose(config or FMNIST, norm),
        "--config",
        "configs/base/quiet.yaml",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.limit_val_batches=2",
        "--export=false",
        *extra,
    ]


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
    short = [
        "--config",
        str(tmp / "every.yaml"),
        "--trainer.limit_train_batches=5",
        "--trainer.max_epochs=2",
        "--data.batch_size=16",
    ]
    full = run(cli(tmp / "full", *short))
    killed = run(
        [*cli(tmp / "cut", *short), "--trainer.callbacks+=faults.KillAt", "--trainer.callbacks.step=3"]
    )
    resumed = run([*cli(tmp / "cut", *short), "--ckpt_path=last"])
    if full.returncode or killed.returncode != -9 or resumed.returncode:
        return (
            False,
            f"exit codes full {full.returncode}, killed {killed.returncode}, resumed {resumed.returncode}",
        )
    a = torch.load(tmp / "full/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp / "cut/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    same = sum(torch.equal(a[k], b[k]) for k in a)
    return same == len(
        a
    ), f"killed at step 3 of 10, resumed: {same}/{len(a)} tensors bit-identical to the uninterrupted run"


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
    except Exception as e:
        return False, f"last.ckpt unreadable after the kill: {e}"
    partial = len(list(path.parent.glob(".last.ckpt.*.tmp")))
    from tasks.checkpointing import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    left = sorted(p.name for p in path.parent.iterdir())
    ok = (
        kept["step"] == 1
        and torch.equal(kept["w"], torch.ones(2_000_000))
        and partial == 1
        and torch.load(path, weights_only=True)["step"] == 3
        and left == ["last.ckpt"]
    )
    return ok, (
        f"killed half-way through a save (TMPDIR={env['TMPDIR']}): last.ckpt still the previous one "
        f"(step {kept['step']}); {partial} partial file removed by the next save; folder now {left}"
    )


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
        proc = run(
            cli(
                tmp / f"out-{broken}",
                "--model.init_args.arch=resnet18",
                f"--data.init_args.root={root}",
                "--data.init_args.crop_size=32",
                "--data.init_args.resize_size=36",
                "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0",
                "--trainer.max_epochs=1",
                config="configs/imagenet/resnet50_imagenet-224.yaml",
                norm="bn",
            )
        )
        results.append((broken, proc))
    two, every = results[0][1], results[1][1]
    warned = two.stderr.count("skipping unreadable image")
    ok = (
        two.returncode == 0
        and warned == 2
        and every.returncode != 0
        and "every training batch was unreadable" in every.stderr
    )
    return ok, (
        f"2 broken JPEGs: exit {two.returncode}, {warned} logged with their paths and skipped; "
        f"every JPEG broken: exit {every.returncode}: {last_error(every)}"
    )


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
    nan_lr = run(
        cli(
            tmp / "nan-lr",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--model.init_args.lr=1e4",
            "--model.init_args.weight_decay=1e38",
        )
    )
    saved = list((tmp / "nan-lr").rglob("*.ckpt"))
    skip = run(
        cli(
            tmp / "skip",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--model.init_args.nonfinite=skip",
            "--trainer.callbacks+=faults.NaNInputAt",
            "--trainer.callbacks.step=1",
        )
    )
    final = tmp / "skip/checkpoints/last.ckpt"
    finite = final.is_file() and all(
        torch.isfinite(v).all()
        for v in torch.load(final, weights_only=True)["state_dict"].values()
        if v.is_floating_point()
    )
    ok = (
        nan_lr.returncode != 0
        and "FloatingPointError" in nan_lr.stderr
        and not saved
        and skip.returncode == 0
        and finite
    )
    return ok, (
        f"lr 1e4, weight decay 1e38: exit {nan_lr.returncode}, {len(saved)} checkpoints: "
        f"{last_error(nan_lr)}; "
        f"NaN loss with nonfinite=skip: exit {skip.returncode}, final weights finite: {finite}"
    )


# ------------------------------------------------------------------------------ compare
def _summary(norm: str, seed: int, acc: float) -> str:
    """A complete run's summary.json as RunSummary and the CLI write it (no training needed)."""
    info = {
        "task": "ImageClassifier",
        "dataset": "FashionMNISTDataModule",
        "arch": "resnet_small",
        "norm": norm,
        "batch_size": 8,
        "global_batch_size": 8,
        "seed": seed,
    }
    return json.dumps(
        {
            **info,
            "run_info": info,
            "status": "complete",
            "metrics": {"test/acc1": acc},
            "selection": [],
            "config": {"model": {"init_args": {"norm": norm, "lr": 0.1}}},
        }
    )


def compare_cli(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "tasks.cli", *args])


def trial_compare_malformed(tmp: Path) -> tuple[bool, str]:
    sweep = tmp / "sweep"
    good = {"bn-s0": _summary("bn", 0, 0.5), "bn-s1": _summary("bn", 1, 0.7)}
    bad = {
        "half-written": _summary("bn", 2, 0.9)[:90],
        "a-list": "[1, 2]",
        "empty": "",
        "metric-text": _summary("bn", 3, 0.9).replace("0.9", '"high"'),
        "fitted": _summary("bn", 4, 0.9).replace('"complete"', '"fitted"'),
    }
    for name, text in {**good, **bad}.items():
        (sweep / name).mkdir(parents=True)
        (sweep / name / "summary.json").write_text(text)
    (sweep / "grid.json").write_text(json.dumps([{"name": n} for n in [*good, *bad, "never-ran"]]))
    folder = compare_cli("compare", str(sweep), "--no-plots")
    single = compare_cli("compare", str(sweep / "bn-s0" / "summary.json"), "--no-plots")  # default --out
    named = [n for n in [*bad, "never-ran"] if f"{sweep / n}" in folder.stdout]
    mean = "0.6000 ± 0.1414" in folder.stdout
    ok = (
        folder.returncode == 0
        and len(named) == len(bad) + 1
        and mean
        and single.returncode == 0
        and (sweep / "bn-s0" / "report" / "report.md").is_file()
    )
    return ok, (
        f"{len(bad)} bad summaries ({', '.join(bad)}) and a grid run without one beside 2 good runs: "
        f"exit {folder.returncode}, {len(named)}/{len(bad) + 1} named as left out, the good pair's mean "
        f"{'reported' if mean else 'MISSING'}; one summary file with the default --out: exit "
        f"{single.returncode}, report beside it: {(sweep / 'bn-s0' / 'report' / 'report.md').is_file()}"
    )


def trial_typos(tmp: Path) -> tuple[bool, str]:
    runs = tmp / "runs"
    for name, (norm, seed, acc) in {"bn-s0": ("bn", 0, 0.5), "gn-s0": ("gn", 0, 0.6)}.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(_summary(norm, seed, acc))
    tries = {
        "compare --metric test/acc": (compare_cli("compare", str(runs), "--metric", "test/acc"), "test/acc1"),
        "compare --group-by nrom": (
            compare_cli("compare", str(runs), "--group-by", "nrom"),
            "did you mean norm",
        ),
        "sweep --norms ssm": (
            compare_cli(
                "sweep",
                "--task",
                FMNIST.format("ssn"),
                "--norms",
                "ssm",
                "--dry-run",
                "--out",
                str(tmp / "sw"),
            ),
            "unknown normalizer",
        ),
        "sweep --grid model.init_args.lrr": (
            compare_cli(
                "sweep",
                "--task",
                FMNIST.format("ssn"),
                "--grid",
                "model.init_args.lrr=0.1,0.2",
                "--dry-run",
                "--out",
                str(tmp / "sw"),
            ),
            "'lrr' is not accepted",
        ),
    }
    caught = [k for k, (proc, text) in tries.items() if proc.returncode == 2 and text in proc.stderr]
    ok = len(caught) == len(tries) and not (tmp / "sw").exists()
    return ok, (
        f"{len(caught)}/{len(tries)} typos stopped at once with a message naming the valid choice "
        f"({'; '.join(f'{k}: exit {p.returncode}' for k, (p, _) in tries.items())}); "
        f"sweep folder created: {(tmp / 'sw').exists()}"
    )


SEG_CONFIG = "configs/cityscapes/deeplabv3_r50_cityscapes-769x769.yaml"


def _cityscapes(root: Path) -> list[Path]:
    """A Cityscapes layout of 2 images (48x96: road, car, sky, ignore) per split; the train labels."""
    import cv2

    label = np.repeat(np.array([0, 13, 10, 255], np.uint8), 24)[None].repeat(48, 0)
    image = np.stack([label // 2, label // 3, label // 4], -1)
    labels = []
    for split in ("train", "val"):
        for i in range(2):
            stem = f"aachen_{i:06d}_000019"
            for path, array in (
                (root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", image),
                (root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png", label),
            ):
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), array)
            if split == "train":
                labels.append(path)
    return labels


def seg_cli(out: Path, root: Path, *extra: str) -> list[str]:
    return cli(
        out,
        f"--data.init_args.root={root}",
        "--data.init_args.num_workers=0",
        "--data.init_args.crop_size=[32, 32]",
        "--data.init_args.scale=[96, 48]",
        "--model.init_args.depth=18",
        "--model.init_args.crop_size=[32, 32]",
        "--model.init_args.test_crop_size=[32, 32]",
        "--model.init_args.test_stride=[24, 24]",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        *extra,
        config=SEG_CONFIG,
    )


def trial_seg_data(tmp: Path) -> tuple[bool, str]:
    import cv2

    tried = []
    for fault in ("trainId 200", "3-channel label", "missing label", "2 images, batch 4", "bn at batch 1"):
        root = tmp / fault.replace(" ", "-")
        labels = _cityscapes(root)
        extra: list[str] = []
        if fault == "trainId 200":
            cv2.imwrite(str(labels[0]), np.full((48, 96), 200, np.uint8))
        elif fault == "3-channel label":
            cv2.imwrite(str(labels[0]), np.zeros((48, 96, 3), np.uint8))
        elif fault == "missing label":
            labels[1].unlink()
        elif fault == "2 images, batch 4":
            extra = ["--data.init_args.batch_size=4"]
        else:
            extra = ["--data.init_args.batch_size=1", "--model.init_args.norm=bn"]
        proc = run(seg_cli(tmp / f"out-{len(tried)}", root, *extra))
        summary = tmp / f"out-{len(tried)}" / "summary.json"
        named = str(labels[0]) in proc.stderr or str(labels[1]) in proc.stderr or "batch" in last_error(proc)
        tried.append((fault, proc.returncode != 0 and named and not summary.exists(), last_error(proc)))
    return all(ok for _, ok, _ in tried), "; ".join(
        f"{fault}: {'refused' if ok else 'NOT refused'} ({err})" for fault, ok, err in tried
    )


def trial_video_lists(tmp: Path) -> tuple[bool, str]:
    tried = []
    for fault, train, val in (
        ("negative label", "v0.mp4 0\nv1.mp4 1\n", "v0.mp4 -1\n"),
        ("label past the classes", "v0.mp4 0\nv1.mp4 1\n", "v0.mp4 7\n"),
        ("no label", "v0.mp4 0\nv1.mp4\n", "v0.mp4 0\n"),
    ):
        root = tmp / fault.replace(" ", "-")
        root.mkdir()
        (root / "train.csv").write_text(train)
        (root / "val.csv").write_text(val)
        proc = run(
            cli(
                tmp / f"out-{len(tried)}",
                f"--data.init_args.root={root}",
                "--trainer.max_epochs=1",
                config="configs/clips/slow_r14_clips-64.yaml",
                norm="bn",
            )
        )
        tried.append((fault, proc.returncode != 0 and ".csv" in last_error(proc), last_error(proc)))
    return all(ok for _, ok, _ in tried), "; ".join(
        f"{fault}: {'refused' if ok else 'NOT refused'} ({err})" for fault, ok, err in tried
    )


def trial_finetune_inputs(tmp: Path) -> tuple[bool, str]:
    from tasks import ImageClassifier

    net = ImageClassifier(arch="resnet_small", num_classes=10, in_channels=1, norm="ssn").net
    sd = net.state_dict()
    sd["layers.1.0.bn1.running_var"][0] = float("nan")
    torch.save(sd, tmp / "diverged.pt")
    own = tmp / "own" / "checkpoints" / "last.ckpt"  # another run's last.ckpt in this run's folder
    own.parent.mkdir(parents=True)
    torch.save(net.state_dict(), own)
    torch.export.save(
        torch.export.export(torch.nn.Conv2d(1, 1, 1), (torch.zeros(1, 1, 2, 2),)), tmp / "model.pt2"
    )
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--data.batch_size=16"]
    tried = []
    for fault, out, source, expect in (
        ("NaN in a pretrained tensor", "nan", tmp / "diverged.pt", "layers.1.0.bn1.running_var"),
        ("pretrained in this run's checkpoint folder", "own", own, "where this run writes"),
        ("the exported program as pretrained", "pt2", tmp / "model.pt2", "model.state_dict.pt"),
        ("backbone_lr_scale -1", "negative", None, "backbone_lr_scale must be in [0, inf)"),
    ):
        extra = (
            [f"--model.init_args.pretrained={source}"]
            if source
            else ["--model.init_args.backbone_lr_scale=-1"]
        )
        proc = run(cli(tmp / out, *short, *extra))
        saved = list((tmp / out).rglob("*.ckpt")) if out != "own" else []
        tried.append((fault, proc.returncode != 0 and expect in proc.stderr and not saved, last_error(proc)))
    frozen = run([*cli(tmp / "frozen", *short, "--model.init_args.freeze=[conv1, bn1]"), "--export=true"])
    status = (
        json.loads((tmp / "frozen" / "summary.json").read_text()).get("status")
        if frozen.returncode == 0
        else None
    )
    tried.append(
        ("freeze, export and test", status == "complete", f"exit {frozen.returncode}, summary {status}")
    )
    return all(ok for _, ok, _ in tried), "; ".join(
        f"{fault}: {'handled' if ok else 'NOT handled'} ({err})" for fault, ok, err in tried
    )


TRIALS = {
    "kill-train": trial_kill_train,
    "kill-save": trial_kill_save,
    "corrupt-img": trial_corrupt_images,
    "corrupt-idx": trial_corrupt_idx,
    "diverge": trial_diverge,
    "compare-malformed": trial_compare_malformed,
    "typos": trial_typos,
    "seg-data": trial_seg_data,
    "video-lists": trial_video_lists,
    "finetune-inputs": trial_finetune_inputs,
}
SHORT = (
    "kill-save",
    "corrupt-idx",
)  # CI (tests/test_faults.py); the rest are in tests/test_resume.py, test_reliability.py


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help=f"only {', '.join(SHORT)}")
    parser.add_argument("trials", nargs="*", choices=[*TRIALS, []], help="default: all (or the short set)")
    args = parser.parse_args()
    names = args.trials or (SHORT if args.short else list(TRIALS))
    failed = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as tmp:
            start = time.perf_counter()
            ok, what = TRIALS[name](Path(tmp))
            print(
                f"[{'survived' if ok else 'FAILED'}] {name} ({time.perf_counter() - start:.0f} s): {what}",
                flush=True,
            )
            if not ok:
                failed.append(name)
    print(
        f"\n{len(names) - len(failed)}/{len(names)} faults handled"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
