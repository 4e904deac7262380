"""Handwritten digits that scikit-learn ships (UCI optdigits test set: 1,797 images of 8x8, 10
classes), upsampled to 28x28: a second real dataset for fine-tuning the Fashion-MNIST models.

Real data, offline: ``sklearn.datasets.load_digits`` reads a file inside the scikit-learn wheel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from ssn.checks import check_range

from .base import SplitDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(SplitDataModule):
    """scikit-learn's digits at 28x28 (bilinear), split by a seeded permutation into
    ``test_size`` test, ``val_size`` validation and the rest (1,797 in all) training images.

    Args:
        batch_size: per device.
        val_size, test_size: held-out images.
        train_size: use only this many training images (None: all), for few-shot fine-tuning.
        seed: of the split (not of training).
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        batch_size: int = 64,
        val_size: int = 297,
        test_size: int = 500,
        train_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("val_size", val_size),
            ("test_size", test_size),
            ("train_size", train_size),
        ):
            check_range(name, value, "[1, inf)")
        check_range("num_workers", num_workers, "[0, inf)")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.data: dict[str, TensorDataset] = {}

    @staticmethod
    def load() -> tuple[Tensor, Tensor]:
        """All 1,797 images as (N, 1, 28, 28) float in [0, 1], and their labels."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError(
                "DigitsDataModule needs scikit-learn (pip install scikit-learn; make setup has it)"
            ) from e
        digits = load_digits()
        x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        return x, torch.from_numpy(digits.target).long()

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        x, y = self.load()
        hp = self.hparams
        if hp.val_size + hp.test_size >= len(y):
            raise ValueError(
                f"val_size + test_size = {hp.val_size + hp.test_size} leaves no training image of {len(y)}"
            )
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(hp.seed))
        test, val, train = (
            order[: hp.test_size],
            order[hp.test_size : hp.test_size + hp.val_size],
            order[hp.test_size + hp.val_size :],
        )
        if hp.train_size is not None:
            train = train[: hp.train_size]
        mean, std = x[train].mean(), x[train].std()
        norm = lambda idx: TensorDataset((x[idx] - mean) / std, y[idx])  # noqa: E731
        self.data = {"train": norm(train), "val": norm(val), "test": norm(test)}

    def _loader_options(self, train: bool) -> dict[str, Any]:
        return {"num_workers": self.hparams.num_workers}
