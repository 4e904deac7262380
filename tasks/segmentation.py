"""Semantic segmentation: mmsegmentation's DeepLabV3 (ResNet-D8 + ASPP + auxiliary FCN) with any
normalizer, trained and evaluated inside Lightning.

The network is mmseg's own, built from the config of
``mmseg/.mim/configs/_base_/models/deeplabv3_r50-d8.py`` with the torchvision-shaped backbone of
its ``deeplabv3_r{18,50}b-d8_*`` configs (type ``ResNet``) and our normalizer in every ``norm_cfg``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

import ssn
from ssn.checks import check_range

from .base import NormTask

__all__ = ["SemanticSegmenter", "deeplabv3_config", "seg_scores"]

IMAGENET_MEAN = [123.675, 116.28, 103.53]  # mmseg's data_preprocessor, on 0-255 pixels
IMAGENET_STD = [58.395, 57.12, 57.375]
# Widths of mmseg's heads: r50/r101 configs, and the r18 ones (deeplabv3_r18-d8_*).
_WIDTHS = {18: (512, 128, 256, 64), 50: (2048, 512, 1024, 256), 101: (2048, 512, 1024, 256)}


def deeplabv3_config(
    depth: int,
    num_classes: int,
    norm_cfg: dict[str, Any],
    *,
    in_channels: int = 3,
    mean: list[float] = IMAGENET_MEAN,
    std: list[float] = IMAGENET_STD,
    crop_size: tuple[int, int] | None = None,
    align_corners: bool = False,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
    test_cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """mmseg's DeepLabV3 R-D8 model config (output stride 8) with ``norm_cfg`` everywhere."""
    if depth not in _WIDTHS:
        raise KeyError(f"depth must be one of {sorted(_WIDTHS)}, got {depth!r}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need one value per input channel ({in_channels}), got {mean}, {std}")
    c4, head, c3, aux = _WIDTHS[depth]
    loss = functools.partial(dict, type="CrossEntropyLoss", use_sigmoid=False, avg_non_ignore=False)
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(
            type="SegDataPreProcessor",
            mean=list(mean),
            std=list(std),
            bgr_to_rgb=in_channels == 3,
            pad_val=0,
            seg_pad_val=ignore_index,
            # NOTE: training pads to the crop, or to a multiple of the output stride
            **(dict(size=tuple(crop_size)) if crop_size else dict(size_divisor=8)),
        ),
        backbone=dict(
            type="ResNet",
            depth=depth,
            in_channels=in_channels,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            dilations=(1, 1, 2, 4),
            strides=(1, 2, 1, 1),
            norm_cfg=norm_cfg,
            norm_eval=False,
            style="pytorch",
            contract_dilation=True,
        ),
        decode_head=dict(
            type="ASPPHead",
            in_channels=c4,
            in_index=3,
            channels=head,
            dilations=(1, 12, 24, 36),
            dropout_ratio=0.1,
            num_classes=num_classes,
            norm_cfg=norm_cfg,
            align_corners=align_corners,
            ignore_index=ignore_index,
            loss_decode=loss(loss_weight=1.0),
        ),
        auxiliary_head=dict(
            type="FCNHead",
            in_channels=c3,
            in_index=2,
            channels=aux,
            num_convs=1,
            concat_input=False,
            dropout_ratio=0.1,
            num_classes=num_classes,
            norm_cfg=norm_cfg,
            align_corners=align_corners,
            ignore_index=ignore_index,
            loss_decode=loss(loss_weight=aux_weight),
        ),
        train_cfg=dict(),
        test_cfg=test_cfg or dict(mode="whole"),
    )


def seg_scores(cm: Tensor) -> dict[str, Tensor]:
    """mmseg's ``IoUMetric`` figures from a confusion matrix ``cm[target, prediction]``.

    aAcc = correct / labelled pixels; per class IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN);
    mIoU and mAcc average the classes where they are defined (NaN-mean, as mmseg does).
    """
    cm = cm.double()
    tp, gt, pred = cm.diagonal(), cm.sum(1), cm.sum(0)
    iou, acc = tp / (gt + pred - tp), tp / gt
    return {"aAcc": tp.sum() / cm.sum(), "mIoU": iou.nanmean(), "mAcc": acc.nanmean()}


class SemanticSegmenter(NormTask):
    """DeepLabV3 (mmseg) with a chosen normalizer in the backbone and both heads.

    Every norm layer is ``ssn.create_norm(norm, C, **norm_kwargs)`` (through
    ``ssn.integrations.mm_norm_cfg``); the backbone's state_dict keys are torchvision's, so a
    classification backbone of ours loads into it (:meth:`pretrained_module`). See
    :class:`NormTask` for the normalizer, optimisation and ``pretrained`` arguments; the defaults
    are mmseg's: poly schedule (power 0.9 down to min_lr 1e-4, per step), weight decay 5e-4.

    Args:
        depth: backbone ResNet depth, 18, 50 or 101.
        num_classes, in_channels: linked from the data module by the CLI.
        mean, std: per-channel pixel normalisation on 0-255 values (mmseg's data_preprocessor).
        crop_size: (h, w) the training batch is padded to (the pipeline's crop).
        test_mode: ``whole`` image or ``slide`` windows of ``test_crop_size`` every ``test_stride``.
        align_corners: of the heads' upsampling (mmseg's 769x769 configs: True).
        aux_weight: loss weight of the auxiliary FCN head.
        ignore_index: label value that counts neither in the loss nor in the metrics.
    """

    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 19,
        in_channels: int = 3,
        mean: list[float] = IMAGENET_MEAN,
        std: list[float] = IMAGENET_STD,
        crop_size: tuple[int, int] | None = None,
        test_mode: Literal["whole", "slide"] = "whole",
        test_crop_size: tuple[int, int] | None = None,
        test_stride: tuple[int, int] | None = None,
        align_corners: bool = False,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        for key, value in (
            ("weight_decay", 5e-4),
            ("schedule", "poly"),
            ("poly_power", 0.9),
            ("min_lr", 1e-4),
        ):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        check_range("num_classes", num_classes, "[2, inf)")
        check_range("in_channels", in_channels, "[1, inf)")
        check_range("aux_weight", aux_weight, "[0, inf)")
        for name, size in (
            ("crop_size", crop_size),
            ("test_crop_size", test_crop_size),
            ("test_stride", test_stride),
        ):
            for side in size or ():
                check_range(f"{name} (each side)", side, "[1, inf)")
        if not 0 <= ignore_index <= 255 or ignore_index < num_classes:
            raise ValueError(
                f"ignore_index must be in [num_classes, 255] = [{num_classes}, 255] (a label PNG's "
                f"values, none of them a class), got {ignore_index}"
            )
        from ssn.integrations import bridge_mmcv_lite, mm_norm_cfg

        bridge_mmcv_lite()  # NOTE: before mmseg.models, which imports mmcv.ops
        from mmengine.config import ConfigDict
        from mmengine.registry import init_default_scope
        from mmseg.registry import MODELS

        test_cfg: dict[str, Any] = dict(mode=test_mode)
        if test_mode == "slide":
            if not (test_crop_size and test_stride):
                raise ValueError(
                    "test_mode 'slide' needs test_crop_size and test_stride, e.g. (769, 769), (513, 513)"
                )
            test_cfg.update(crop_size=tuple(test_crop_size), stride=tuple(test_stride))
        cfg = deeplabv3_config(
            depth,
            num_classes,
            mm_norm_cfg(self.norm, **self.norm_kwargs),
            in_channels=in_channels,
            mean=mean,
            std=std,
            crop_size=crop_size,
            align_corners=align_corners,
            aux_weight=aux_weight,
            ignore_index=ignore_index,
            test_cfg=test_cfg,
        )
        init_default_scope("mmseg")
        # NOTE: a ConfigDict, as mmseg's own tools pass: EncoderDecoder reads test_cfg.mode as an attribute.
        self.model = MODELS.build(ConfigDict(cfg))
        self._init_weights()
        if self.norm == "in":
            self._image_pool_in()
        self.num_classes = num_classes
        self.val_cm = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.test_cm = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)

    def _init_weights(self) -> None:
        """What mmengine's Runner does after building: Kaiming convs, zero-initialised residuals."""
        from mmengine.logging import MMLogger

        # NOTE: without a log file mmengine logs one INFO record per parameter (hundreds of lines).
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            self.model.init_weights()
        finally:
            logger.setLevel(level)

    def _image_pool_in(self) -> None:
        # NOTE: ASPP's image-pool branch normalises a 1x1 map, which InstanceNorm2d refuses (one
        # spatial element). Instance statistics of one pixel are the pixel itself with variance 0,
        # so IN's output there is its bias; ssn.LatchedNorm(in, in) is the same arithmetic
        # defined for 1x1 maps.
        conv = self.model.decode_head.image_pool[1]
        old = getattr(conv, conv.norm_name)
        setattr(conv, conv.norm_name, ssn.LatchedNorm(old.num_features, "in", "in", eps=old.eps))

    def pretrained_module(self) -> nn.Module:
        """The mmseg ResNet backbone: its state_dict keys are torchvision ResNet's without ``fc``."""
        return self.model.backbone

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # NOTE: ASPP's image-pool branch normalises a 1x1 map: batch statistics over one sample
        # have one value per channel, which torch's BatchNorm refuses (deep in the first step).
        # (per device: one process's batch split over its virtual devices; synchronised: all of them)
        values = self.trainer.datamodule.batch_size // self.virtual_devices
        values *= self.trainer.world_size if self.sync_stats else 1
        if ssn.NORMS[self.norm.lower()].local == "bn" and values < 2:
            raise ValueError(
                f"norm {self.norm!r} at {values} sample per batch statistic: the ASPP image-pool branch "
                "(model.decode_head.image_pool, a 1x1 map) needs at least 2 values per channel; use "
                "batch_size >= 2 (or syncbn over several devices), or a normalizer that works on one sample "
                "(gn, in, ln, sn, ssn)"
            )

    # ---------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every sample of the batch was unreadable (counted by the data module)
            return None
        data = self.model.data_preprocessor(batch, training=True)
        losses = self.model.loss(data["inputs"], data["data_samples"])
        n = len(data["data_samples"])
        for name, value in losses.items():
            self.log(f"train/{name}", value.mean(), batch_size=n, prog_bar=name == "decode.loss_ce")
        loss = sum(v for k, v in losses.items() if "loss" in k)
        self.log("train/loss", loss, batch_size=n)
        return loss

    def _eval_step(self, batch: dict[str, Any] | None, cm: MulticlassConfusionMatrix) -> None:
        if batch is None:
            return
        data = self.model.data_preprocessor(batch, training=False)
        for sample in self.model.predict(data["inputs"], data["data_samples"]):
            # NOTE: predictions are resized back to the original image, where the label is.
            cm.update(sample.pred_sem_seg.data.flatten(), sample.gt_sem_seg.data.to(self.device).flatten())

    def _log_scores(self, split: str, cm: MulticlassConfusionMatrix) -> None:
        # NOTE: compute() sums the matrices of every process, so the figures are global under DDP.
        scores = seg_scores(cm.compute())
        cm.reset()
        for name, value in scores.items():
            self.log(f"{split}/{name}", value.float(), prog_bar=name == "mIoU", sync_dist=False)

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        self._eval_step(batch, self.val_cm)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_cm)

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        self._eval_step(batch, self.test_cm)

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.test_cm)
