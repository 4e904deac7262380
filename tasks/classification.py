"""Image classification: torchvision ResNets (and a small ResNet for 28x28) or any timm CNN
(``timm/<name>``) with any normalizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import ssn
from ssn.checks import check_range

from .base import NormTask

__all__ = ["ImageClassifier", "SmallResNet", "build_classifier", "ARCHS"]

ARCHS = ("resnet_small", "resnet18", "resnet34", "resnet50", "resnet101", "resnet50_authors")
TIMM_PREFIX = "timm/"  # ``timm/<model name>``: any timm model that takes a norm layer (docs/integrations.md)


class SmallResNet(nn.Module):
    """A ResNet for 28x28 inputs: 3x3 stem, three stages of BasicBlocks (16/32/64 channels at
    28/14/7 pixels), global pooling. ~0.2M parameters; the same blocks as torchvision's."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: tuple[int, ...] = (1, 1, 1),
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c != w:
                down = nn.Sequential(nn.Conv2d(c, w, 1, stride=stride, bias=False), norm_layer(w))
            stage = [BasicBlock(c, w, stride, down, norm_layer=norm_layer)]
            stage += [BasicBlock(w, w, norm_layer=norm_layer) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(self.layers(x)), 1))


def _timm_classifier(
    name: str, num_classes: int, in_channels: int, norm_layer: Callable[..., nn.Module]
) -> nn.Module:
    """A randomly initialised timm model (never a download) with ``norm_layer`` for its norms."""
    import timm

    ssn.register_timm()  # its norm+act families map our layers to SwitchNormAct2d/SparseSwitchNormAct2d
    if name not in timm.list_models():
        raise KeyError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, norm_layer=norm_layer
        )
    except TypeError as e:
        if "norm_layer" not in str(e):
            raise
        raise ValueError(
            f"timm model {name!r} takes no norm_layer ({e}); build it with BatchNorm and convert it "
            "(ssn.convert_norm(model, name), which keeps its fused activations)"
        ) from e


def build_classifier(
    arch: str,
    num_classes: int,
    in_channels: int,
    norm_layer: Callable[..., nn.Module],
    zero_init_residual: bool,
) -> nn.Module:
    if arch.startswith(TIMM_PREFIX):
        return _timm_classifier(arch[len(TIMM_PREFIX) :], num_classes, in_channels, norm_layer)
    if arch not in ARCHS:
        raise KeyError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}, or timm/<name> (a timm model)")
    if arch == "resnet_small":
        model: nn.Module = SmallResNet(num_classes, in_channels, norm_layer=norm_layer)
    else:
        model = getattr(torchvision.models, arch.removesuffix("_authors"))(
            num_classes=num_classes, norm_layer=norm_layer
        )
        if arch.endswith("_authors"):  # the SSN authors' network (ssn.authors): their max-pool and dropout
            model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
            model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(0.5))
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    if zero_init_residual:  # each block starts as identity: its last norm's gamma is 0
        for m in model.modules():
            last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
            if last is not None and getattr(last, "weight", None) is not None:
                nn.init.zeros_(last.weight)
    return model


class ImageClassifier(NormTask):
    """ImageNet-style classification with a chosen normalizer (see :class:`NormTask` for the
    normalizer and optimisation arguments).

    Args:
        arch: ``resnet_small`` (28x28 inputs), ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``;
            ``resnet50_authors`` is the SSN authors' ResNet-50 (max-pool padding 0 with ceil mode,
            dropout 0.5 before ``fc``) for evaluating or fine-tuning their released checkpoints
            (with ``norm_kwargs: {in_var_correction: 1, momentum: 0.003}`` to match their layer).
            ``timm/<name>``: a timm model (``pip install ssn-bench[timm]``), randomly initialised,
            with the normalizer in every norm (ResNet/ResNeXt, RegNet, EfficientNet, DenseNet, ...;
            see docs/integrations.md); its own zero-init of residual branches applies.
        num_classes, in_channels: linked from the data module by the CLI.
        zero_init_residual: zero the gamma of each residual block's last norm.
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = True,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_range("num_classes", num_classes, "[2, inf)")
        check_range("in_channels", in_channels, "[1, inf)")
        check_range("label_smoothing", label_smoothing, "[0, 1)")
        self.net = build_classifier(arch, num_classes, in_channels, self.norm_layer(), zero_init_residual)
        self.metrics = self.accuracy_metrics(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    exportable = True  # `net` maps one image batch to logits: the CLI exports it after fit

    def pretrained_module(self) -> nn.Module:
        return self.net

    def head_prefixes(self) -> tuple[str, ...]:
        # NOTE: a timm model names its head in its config ("fc", "classifier", "head.fc")
        head = getattr(self.net, "pretrained_cfg", {}).get("classifier", "fc")
        return tuple(f"{h}." for h in ([head] if isinstance(head, str) else head))

    def pretrained_stem(self) -> str:
        # NOTE: a timm model's stem has its family's name (``conv_stem``, ``stem.conv``, a deep
        # stem's ``conv1.0``): its first convolution weight, in registration order
        if not hasattr(self.net, "pretrained_cfg"):
            return super().pretrained_stem()
        return next(k for k, v in self.net.state_dict().items() if k.endswith(".weight") and v.dim() == 4)

    def training_step(self, batch: tuple[Tensor, Tensor] | None, batch_idx: int) -> Tensor:
        if batch is None:  # every image of the batch was unreadable (counted by the data module)
            return self.skip_batch()
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor] | None, split: str) -> None:
        if batch is None:
            return
        x, y = batch
        logits = self(x)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log_accuracy(split, logits, y)

    def validation_step(self, batch: tuple[Tensor, Tensor] | None, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor] | None, batch_idx: int) -> None:
        self._eval_step(batch, "test")
