"""ImageNet in its standard folder layout, with the paper's augmentation."""

from __future__ import annotations

import logging
import multiprocessing as mp
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

__all__ = ["ImageNetDataModule", "SkippingImageFolder"]

log = logging.getLogger(__name__)

LAYOUT = """expected the standard ImageNet layout:
  {root}/train/n01440764/n01440764_10026.JPEG
  {root}/train/<wnid>/*.JPEG        (one folder per class)
  {root}/val/n01440764/ILSVRC2012_val_00000293.JPEG
  {root}/val/<wnid>/*.JPEG          (the same class folders)"""
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SkippingImageFolder(ImageFolder):
    """ImageFolder that counts and skips unreadable or corrupt images instead of crashing.

    A bad sample becomes ``None`` (dropped by :func:`collate_skipping`); the count is shared with
    the DataLoader's worker processes, and each bad file is logged once with its path.
    """

    def __init__(self, root: str, transform: Callable | None, classes: list[str] | None = None) -> None:
        self._classes = classes
        super().__init__(root, transform=transform)
        self.skipped = mp.Value("i", 0)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._classes is None:
            return super().find_classes(directory)
        # NOTE: val uses train's class list, so a class missing from val cannot shift the labels.
        present = {p.name for p in Path(directory).iterdir() if p.is_dir()}
        unknown = sorted(present - set(self._classes))
        if unknown:
            raise ValueError(f"{directory}: class folders not in train: {unknown[:5]}")
        return self._classes, {c: i for i, c in enumerate(self._classes)}

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            with self.skipped.get_lock():
                self.skipped.value += 1
            log.warning("skipping unreadable image %s (%s)", path, e)
            return None
        return (self.transform(img) if self.transform else img), target


def collate_skipping(batch: list[Any]) -> Any:
    """Default collation without the samples that could not be read."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return default_collate(kept)


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet-1k (or any folder in its layout) for classification.

    Training: RandomResizedCrop(crop_size), horizontal flip, colour jitter (the paper's recipe);
    validation/test: resize to ``resize_size``, centre crop ``crop_size``. ``batch_size`` is per
    device; the global batch is ``batch_size * devices * num_nodes`` (see the configs).
    """

    in_channels = 3

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 8,
        crop_size: int = 224,
        resize_size: int = 256,
        color_jitter: float = 0.4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.root = Path(root).expanduser()
        self._classes: list[str] | None = None
        self.data: dict[str, SkippingImageFolder] = {}

    def _check_root(self) -> list[str]:
        train = self.root / "train"
        if not train.is_dir():
            raise FileNotFoundError(f"no ImageNet at {self.root}: {train} is missing; " + LAYOUT.format(root=self.root))
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"{train} has no class folders; " + LAYOUT.format(root=self.root))
        if not (self.root / "val").is_dir():
            raise FileNotFoundError(f"{self.root / 'val'} is missing; " + LAYOUT.format(root=self.root))
        return classes

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._classes = self._check_root()
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped_images(self) -> int:
        """Images skipped as unreadable so far, over every split and worker."""
        return sum(ds.skipped.value for ds in self.data.values())

    def _transform(self, train: bool) -> T.Compose:
        normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
        if train:
            j = self.hparams.color_jitter
            return T.Compose([T.RandomResizedCrop(self.hparams.crop_size), T.RandomHorizontalFlip(),
                              T.ColorJitter(j, j, j), *normalize])
        return T.Compose([T.Resize(self.hparams.resize_size), T.CenterCrop(self.hparams.crop_size), *normalize])

    def setup(self, stage: str | None = None) -> None:
        classes = self.classes
        for split, train in (("train", True), ("val", False)):
            if split not in self.data:
                ds = SkippingImageFolder(str(self.root / split), self._transform(train), classes)
                if len(ds) == 0:
                    raise FileNotFoundError(f"{self.root / split} holds no images; " + LAYOUT.format(root=self.root))
                self.data[split] = ds

    def _loader(self, split: str, train: bool) -> DataLoader:
        w = self.hparams.num_workers
        return DataLoader(self.data[split], batch_size=self.batch_size, shuffle=train, drop_last=train,
                          num_workers=w, pin_memory=torch.cuda.is_available(), persistent_workers=w > 0,
                          collate_fn=collate_skipping)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", False)  # ImageNet's test labels are not public: report val
