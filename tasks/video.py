"""Video classification: pytorchvideo's Slow-only ResNet (``create_resnet``) with any normalizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ssn.checks import check_range
from ssn.inflate import inflate_resnet_state_dict

from .base import NormTask

__all__ = ["VideoClassifier", "build_slow_resnet", "VIDEO_ARCHS"]

# Bottlenecks per stage (res2..res5). slow_r50 is pytorchvideo's hub model; slow_r14 keeps the
# first bottleneck of each stage (same stem, widths, strides and temporal kernels): the CPU variant.
VIDEO_ARCHS = {"slow_r50": (3, 4, 6, 3), "slow_r14": (1, 1, 1, 1)}


def build_slow_resnet(
    arch: str,
    num_classes: int,
    in_channels: int,
    norm_layer: Callable[..., nn.Module],
    *,
    frames: int = 8,
    crop_size: int = 224,
    temporal_kernels: tuple[int, int, int, int] = (1, 1, 3, 3),
    dropout: float = 0.5,
    zero_init_residual: bool = True,
) -> nn.Module:
    """pytorchvideo's ``slow_r50`` (stem (1, 7, 7), conv_a temporal kernels (1, 1, 3, 3), head
    pool (frames, crop/32, crop/32) = (8, 7, 7) at 8 x 224²), with ``norm_layer`` everywhere.

    Raises:
        KeyError: an unknown ``arch``. ValueError: a crop size that 32 does not divide.
    """
    if arch not in VIDEO_ARCHS:
        raise KeyError(f"unknown arch {arch!r}; valid: {', '.join(VIDEO_ARCHS)}")
    if crop_size % 32:
        raise ValueError(f"crop_size must be a multiple of 32 (the network's stride), got {crop_size}")
    from pytorchvideo.models.resnet import create_resnet

    side = crop_size // 32
    net = create_resnet(
        input_channel=in_channels,
        model_depth=50,
        model_num_class=num_classes,
        dropout_rate=dropout,
        norm=norm_layer,
        stem_conv_kernel_size=(1, 7, 7),
        head_pool_kernel_size=(frames, side, side),
        stage_conv_a_kernel_size=tuple((t, 1, 1) for t in temporal_kernels),
    )
    for stage, depth in zip(net.blocks[1:5], VIDEO_ARCHS[arch], strict=True):
        stage.res_blocks = stage.res_blocks[:depth]
    if zero_init_residual:  # each block starts as identity, as in the SlowFast recipe
        for stage in net.blocks[1:5]:
            for block in stage.res_blocks:
                if getattr(block.branch2.norm_c, "weight", None) is not None:
                    nn.init.zeros_(block.branch2.norm_c.weight)
    return net


class VideoClassifier(NormTask):
    """Kinetics-style video classification with a chosen normalizer (see :class:`NormTask`).

    Validation scores each uniformly sampled clip; test averages the softmax over the views of
    each video (clips x crops, adjacent in the batch).

    Args:
        arch: ``slow_r50`` or ``slow_r14`` (one bottleneck per stage, for CPU runs).
        num_classes, in_channels: linked from the data module by the CLI.
        frames, crop_size: of the training clips (they size the head's pooling window).
        temporal_kernels: conv_a temporal kernel per stage (Slow: 1, 1, 3, 3).
        dropout: before the head's projection.
        zero_init_residual: zero the gamma of each block's last norm (ignored for loaded weights).
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self,
        arch: str = "slow_r50",
        num_classes: int = 400,
        in_channels: int = 3,
        frames: int = 8,
        crop_size: int = 224,
        temporal_kernels: tuple[int, int, int, int] = (1, 1, 3, 3),
        dropout: float = 0.5,
        zero_init_residual: bool = True,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value, interval in (
            ("num_classes", num_classes, "[2, inf)"),
            ("in_channels", in_channels, "[1, inf)"),
            ("frames", frames, "[1, inf)"),
            ("dropout", dropout, "[0, 1)"),
            ("label_smoothing", label_smoothing, "[0, 1)"),
        ):
            check_range(name, value, interval)
        self.net = build_slow_resnet(
            arch,
            num_classes,
            in_channels,
            self.norm_layer(dim=3),
            frames=frames,
            crop_size=crop_size,
            temporal_kernels=tuple(temporal_kernels),
            dropout=dropout,
            zero_init_residual=zero_init_residual,
        )
        self.metrics = self.accuracy_metrics(num_classes)

    # ------------------------------------------------------------------ pretrained weights
    def pretrained_module(self) -> nn.Module:
        return self.net

    def map_pretrained(self, state: Mapping[str, Tensor], target: nn.Module) -> dict[str, Tensor]:
        """Inflate a torchvision-layout ResNet state_dict into the 3D network (``ssn.inflate``).

        Keys the target lacks are passed on renamed, for the base's loader to judge or convert;
        ``fc`` becomes the head only with ``pretrained_head``.
        """
        if not self.hparams.get("pretrained_head", False):
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        return inflate_resnet_state_dict(state, target, strict=False)

    def head_prefixes(self) -> tuple[str, ...]:
        return ("blocks.5.",)

    # ------------------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _score(self, split: str, probs: Tensor, y: Tensor) -> None:
        self.log(
            f"{split}/loss", F.nll_loss(probs.clamp_min(1e-12).log(), y), sync_dist=True, batch_size=len(y)
        )
        self.log_accuracy(split, probs, y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self._score("val", self(x).softmax(-1), y)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        views = x.shape[0] // y.shape[0]
        probs = self(x).softmax(-1).unflatten(0, (y.shape[0], views)).mean(1)  # average the views
        self._score("test", probs, y)
