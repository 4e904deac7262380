"""Shared test helpers: repository paths, the Fashion-MNIST task's CLI arguments, and small
datasets written in their real layouts (ImageNet, Cityscapes, video clips), and the authors'
reference SSN network. Tests import them (``from helpers import ...``); fixtures are in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from datamodules import fashion_mnist as fm
from tasks.sweep import config_args, norm_overlays

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs/base/trainer.yaml")  # the trainer every run composes first
QUIET = str(ROOT / "configs/base/quiet.yaml")  # no progress bar or model summary in test output
FMNIST = str(ROOT / "configs/fashion_mnist/resnet_small_fashionmnist-28.yaml")
HAVE_FMNIST = (fm.DEBIAN_ROOT / "train-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist` (make test does it)"
)


def fmnist(norm: str) -> list[str]:
    """The --config arguments of the Fashion-MNIST task with this normalizer (its composition)."""
    return [a for f in (FMNIST, *norm_overlays(FMNIST, norm)) for a in ("--config", f)]


def fmnist_args(tmp_path: Path, norm: str = "ssn", *extra: str) -> list[str]:
    """A short quiet Fashion-MNIST run writing under ``tmp_path/out`` (6 training batches of 16)."""
    return fmnist_run_args(tmp_path / "out", norm, *extra)


def fmnist_run_args(out: Path, norm: str = "ssn", *extra: str) -> list[str]:
    """:func:`fmnist_args` writing under ``out``."""
    return [
        "--config",
        BASE,
        *fmnist(norm),
        "--config",
        QUIET,
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--data.batch_size=16",
        *extra,
    ]


def cityscapes_args(root: Path, out: Path, norm: str = "ssn", *extra: str) -> list[str]:
    """A two-step quiet DeepLabV3-R18 run on :func:`write_cityscapes`'s fixture, writing under ``out``."""
    return [
        *config_args(ROOT / "configs/cityscapes/deeplabv3_r50_cityscapes-769x769.yaml", norm),
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
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


# ---------------------------------------------------------------------------------- ImageNet
WNIDS = ["n01440764", "n01443537", "n01484850"]


def imagenet_fixture(root: Path, per_class: tuple[int, int] = (4, 2), corrupt: bool = True) -> None:
    """ImageNet's folder layout: a few JPEGs per class of ``WNIDS`` in train/ and val/, and with
    ``corrupt`` an unreadable and a truncated training image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, wnid in enumerate(WNIDS):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                size = (40 + 7 * i, 30 + 5 * c)
                img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c:05d}{i:03d}.JPEG"
                img.save(d / name, "JPEG")
    if corrupt:
        (root / "train" / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff not really a jpeg")
        good = (root / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG").read_bytes()
        (root / "train" / WNIDS[1] / "truncated.JPEG").write_bytes(good[:50])


# -------------------------------------------------------------------------------- Cityscapes
def png(path: Path, array: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def scene(rng: np.random.Generator, h: int, w: int, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A picture whose colour follows its label map (vertical bands), so the label is learnable."""
    label = np.zeros((h, w), np.uint8)
    for i, value in enumerate(labels):
        label[:, i * w // len(labels) :] = value
    image = (label[..., None] * np.array([37, 91, 53]) % 256 + rng.integers(0, 20, (h, w, 3))).astype(
        np.uint8
    )
    return image, label


def write_cityscapes(root: Path, n: int = 2, h: int = 48, w: int = 96, label_ids: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            stem = f"aachen_{i:06d}_000019"
            image, label = scene(rng, h, w, [0, 13, 10, 255])  # road, car, sky, ignore
            png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", image)
            if label_ids:  # the same scene in Cityscapes ids: road 7, car 26, sky 23, unlabeled 0
                ids = np.select([label == 0, label == 13, label == 10], [7, 26, 23], 0).astype(np.uint8)
                png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", ids)
            else:
                png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png", label)
    return root


# ------------------------------------------------------------------------------------ videos
def write_video(path: Path, level: int, frames: int = 12, size: tuple[int, int] = (48, 64)) -> None:
    """A real H.264 mp4 whose frames are all grey ``level`` plus faint noise (so the decoded clip
    tells which video it came from)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(level)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = np.clip(level + rng.integers(-2, 3, (*size, 3)), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


LEVELS = [30 + 20 * i for i in range(10)]  # video i of the fixture


def folder_fixture(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("archery", "bowling")) -> None:
    i = 0
    for split in ("train", "val"):
        for c in classes:
            for k in range(per_class):
                write_video(root / split / c / f"{c}_{k}.mp4", LEVELS[i % len(LEVELS)])
                i += 1


def csv_fixture(root: Path, n: int = 10) -> None:
    """``train.csv`` / ``val.csv`` with ``<path> <label>`` lines; video i has grey level LEVELS[i]."""
    lines = []
    for i in range(n):
        write_video(root / "videos" / f"v{i}.mp4", LEVELS[i])
        lines.append(f"videos/v{i}.mp4 {i % 3}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "val.csv").write_text("\n".join(lines[:4]) + "\n")


# ---------------------------------------------------- the authors' network (their code's arithmetic)
def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    zs, _ = z.sort(descending=True)
    k = torch.arange(1, z.numel() + 1, dtype=z.dtype)
    support = (1 + k * zs > zs.cumsum(0)).sum()
    tau = (zs[:support].sum() - 1) / support
    return (z - tau).clamp_min(0)


class TheirSSN2d(nn.Module):
    """Their layer's eval-mode forward as their code writes it (unbiased IN variance, LN from IN
    moments, running BN statistics, ratios from the stored weights). At radius 0 their SparsestMax
    is sparsemax; a fixed ratio's stored weight is the one-hot ratio itself."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, c, 1))
        self.register_buffer("running_var", torch.zeros(1, c, 1))
        self.register_buffer("mean_fixed", torch.LongTensor([0]))
        self.register_buffer("var_fixed", torch.LongTensor([0]))
        self.register_buffer("radius", torch.zeros(1))

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in, var_in = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in**2).mean(1, keepdim=True) - mean_ln**2
        mw = self.mean_weight if self.mean_fixed else _sparsemax(self.mean_weight)
        vw = self.var_weight if self.var_fixed else _sparsemax(self.var_weight)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * self.running_mean
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * self.running_var
        x = (x - mean) / (var + 1e-5).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def their_model(num_classes: int) -> nn.Module:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(num_classes=num_classes, norm_layer=TheirSSN2d)
    model.maxpool = nn.MaxPool2d(3, 2, padding=0, ceil_mode=True)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, TheirSSN2d)):
            c = m.weight.shape[1]
            m.weight.uniform_(0.5, 1.0, generator=g)
            m.bias.normal_(0, 0.1, generator=g)
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            if i % 3 == 0:  # latched, possibly on different statistics for mean and variance
                m.mean_weight.copy_(torch.eye(3)[i % 2 * 2])
                m.var_weight.copy_(torch.eye(3)[(i // 3) % 3])
                m.mean_fixed.fill_(1), m.var_fixed.fill_(1)
            else:  # dense: sparsemax of the stored logits
                m.mean_weight.copy_(torch.rand(3, generator=g))
                m.var_weight.copy_(torch.rand(3, generator=g))
            assert c == m.running_mean.shape[1]
    return model.eval()


def their_state_dict(model: nn.Module) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("fc.1.", "fc.")
        parts = k.split(".")
        parts = [p.replace("bn", "sn") if p.startswith("bn") else p for p in parts]
        out["module." + ".".join(parts)] = v
    return {"state_dict": out, "epoch": 100, "arch": "resnet50"}


# ------------------------------------------------------------------------- run summaries
def run_summary(norm: str, bs: int, seed: int, acc: float, *, lr: float = 0.1, latches=None) -> dict:
    """A run's summary.json as tasks.summary writes it, with the given values."""
    selection = [
        {
            "layer": f"net.l{i}",
            "mean_in": 0.0,
            "mean_ln": 0.0,
            "mean_bn": 1.0,
            "var_in": 0.0,
            "var_ln": 0.0,
            "var_bn": 1.0,
            "mean_latch": m,
            "var_latch": v,
        }
        for i, (m, v) in enumerate(latches or [])
    ]
    return {
        "task": "ImageClassifier",
        "dataset": "FashionMNISTDataModule",
        "arch": "resnet_small",
        "norm": norm,
        "batch_size": bs,
        "global_batch_size": bs,
        "seed": seed,
        "status": "complete",
        "global_step": 10,
        "throughput": 100.0 * bs,
        "peak_memory_mb": 500.0 + seed,
        "peak_memory_kind": "cpu_max_rss",
        "metrics": {"test/acc1": acc, "val/acc1": acc - 0.01},
        "selection": selection,
        "config": {"model": {"class_path": "tasks.ImageClassifier", "init_args": {"lr": lr, "norm": norm}}},
    }


def write_summary(root: Path, name: str, summary: dict) -> None:
    """``summary`` as ``root/name/summary.json`` (a run folder of a sweep)."""
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(summary))


def reference(x, mean_ratio, var_ratio, weight, bias, eps, running=None):
    """The SN formula written out with plain reductions (biased variances, like the native layers), in
    the input's dtype (float64 in the tests): the reference of tests/test_norm.py and tests/test_cuda.py."""
    sp = tuple(range(2, x.dim()))
    mu_in, var_in = x.mean(sp, keepdim=True), x.var(sp, unbiased=False, keepdim=True)
    ln = (1,) + sp
    mu_ln, var_ln = x.mean(ln, keepdim=True), x.var(ln, unbiased=False, keepdim=True)
    shape = (1, -1) + (1,) * len(sp)
    if running is None:
        bn = (0,) + sp
        mu_bn, var_bn = x.mean(bn, keepdim=True), x.var(bn, unbiased=False, keepdim=True)
    else:
        mu_bn, var_bn = running[0].view(shape), running[1].view(shape)
    mean = mean_ratio[0] * mu_in + mean_ratio[1] * mu_ln + mean_ratio[2] * mu_bn
    var = var_ratio[0] * var_in + var_ratio[1] * var_ln + var_ratio[2] * var_bn
    return (x - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)
