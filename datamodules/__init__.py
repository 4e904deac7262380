"""LightningDataModules: ImageNet (real on-disk layout) and Fashion-MNIST (the embedded default)."""

from .fashion_mnist import FashionMNISTDataModule
from .imagenet import ImageNetDataModule

__all__ = ["FashionMNISTDataModule", "ImageNetDataModule"]
