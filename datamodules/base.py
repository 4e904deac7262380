"""The loaders every datamodule here shares: ``setup`` fills ``self.data``, the base serves it."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from .resumable import ResumableLoader, eval_loader

__all__ = ["SplitDataModule"]


class SplitDataModule(pl.LightningDataModule):
    """A datamodule whose ``setup`` fills ``self.data`` (split name -> dataset).

    The training loader resumes exactly (:class:`~datamodules.resumable.ResumableLoader`: shuffled,
    last partial batch dropped); validation and test read in order (:func:`eval_loader`). A
    subclass says only what differs: ``_loader_options`` (workers, collate, pinning),
    ``_batch_size`` (a separate evaluation batch), ``test_split``, or ``_loader`` itself.
    """

    test_split: ClassVar[str] = "test"  # "val" where the dataset's test labels are not public
    batch_size: int
    data: dict[str, Any]

    def _loader_options(self, train: bool) -> dict[str, Any]:
        """``DataLoader`` keywords besides the dataset, batch size, ``shuffle`` and ``drop_last``."""
        return {}

    def _batch_size(self, train: bool) -> int:
        return self.batch_size

    def _loader(self, split: str, train: bool) -> DataLoader:
        cls = ResumableLoader if train else eval_loader
        return cls(
            self.data[split],
            batch_size=self._batch_size(train),
            shuffle=train,
            drop_last=train,
            **self._loader_options(train),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, False)
