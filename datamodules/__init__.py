"""LightningDataModules, one file per dataset on a shared base (``base.SplitDataModule``: the loaders;
``resumable``: the exactly resumable training loader).

Classification: Fashion-MNIST (the default), scikit-learn's digits, ImageNet
(its on-disk layout). Segmentation (mmseg pipelines): Cityscapes, ADE20K, any folder in mmseg's layout.
Video: Kinetics (pytorchvideo).
"""

from .ade20k import ADE20KDataModule
from .cityscapes import CityscapesDataModule
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagenet import ImageNetDataModule
from .kinetics import KineticsDataModule
from .segmentation import SegFolderDataModule

__all__ = [
    "ADE20KDataModule",
    "CityscapesDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "KineticsDataModule",
    "SegFolderDataModule",
]
