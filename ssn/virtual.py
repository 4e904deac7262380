"""Virtual devices: the per-device batch statistics of G processes, computed in one.

The paper's small-batch regime ("8 GPUs x 2 images") means BN statistics over groups of 2 inside
a global batch of 16. A layer with ``virtual_devices=G`` splits its batch (dim 0) into G equal
consecutive groups and computes the batch statistics of each group, exactly what G processes with
per-device layers compute on those chunks; its running statistics are what averaging the G
devices' buffers gives (:func:`ssn.average_running_stats`). Evaluation uses the running statistics
as usual, and per-sample statistics (IN, LN, GN) are unaffected.

Here: the checks, the grouped native batch norm (``bn`` and latched SSN layers) and
:class:`VirtualBatchNorm1d`/``2d``/``3d`` (what ``create_norm('bn', C, virtual_devices=G)``
builds). The SN/SSN mixture pools its BN statistics per group in ``ssn.stats``.

Cost (CPU, 16x64x28x28, G = 8, forward + backward, a loaded 2-core VM): the SN/SSN mixture costs one
call (the grouping is on the (N, C) statistics only; G separate calls cost ~3x); the native BN path
1.1-1.4x G separate calls (the chunks' outputs and input gradients are joined by one copy each).

NOTE: the running statistics are those of devices that keep their own buffers and average them
before evaluation (``ssn.average_running_stats``). Under ``DistributedDataParallel``'s default
``broadcast_buffers=True`` real devices instead restart every step from rank 0's buffers; outputs
and gradients in training are the same either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VirtualBatchNorm1d", "VirtualBatchNorm2d", "VirtualBatchNorm3d", "check_virtual_devices"]


def check_virtual_devices(groups: object) -> int:
    """``groups`` as a virtual-device count (a positive int), or a ValueError naming it."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"virtual_devices must be a positive int, got {groups!r}")
    return groups


def device_batch(n: int, groups: int, owner: str) -> int:
    """The per-device batch of a batch of ``n`` over ``groups`` virtual devices.

    Raises:
        ValueError: ``groups`` does not divide ``n`` (naming both).
    """
    if n % groups:
        raise ValueError(
            f"{owner}: a batch of {n} samples does not split into {groups} virtual devices "
            f"(virtual_devices={groups} must divide the batch size {n})"
        )
    return n // groups


@torch.no_grad()
def average_devices(buf: Tensor, per_device: Tensor) -> None:
    """Set ``buf`` to the mean of the ``(G, C)`` per-device buffers, in float64 as
    :func:`ssn.average_running_stats` averages the real devices' buffers."""
    buf.copy_(per_device.to(torch.float64).mean(0))


def grouped_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    groups: int,
) -> Tensor:
    """Training-mode ``F.batch_norm`` with the statistics of each of ``groups`` batch chunks.

    NOTE: one native call per chunk, on a view of ``x`` (the batch is the outermost dim in the
    contiguous and the channels-last layouts alike), so each chunk computes bit for bit what a
    device computes on it; the outputs are joined by one ``cat``. The running buffers start as G
    copies of the layer's (equal, as on devices synchronised by the last average), each updated
    by its chunk, then averaged: the result of :func:`ssn.average_running_stats` over G devices.
    """
    n = device_batch(x.shape[0], groups, "batch_norm")
    # per device: (G, C) copies of the buffers (BatchNorm keeps both or neither)
    copies = [None if buf is None else buf.expand(groups, -1).clone() for buf in (running_mean, running_var)]
    means, varis = copies
    ys = [
        F.batch_norm(
            chunk,
            None if means is None else means[g],
            None if varis is None else varis[g],
            weight,
            bias,
            True,
            momentum,
            eps,
        )
        for g, chunk in enumerate(x.split(n))
    ]
    for buf, per_device in zip((running_mean, running_var), copies, strict=True):
        if buf is not None and per_device is not None:
            average_devices(buf, per_device)
    # NOTE: torch.cat keeps the chunks' memory format (channels-last in, channels-last out)
    return torch.cat(ys)


class _VirtualBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm`` with the batch statistics of ``virtual_devices`` groups (see the module).

    A subclass, so everything that knows BatchNorm (its state_dict, ``ssn.average_running_stats``,
    ``ssn.convert_norm``, optimizer groups) knows it; with ``virtual_devices=1`` or in eval mode
    it is ``nn.BatchNorm`` exactly.
    """

    def __init__(self, num_features: int, *args: Any, virtual_devices: int = 1, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.virtual_devices = check_virtual_devices(virtual_devices)

    def forward(self, x: Tensor) -> Tensor:
        # NOTE: only batch statistics are per device (in training, and in eval without running
        # statistics, as BatchNorm decides); evaluation with running statistics is BatchNorm's own.
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats or self.virtual_devices == 1:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        batches = self.num_batches_tracked
        tracked = self.training and self.track_running_stats and batches is not None
        if tracked and batches is not None:
            batches.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(batches)
        return grouped_batch_norm(
            x,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            momentum,
            self.eps,
            self.virtual_devices,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_devices={self.virtual_devices}"


class VirtualBatchNorm1d(_VirtualBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over ``virtual_devices`` batch groups."""


class VirtualBatchNorm2d(_VirtualBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over ``virtual_devices`` batch groups."""


class VirtualBatchNorm3d(_VirtualBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` over ``virtual_devices`` batch groups."""


VIRTUAL_BN: dict[int, type[nn.Module]] = {1: VirtualBatchNorm1d, 2: VirtualBatchNorm2d, 3: VirtualBatchNorm3d}
