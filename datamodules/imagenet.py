"""ImageNet in its standard folder layout, with the paper's augmentation."""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .base import SplitDataModule

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

    A bad sample becomes ``None`` (dropped by :func:`collate_skipping`). Bad files are marked in a
    bitmap shared with the DataLoader's worker processes, so ``skipped`` counts distinct files (a
    bad validation image seen every epoch counts once), and each is logged once with its path.
    """

    def __init__(
        self,
        root: str,
        transform: Callable | None,
        classes: list[str] | None = None,
        every_class: bool = True,
    ) -> None:
        self._classes = classes
        super().__init__(root, transform=transform, allow_empty=True)
        if every_class:  # a (training) class without images is an error that names its folder
            present = {target for _, target in self.samples}
            empty = [c for c, i in self.class_to_idx.items() if i not in present]
            if empty:
                raise FileNotFoundError(
                    f"{Path(root) / empty[0]}: class folder without images (looked for "
                    f"{', '.join(IMG_EXTENSIONS)}); {len(empty)} such: {empty[:5]}"
                )
        self._bad = mp.Array("b", max(1, len(self.samples)), lock=False)

    @property
    def skipped(self) -> int:
        return sum(self._bad[: len(self.samples)])

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
            if not self._bad[index]:
                self._bad[index] = 1
                log.warning("skipping unreadable image %s (%s)", path, e)
            return None
        return (self.transform(img) if self.transform else img), target


class Lighting:
    """AlexNet-style PCA lighting noise on a (3, H, W) tensor in [0, 1], as the SSN authors'
    ``ColorAugmentation`` (utils/imagenet_dataset.py): ``std`` 0.1, ImageNet's RGB eigenvectors."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor(
        [[0.4009, 0.7192, -0.5675], [-0.8140, -0.0045, -0.5808], [0.4203, -0.6948, -0.5836]]
    )

    def __init__(self, std: float) -> None:
        self.std = std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.normal(mean=torch.zeros(1, 3)) * self.std
        return img + ((self.EIGVAL * alpha) @ self.EIGVEC).view(3, 1, 1)


class EpochSwitch:
    """``first`` until the shared ``flag`` is set, then ``final`` (read in every worker process)."""

    def __init__(self, first: Callable, final: Callable, flag: Any) -> None:
        self.first, self.final, self.flag = first, final, flag

    def __call__(self, img: Any) -> Any:
        return (self.final if self.flag.value else self.first)(img)


def collate_skipping(batch: list[Any]) -> Any:
    """Default collation without the samples that could not be read."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return default_collate(kept)


class ImageNetDataModule(SplitDataModule):
    """ImageNet-1k (or any folder in its layout) for classification.

    Training: RandomResizedCrop(crop_size), horizontal flip, colour jitter, optional PCA lighting
    noise (the SSN authors' recipe); for the last ``final_epochs`` epochs Resize(resize_size) +
    RandomCrop(crop_size) instead of the random-resized crop (theirs: 5). Validation/test: resize
    to ``resize_size``, centre crop ``crop_size``. ``batch_size`` is per device. ``validate`` and
    ``test`` need only ``val/`` (e.g. to evaluate a released model).
    """

    in_channels = 3
    test_split = "val"  # ImageNet's test labels are not public: report val

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 8,
        crop_size: int = 224,
        resize_size: int = 256,
        color_jitter: float = 0.4,
        lighting: float = 0.0,
        final_epochs: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.root = Path(root).expanduser()
        self._classes: list[str] | None = None
        self.data: dict[str, SkippingImageFolder] = {}
        self._final = mp.Value("b", 0, lock=False)

    def _check_root(self) -> list[str]:
        train, val = self.root / "train", self.root / "val"
        if not train.is_dir() and not val.is_dir():
            raise FileNotFoundError(
                f"no ImageNet at {self.root}: {train} and {val} are missing; " + LAYOUT.format(root=self.root)
            )
        # NOTE: the class list is train's; without train/ (evaluation only) it is val's folders.
        folder = train if train.is_dir() else val
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"{folder} has no class folders; " + LAYOUT.format(root=self.root))
        if not val.is_dir():
            raise FileNotFoundError(f"{val} is missing; " + LAYOUT.format(root=self.root))
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
        """Distinct unreadable images skipped so far, over every split and worker."""
        return sum(ds.skipped for ds in self.data.values())

    def set_epoch(self, epoch: int, max_epochs: int | None) -> None:
        """Called by the task at each training epoch's start: switch to the final-epochs crop."""
        n = self.hparams.final_epochs
        self._final.value = int(bool(n and max_epochs and max_epochs > 0 and epoch >= max_epochs - n))

    def _transform(self, train: bool) -> Callable:
        hp = self.hparams
        normalize = [
            T.ToTensor(),
            *([Lighting(hp.lighting)] if train and hp.lighting else []),
            T.Normalize(MEAN, STD),
        ]
        if not train:
            return T.Compose([T.Resize(hp.resize_size), T.CenterCrop(hp.crop_size), *normalize])
        j = hp.color_jitter
        tail = [T.RandomHorizontalFlip(), T.ColorJitter(j, j, j), *normalize]
        first = T.Compose([T.RandomResizedCrop(hp.crop_size), *tail])
        if not hp.final_epochs:
            return first
        final = T.Compose([T.Resize(hp.resize_size), T.RandomCrop(hp.crop_size), *tail])
        return EpochSwitch(first, final, self._final)

    def setup(self, stage: str | None = None) -> None:
        classes = self.classes
        splits = (
            [("val", False)]
            if stage in ("validate", "test", "predict")
            else [("train", True), ("val", False)]
        )
        for split, train in splits:
            if split not in self.data:
                if not (self.root / split).is_dir():
                    raise FileNotFoundError(
                        f"{self.root / split} is missing (needed to {stage}); "
                        + LAYOUT.format(root=self.root)
                    )
                # NOTE: a val split lacking a class is legal; a training class folder without images is not
                ds = SkippingImageFolder(
                    str(self.root / split), self._transform(train), classes, every_class=train
                )
                if len(ds) == 0:
                    raise FileNotFoundError(
                        f"{self.root / split} holds no images; " + LAYOUT.format(root=self.root)
                    )
                self.data[split] = ds

    def _loader_options(self, train: bool) -> dict[str, Any]:
        w = self.hparams.num_workers
        return {
            "num_workers": w,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": w > 0,
            "collate_fn": collate_skipping,
        }
