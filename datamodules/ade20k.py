"""ADE20K (SceneParsing, 150 classes) through mmseg's ``ADE20KDataset``.

Pipelines: mmseg's ``configs/_base_/datasets/ade20k.py`` (512x512 crops of images resized towards
2048x512, labels with 0 = "other" reduced to the ignore index).
"""

from __future__ import annotations

from typing import Any

from .segmentation import SegDataModule

__all__ = ["ADE20KDataModule"]

LAYOUT = """expected the ADE20K SceneParsing layout (ADEChallengeData2016.zip):
  {root}/images/training/ADE_train_00000001.jpg
  {root}/images/{{training,validation}}/*.jpg
  {root}/annotations/{{training,validation}}/*.png   (0 = other, 1..150 the classes)"""

_SPLITS = {"train": "training", "val": "validation"}


class ADE20KDataModule(SegDataModule):
    """ADE20K for semantic segmentation, mmseg's recipe.

    Args:
        root: the ``ADEChallengeData2016`` folder (see ``LAYOUT``).
        batch_size: training crops per device (mmseg: 4 per GPU x 4 GPUs).
        num_workers: DataLoader workers.
        crop_size: training crop (h, w).
        scale: mmseg's (w, h) resize target before the random ratio; validation resizes to it.
        ratio_range, cat_max_ratio: as in :class:`datamodules.CityscapesDataModule`.
    """

    num_classes = 150

    def __init__(
        self,
        root: str = "data/ade/ADEChallengeData2016",
        batch_size: int = 4,
        num_workers: int = 4,
        crop_size: tuple[int, int] = (512, 512),
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        val_batch_size: int = 1,
    ) -> None:
        super().__init__(
            root,
            batch_size,
            num_workers,
            val_batch_size,
            crop_size=crop_size,
            scale=scale,
            ratio_range=ratio_range,
            cat_max_ratio=cat_max_ratio,
        )

    def _check_layout(self) -> None:
        for sub in ("images", "annotations"):
            for split in _SPLITS.values():
                folder = self.root / sub / split
                pattern = "*.jpg" if sub == "images" else "*.png"
                if not folder.is_dir() or not any(folder.glob(pattern)):
                    raise FileNotFoundError(
                        f"no ADE20K {sub} ({pattern}) in {folder}; " + LAYOUT.format(root=self.root)
                    )

    def _dataset(self, split: str) -> Any:
        from mmseg.datasets import ADE20KDataset

        train = split == "train"
        name = _SPLITS[split]
        return ADE20KDataset(
            data_root=str(self.root),
            pipeline=self._pipeline(train),
            test_mode=not train,
            data_prefix=dict(img_path=f"images/{name}", seg_map_path=f"annotations/{name}"),
        )
