"""LightningDataModules: ImageNet (real on-disk layout) and Fashion-MNIST (the embedded default)."""

from .ade20k import ADE20KDataModule
from .cityscapes import CityscapesDataModule
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagenet import ImageNetDataModule
from .kinetics import KineticsDataModule
from .segmentation import SegFolderDataModule

__all__ = ["ADE20KDataModule", "CityscapesDataModule", "DigitsDataModule", "FashionMNISTDataModule", "ImageNetDataModule",
           "KineticsDataModule", "SegFolderDataModule"]
