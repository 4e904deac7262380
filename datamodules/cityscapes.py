"""Cityscapes (fine annotations, 19 classes) through mmseg's ``CityscapesDataset``.

Pipelines: mmseg's ``configs/_base_/datasets/cityscapes_769x769.py`` (and ``cityscapes.py`` for
512x1024). ``python -m datamodules.cityscapes ROOT`` writes the ``*_gtFine_labelTrainIds.png``
files from the ``*_gtFine_labelIds.png`` ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .segmentation import SegDataModule

__all__ = ["CityscapesDataModule", "LABEL_TO_TRAIN_ID", "convert_label_ids"]

LAYOUT = """expected the Cityscapes layout (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip):
  {root}/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
  {root}/leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png
  {root}/gtFine/{{train,val}}/<city>/*_gtFine_labelTrainIds.png   (19 train ids, 255 = ignore)"""

# Cityscapes label id -> train id (cityscapesscripts/helpers/labels.py; 255: not evaluated).
LABEL_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def convert_label_ids(root: str | Path) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` beside every ``*_gtFine_labelIds.png`` under
    ``root/gtFine``; returns how many were written."""
    import cv2

    lut = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    count = 0
    for path in sorted(Path(root, "gtFine").rglob("*_gtFine_labelIds.png")):
        ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if ids is None:
            raise OSError(f"cannot read {path}")
        out = path.with_name(path.name.replace("_labelIds.png", "_labelTrainIds.png"))
        if not cv2.imwrite(str(out), lut[ids]):
            raise OSError(f"cannot write {out}")
        count += 1
    return count


class CityscapesDataModule(SegDataModule):
    """Cityscapes for semantic segmentation, mmseg's recipe.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/`` (see ``LAYOUT``).
        batch_size: training crops per device (mmseg: 2 per GPU x 4 GPUs).
        num_workers: DataLoader workers.
        crop_size: training crop (h, w): (769, 769) or (512, 1024).
        scale: mmseg's (w, h) resize target before the random ratio: (2049, 1025) for the 769
            crop, (2048, 1024) for 512x1024; validation resizes to it.
        ratio_range: random resize ratios.
        cat_max_ratio: a crop is re-drawn (up to 10 times) while one class covers more than this.
    """

    num_classes = 19

    def __init__(
        self,
        root: str = "data/cityscapes",
        batch_size: int = 2,
        num_workers: int = 4,
        crop_size: tuple[int, int] = (769, 769),
        scale: tuple[int, int] = (2049, 1025),
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
        layout = LAYOUT.format(root=self.root)
        for split in ("train", "val"):
            images = self.root / "leftImg8bit" / split
            if not images.is_dir() or not any(images.glob("*/*_leftImg8bit.png")):
                raise FileNotFoundError(f"no Cityscapes images in {images}; {layout}")
            labels = self.root / "gtFine" / split
            if not any(labels.glob("*/*_gtFine_labelTrainIds.png")):
                if any(labels.glob("*/*_gtFine_labelIds.png")):
                    raise FileNotFoundError(
                        f"{labels} has *_gtFine_labelIds.png but no *_gtFine_labelTrainIds.png (the 19 "
                        f"training ids); write them with:\n  python -m datamodules.cityscapes {self.root}"
                    )
                raise FileNotFoundError(f"no Cityscapes labels in {labels}; {layout}")

    def _dataset(self, split: str) -> Any:
        from mmseg.datasets import CityscapesDataset

        train = split == "train"
        return CityscapesDataset(
            data_root=str(self.root),
            pipeline=self._pipeline(train),
            test_mode=not train,
            data_prefix=dict(img_path=f"leftImg8bit/{split}", seg_map_path=f"gtFine/{split}"),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="write Cityscapes *_gtFine_labelTrainIds.png from *_labelIds.png"
    )
    parser.add_argument("root", help="the Cityscapes folder (holding gtFine/)")
    n = convert_label_ids(parser.parse_args(argv).root)
    print(f"wrote {n} *_gtFine_labelTrainIds.png files")


if __name__ == "__main__":
    main()
