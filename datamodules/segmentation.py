"""What the segmentation data modules share: mmseg datasets and pipelines, skipping of unreadable
files, loaders.

The pipelines are mmseg's standard ones (``mmseg/.mim/configs/_base_/datasets/cityscapes*.py``,
``ade20k.py``): training RandomResize + RandomCrop(cat_max_ratio) + RandomFlip +
PhotoMetricDistortion; evaluation Resize and the label at its original size.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ssn.checks import check_range

from .base import SplitDataModule

__all__ = [
    "CheckLabel",
    "SegDataModule",
    "SegFolderDataModule",
    "SkippingSegDataset",
    "collate_skipping",
    "readable",
]

log = logging.getLogger(__name__)
_IMAGE, _LABEL = 1, 2  # flags of a sample's unreadable files


def readable(path: str | Path) -> bool:
    """Whether OpenCV (mmcv's default image backend) can decode the image file."""
    import cv2

    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return False
    return data.size > 0 and cv2.imdecode(data, cv2.IMREAD_UNCHANGED) is not None


class CheckLabel:
    """Pipeline step after ``LoadAnnotations``: the label must be one channel of class indices
    (``0 .. num_classes - 1`` or ``ignore_index``) at its image's original size.

    NOTE: mmseg would otherwise resize/crop image and label with the wrong correspondence, or fail
    deep inside a transform, the loss or the metric ("Target 200 is out of bounds", a device-side
    assert on CUDA), only once a crop happens to contain the value, naming no file.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __call__(self, results: dict[str, Any]) -> dict[str, Any]:
        label, path = results["gt_seg_map"], results["seg_map_path"]
        if label.ndim != 2:
            raise ValueError(
                f"label {path} has shape {label.shape}: expected one channel of class indices "
                "(a single-channel PNG), not a colour image"
            )
        if tuple(label.shape) != tuple(results["ori_shape"][:2]):
            (h, w), (ih, iw) = label.shape, results["ori_shape"][:2]
            raise ValueError(
                f"label {path} is {w}x{h} (w x h) but its image {results['img_path']} is {iw}x{ih}: "
                "a label must have its image's size"
            )
        values = np.unique(label)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if bad.size:
            # NOTE: ADE20K's labels are reduced (0 -> ignore, k -> k - 1) when read: name the file's values
            shift = 1 if results.get("reduce_zero_label") else 0
            reduced = ", read with 0 as ignore" if shift else ""
            raise ValueError(
                f"label {path} holds values {(bad + shift).tolist()[:10]} outside the "
                f"{self.num_classes} classes (0..{self.num_classes - 1 + shift}{reduced}) and the "
                f"ignore index {self.ignore_index}"
            )
        return results

    def __repr__(self) -> str:
        return f"CheckLabel(num_classes={self.num_classes}, ignore_index={self.ignore_index})"


def train_pipeline(
    scale: tuple[int, int],
    crop_size: tuple[int, int],
    check: CheckLabel,
    *,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    photometric: bool = True,
    color_type: str = "color",
) -> list[Any]:
    """mmseg's standard training pipeline (``crop_size`` is (h, w), ``scale`` mmseg's (w, h))."""
    steps: list[Any] = [
        dict(type="LoadImageFromFile", color_type=color_type),
        dict(type="LoadAnnotations"),
        check,
        dict(type="RandomResize", scale=tuple(scale), ratio_range=tuple(ratio_range), keep_ratio=True),
        dict(type="RandomCrop", crop_size=tuple(crop_size), cat_max_ratio=cat_max_ratio),
        dict(type="RandomFlip", prob=0.5),
    ]
    if photometric:
        steps.append(dict(type="PhotoMetricDistortion"))
    return [*steps, dict(type="PackSegInputs")]


def test_pipeline(
    scale: tuple[int, int] | None, check: CheckLabel, *, color_type: str = "color"
) -> list[Any]:
    """mmseg's evaluation pipeline: resize the image (keep ratio), the label stays at full size."""
    resize = [dict(type="Resize", scale=tuple(scale), keep_ratio=True)] if scale else []
    return [
        dict(type="LoadImageFromFile", color_type=color_type),
        *resize,
        dict(type="LoadAnnotations"),
        check,
        dict(type="PackSegInputs"),
    ]


class SkippingSegDataset(Dataset):
    """An mmseg dataset whose samples with an unreadable image or label are skipped (``None``).

    Each unreadable file is logged once with its path and counted once (:attr:`skipped`), over
    every DataLoader worker; any other failure (e.g. a label of the wrong size, channels or
    values: :class:`CheckLabel`) is raised. A missing label file is refused at setup.
    """

    def __init__(self, dataset: Any, repeat: int = 1) -> None:
        self.dataset, self.repeat = dataset, repeat
        # NOTE: per-sample flags in shared memory: workers see each other's finds, so a file is
        # counted once however many epochs or workers meet it.
        self._bad = mp.Array("b", len(dataset))

    def __len__(self) -> int:
        return len(self.dataset) * self.repeat

    @property
    def skipped(self) -> int:
        """Distinct unreadable files met so far (image and label of a sample count apart)."""
        return sum(bin(f).count("1") for f in self._bad[:])

    def __getitem__(self, index: int) -> Any:
        index %= len(self.dataset)
        info = self.dataset.get_data_info(index)
        if self._bad[index]:
            return None
        try:
            return self.dataset.pipeline(info)
        except Exception:
            flags = (_IMAGE * (not readable(info["img_path"]))) | (
                _LABEL * (not readable(info["seg_map_path"]))
            )
            if not flags:
                raise  # both files decode: a real error, not a corrupt file
            with self._bad.get_lock():
                new = flags & ~self._bad[index]
                self._bad[index] |= flags
            for flag, key in ((_IMAGE, "img_path"), (_LABEL, "seg_map_path")):
                if new & flag:
                    log.warning(
                        "skipping unreadable %s %s", "image" if flag == _IMAGE else "label", info[key]
                    )
            return None


def _check_labels_exist(dataset: Any, split: str) -> None:
    """Every image of ``split`` has its label file: one that is missing is a layout error (a
    misnamed or uncopied file), not a corrupt sample to skip."""
    infos = (dataset.get_data_info(i) for i in range(len(dataset)))
    missing = [
        (info["img_path"], info["seg_map_path"]) for info in infos if not Path(info["seg_map_path"]).is_file()
    ]
    if missing:
        image, label = missing[0]
        raise FileNotFoundError(
            f"{len(missing)} {split} image(s) have no label file, e.g. {image}: no {label}; "
            "every image needs its label (a missing one is a layout error, not a corrupt file)"
        )


def collate_skipping(batch: list[Any]) -> dict[str, list[Any]] | None:
    """mmengine's ``pseudo_collate`` (lists of images and SegDataSamples) without skipped samples."""
    from mmengine.dataset import pseudo_collate

    kept = [b for b in batch if b is not None]
    return pseudo_collate(kept) if kept else None


class SegDataModule(SplitDataModule):
    """Base of the segmentation data modules: an mmseg dataset per split, skipping, loaders.

    Subclasses set ``num_classes`` and implement :meth:`_check_layout` (fail early with the
    expected layout) and :meth:`_dataset`. ``batch_size`` is per device (training); evaluation
    runs ``val_batch_size`` whole images (1, as mmseg: images may differ in size).
    """

    num_classes: int
    ignore_index: int = 255  # mmseg's; the label value that is no class
    in_channels: int = 3
    color_type: str = "color"
    photometric: bool = True
    test_split = "val"  # Cityscapes' and ADE20K's test labels are not public

    def __init__(
        self,
        root: str,
        batch_size: int,
        num_workers: int,
        val_batch_size: int = 1,
        repeat: int = 1,
        *,
        crop_size: tuple[int, int],
        scale: tuple[int, int],
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("val_batch_size", val_batch_size),
            ("repeat", repeat),
            *(("crop_size (each side)", v) for v in crop_size),
            *(("scale (each side)", v) for v in scale),
        ):
            check_range(name, value, "[1, inf)")
        check_range("num_workers", num_workers, "[0, inf)")
        check_range("cat_max_ratio", cat_max_ratio, "(0, 1]")
        if not 0 < ratio_range[0] <= ratio_range[1] < math.inf:
            raise ValueError(
                f"ratio_range must be (low, high) with 0 < low <= high, got {tuple(ratio_range)}"
            )
        self.crop_size, self.scale = tuple(crop_size), tuple(scale)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.repeat = repeat
        self.data: dict[str, SkippingSegDataset] = {}
        self._check_layout()

    def _check_layout(self) -> None:
        raise NotImplementedError

    def _dataset(self, split: str) -> Any:
        """The mmseg dataset of ``split`` (``train`` or ``val``) with :meth:`_pipeline`."""
        raise NotImplementedError

    def _pipeline(self, train: bool) -> list[Any]:
        """mmseg's standard training or evaluation pipeline with this module's parameters."""
        check = CheckLabel(self.num_classes, self.ignore_index)
        if train:
            return train_pipeline(
                self.scale,
                self.crop_size,
                check,
                ratio_range=self.ratio_range,
                cat_max_ratio=self.cat_max_ratio,
                photometric=self.photometric,
                color_type=self.color_type,
            )
        return test_pipeline(self.scale, check, color_type=self.color_type)

    @property
    def skipped_images(self) -> int:
        """Distinct unreadable files skipped so far, over every split and worker."""
        return sum(ds.skipped for ds in self.data.values())

    def setup(self, stage: str | None = None) -> None:
        from ssn.integrations import bridge_mmcv_lite

        bridge_mmcv_lite()
        from mmengine.registry import init_default_scope

        init_default_scope("mmseg")
        for split in ("train", "val"):
            if split not in self.data:
                dataset = self._dataset(split)
                _check_labels_exist(dataset, split)
                self.data[split] = SkippingSegDataset(dataset, self.repeat if split == "train" else 1)

    def _batch_size(self, train: bool) -> int:
        return self.batch_size if train else self.val_batch_size

    def _loader_options(self, train: bool) -> dict[str, Any]:
        w = self.num_workers
        return {
            "num_workers": w,
            "persistent_workers": w > 0,
            "pin_memory": torch.cuda.is_available(),
            "collate_fn": collate_skipping,
        }


FOLDER_LAYOUT = """expected mmseg's custom-dataset layout:
  {root}/img_dir/{{train,val}}/NAME{img_suffix}
  {root}/ann_dir/{{train,val}}/NAME{seg_map_suffix}   (one class index per pixel, 255 = ignore)"""


class SegFolderDataModule(SegDataModule):
    """Any images + label maps in mmseg's custom layout (``img_dir``/``ann_dir``), through mmseg's
    ``BaseSegDataset`` and the standard pipeline.

    Args:
        root: folder holding ``img_dir/{train,val}`` and ``ann_dir/{train,val}``.
        classes: class names, in label order.
        batch_size, num_workers, val_batch_size: as in :class:`SegDataModule`.
        crop_size, scale, ratio_range, cat_max_ratio: the training pipeline (see ``train_pipeline``);
            evaluation resizes images to fit ``scale`` (w, h), keeping their aspect ratio.
        grayscale: read images as one channel (``in_channels`` 1).
        photometric: PhotoMetricDistortion in training (colour images only).
        repeat: the training split is seen this many times per epoch (for a few large images).
        img_suffix, seg_map_suffix: file name endings.
    """

    def __init__(
        self,
        root: str,
        classes: list[str],
        batch_size: int = 8,
        num_workers: int = 0,
        crop_size: tuple[int, int] = (128, 128),
        scale: tuple[int, int] = (512, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        grayscale: bool = False,
        photometric: bool = True,
        repeat: int = 1,
        img_suffix: str = ".png",
        seg_map_suffix: str = ".png",
        val_batch_size: int = 1,
    ) -> None:
        if len(classes) < 2:
            raise ValueError(f"classes needs at least two names (e.g. background, object), got {classes}")
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.in_channels = 1 if grayscale else 3
        self.color_type = "grayscale" if grayscale else "color"
        self.photometric = photometric and not grayscale
        self.suffixes = (img_suffix, seg_map_suffix)
        super().__init__(
            root,
            batch_size,
            num_workers,
            val_batch_size,
            repeat,
            crop_size=crop_size,
            scale=scale,
            ratio_range=ratio_range,
            cat_max_ratio=cat_max_ratio,
        )

    def _check_layout(self) -> None:
        layout = FOLDER_LAYOUT.format(
            root=self.root, img_suffix=self.suffixes[0], seg_map_suffix=self.suffixes[1]
        )
        for sub, suffix in zip(("img_dir", "ann_dir"), self.suffixes, strict=True):
            for split in ("train", "val"):
                folder = self.root / sub / split
                if not folder.is_dir() or not any(folder.glob(f"*{suffix}")):
                    raise FileNotFoundError(f"no *{suffix} files in {folder}; {layout}")

    def _dataset(self, split: str) -> Any:
        from mmseg.datasets import BaseSegDataset

        train = split == "train"
        return BaseSegDataset(
            data_root=str(self.root),
            pipeline=self._pipeline(train),
            test_mode=not train,
            metainfo=dict(classes=tuple(self.classes)),
            img_suffix=self.suffixes[0],
            seg_map_suffix=self.suffixes[1],
            data_prefix=dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"),
        )
