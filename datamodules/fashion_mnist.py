"""Fashion-MNIST from its standard idx(.gz) files: the embedded default data of the main job."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .base import SplitDataModule

__all__ = ["FashionMNISTDataModule", "read_idx", "DEBIAN_ROOT"]

log = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]
_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (raw or gzipped): magic ``0 0 type ndim``, big-endian dims, then data.

    Raises:
        ValueError: a file that is not idx, of an unsupported type, or truncated.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_TYPES:
        raise ValueError(f"{path}: unsupported idx element type 0x{dtype:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: truncated idx header ({len(data)} bytes, expected {header} for {ndim} dimensions)"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path}: corrupt or truncated: {len(data)} bytes, expected {expected} for shape {dims}"
        )
    return np.frombuffer(data, dtype=_IDX_TYPES[dtype], offset=header).reshape(dims)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST (60k train, 10k test, 28x28 grey, 10 classes, MIT).

    The files are looked up in ``root`` (or ``root/FashionMNIST/raw``, torchvision's layout), then
    where Debian's ``dataset-fashion-mnist`` installs them; with ``download=True`` torchvision
    fetches them into ``root`` (network needed). The last ``val_size`` training images (a seeded
    permutation) are held out for validation. Augmentation (random 2-pixel shifts and horizontal
    flips) runs on whole batches after transfer, so loading costs nothing on a 2-core machine.
    ``eval_batch_size`` (default: ``batch_size``) batches validation and test: evaluation does not
    depend on it (every normalizer uses running or per-sample statistics in eval mode), so a
    small-batch study can train at 2 images per step and evaluate quickly.
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        download: bool = False,
        augment: bool = True,
        seed: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.data: dict[str, TensorDataset] = {}

    def _folders(self) -> list[Path]:
        # NOTE: a root given by the user is used or refused, never silently replaced by the system
        # copy; Debian's folder is the default only when no root was given.
        root = Path(self.hparams.root).expanduser() if self.hparams.root else None
        return [root, root / "FashionMNIST" / "raw"] if root else [DEBIAN_ROOT]

    def locate(self) -> Path:
        """The first folder holding all four idx files."""
        for folder in self._folders():
            if all(_find(folder, n) for pair in FILES.values() for n in pair):
                if not getattr(self, "_said", False):
                    log.info("Fashion-MNIST: using the idx files in %s", folder)
                    self._said = True
                return folder
        root = self._folders()[0]
        partial = [n for pair in FILES.values() for n in pair if _find(root, n)] if self.hparams.root else []
        if partial:
            missing = [n for pair in FILES.values() for n in pair if not _find(root, n)]
            raise FileNotFoundError(
                f"Fashion-MNIST root {root} holds {partial} but not {missing}: all four idx files are needed"
            )
        looked = ", ".join(str(f) for f in self._folders())
        raise FileNotFoundError(
            f"Fashion-MNIST not found (looked in {looked}). Get it with `apt-get install "
            "dataset-fashion-mnist` (Debian/Ubuntu), or put train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in a "
            "folder and pass data.root=<folder>, or pass data.download=true with a network."
        )

    def prepare_data(self) -> None:
        try:
            self.locate()
        except FileNotFoundError:
            if not (self.hparams.download and self.hparams.root):
                raise
            from torchvision.datasets import FashionMNIST

            FashionMNIST(self.hparams.root, train=True, download=True)
            FashionMNIST(self.hparams.root, train=False, download=True)

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        folder = self.locate()
        images, labels = (read_idx(_find(folder, n)) for n in FILES[split])  # type: ignore[arg-type]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        if labels.max() >= self.num_classes:
            raise ValueError(
                f"{folder}: {split} labels go up to {labels.max()}, expected < {self.num_classes}"
            )
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and "train" not in self.data:
            x, y = self._load("train")
            if not 0 <= self.hparams.val_size < len(y):
                raise ValueError(
                    f"val_size {self.hparams.val_size} must be in [0, {len(y)}): the training file "
                    f"holds {len(y)} images and at least one must remain for training"
                )
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
            val, train = order[: self.hparams.val_size], order[self.hparams.val_size :]
            self.data["train"], self.data["val"] = (
                TensorDataset(x[train], y[train]),
                TensorDataset(x[val], y[val]),
            )
        # NOTE: fit reads the test files too, so a corrupt one fails now, not after the whole fit
        if stage in (None, "fit", "test", "predict") and "test" not in self.data:
            self.data["test"] = TensorDataset(*self._load("test"))

    def _batch_size(self, train: bool) -> int:
        return self.batch_size if train else self.hparams.eval_batch_size or self.batch_size

    def _loader_options(self, train: bool) -> dict[str, Any]:
        return {"num_workers": self.hparams.num_workers, "persistent_workers": self.hparams.num_workers > 0}

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        x, y = batch
        x = (x.float() / 255 - MEAN) / STD
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            x = _shift_and_flip(x)
        return x, y


def _shift_and_flip(x: Tensor, pad: int = 2) -> Tensor:
    """Random translation by up to ``pad`` pixels (zero padding) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(-MEAN / STD))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    flip = torch.rand(n, device=x.device) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    idx = torch.arange(n, device=x.device)[:, None, None, None]
    return padded[idx, torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
