"""2D -> 3D inflation: a torchvision ResNet state_dict into pytorchvideo's ``create_resnet`` layout.

Pure functions on state_dicts (no pytorchvideo import): the target network only supplies the
names and shapes it expects. Used by ``tasks.video.VideoClassifier.map_pretrained``.

Key mapping (torchvision -> pytorchvideo; ``i`` = stage 1..4, ``j`` = block)::

    conv1, bn1                      -> blocks.0.conv, blocks.0.norm
    layer{i}.{j}.conv{1,2,3}        -> blocks.{i}.res_blocks.{j}.branch2.conv_{a,b,c}
    layer{i}.{j}.bn{1,2,3}          -> blocks.{i}.res_blocks.{j}.branch2.norm_{a,b,c}
    layer{i}.{j}.downsample.{0,1}   -> blocks.{i}.res_blocks.{j}.branch1_{conv,norm}
    fc                              -> blocks.{5}.proj  (only when its shape fits the target)

Convolutions are inflated as in I3D: the 2D kernel is repeated over the target's temporal size
``t`` and divided by ``t``, so a clip of identical frames gives every frame the 2D response (away
from the temporal borders, where zero padding removes part of the kernel). Norm layers keep all
their tensors as they are: BN/SyncBN/GN/SN/SSN 2D and 3D layers have the same state (weight,
bias, running statistics, and for SN/SSN ratio logits, radius and latches), so a latched SSN
layer stays latched on the same statistics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["inflate_conv_weight", "inflate_resnet_state_dict", "torchvision_to_pytorchvideo_key"]

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^conv1\.weight$", "blocks.0.conv.weight"),
        (r"^bn1\.(.+)$", r"blocks.0.norm.\1"),
        (r"^layer(\d+)\.(\d+)\.conv1\.(.+)$", r"blocks.\1.res_blocks.\2.branch2.conv_a.\3"),
        (r"^layer(\d+)\.(\d+)\.conv2\.(.+)$", r"blocks.\1.res_blocks.\2.branch2.conv_b.\3"),
        (r"^layer(\d+)\.(\d+)\.conv3\.(.+)$", r"blocks.\1.res_blocks.\2.branch2.conv_c.\3"),
        (r"^layer(\d+)\.(\d+)\.bn1\.(.+)$", r"blocks.\1.res_blocks.\2.branch2.norm_a.\3"),
        (r"^layer(\d+)\.(\d+)\.bn2\.(.+)$", r"blocks.\1.res_blocks.\2.branch2.norm_b.\3"),
        (r"^layer(\d+)\.(\d+)\.bn3\.(.+)$", r"blocks.\1.res_blocks.\2.branch2.norm_c.\3"),
        (r"^layer(\d+)\.(\d+)\.downsample\.0\.(.+)$", r"blocks.\1.res_blocks.\2.branch1_conv.\3"),
        (r"^layer(\d+)\.(\d+)\.downsample\.1\.(.+)$", r"blocks.\1.res_blocks.\2.branch1_norm.\3"),
    )
)
_HEAD = re.compile(r"^fc\.(weight|bias)$")
# The convolutions of a residual block, 2-D (torchvision) and 3-D (pytorchvideo): stage, block, conv.
_BLOCK_2D = re.compile(r"^layer(\d+)\.(\d+)\.conv(\d)\.weight$")
_BLOCK_3D = re.compile(r"(?:^|\.)blocks\.(\d+)\.res_blocks\.(\d+)\.branch2\.conv_([a-z])\.weight$")
_TORCHVISION: dict[tuple[str, tuple[int, ...]], str] = {
    ("BasicBlock", (2, 2, 2, 2)): "resnet18",
    ("BasicBlock", (3, 4, 6, 3)): "resnet34",
    ("Bottleneck", (3, 4, 6, 3)): "resnet50",
    ("Bottleneck", (3, 4, 23, 3)): "resnet101",
    ("Bottleneck", (3, 8, 36, 3)): "resnet152",
}


def _blocks(keys: Iterable[str], pattern: re.Pattern[str]) -> tuple[str | None, tuple[int, ...]]:
    """Block type (``Bottleneck``: three convolutions, ``BasicBlock``: two) and blocks per stage."""
    convs: dict[int, dict[int, set[str]]] = {}
    for key in keys:
        m = pattern.search(key)
        if m:
            convs.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
    if not convs:
        return None, ()
    per_block = max(len(c) for stage in convs.values() for c in stage.values())
    return ("Bottleneck" if per_block >= 3 else "BasicBlock"), tuple(len(convs[i]) for i in sorted(convs))


def _torchvision_name(kind: str, depths: tuple[int, ...]) -> str:
    return _TORCHVISION.get((kind, depths)) or f"ResNet({kind}, {list(depths)})"


def _structures(state: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> tuple[str, bool]:
    """Both networks' block types and depths, what 2-D checkpoint would fit, and whether they differ.

    NOTE: a shape error names one tensor; the cause is usually the whole architecture (a ResNet-18
    checkpoint for a bottleneck network), which the user can only act on when told so.
    """
    src, dst = _blocks(state, _BLOCK_2D), _blocks(want, _BLOCK_3D)
    (src_kind, src_depths), (dst_kind, dst_depths) = src, dst
    if src_kind is None or dst_kind is None:
        return "", src != dst
    text = (
        f"the checkpoint is a 2-D ResNet of {src[0]} blocks with depths {src[1]} "
        f"(torchvision {_torchvision_name(src_kind, src_depths)}); the 3-D network has {dst[0]} blocks "
        f"(branch2 conv_a, conv_b{', conv_c' if dst[0] == 'Bottleneck' else ''}) with depths {dst[1]}"
    )
    if src == dst:
        return text + ": blocks and depths agree, so the channel widths differ", False
    text += (
        f". What fits: a 2-D checkpoint of {dst[0]} blocks with depths {dst[1]} "
        f"(torchvision {_torchvision_name(dst_kind, dst_depths)})"
    )
    if src[0] == "BasicBlock" and dst[0] == "Bottleneck":
        text += (
            "; pytorchvideo's create_resnet builds Bottleneck blocks only, so a BasicBlock checkpoint "
            "(resnet18/34) fits none of its networks"
        )
    elif src[0] == dst[0]:
        text += f", or a 3-D network with depths {src[1]}"
    return text, True


def torchvision_to_pytorchvideo_key(key: str, head: str = "blocks.5") -> str:
    """The pytorchvideo ``create_resnet`` name of a torchvision ResNet state_dict key.

    Args:
        key: e.g. ``layer3.0.downsample.1.mean_logits``.
        head: the prefix of the target's head (``blocks.5`` for four stages); ``fc`` maps to
            ``{head}.proj``.

    Raises:
        KeyError: a key that belongs to no torchvision ResNet (the message names it).
    """
    m = _HEAD.match(key)
    if m:
        return f"{head}.proj.{m.group(1)}"
    for pattern, repl in _RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    raise KeyError(f"{key!r} is not a torchvision ResNet key (conv1, bn1, layer<i>.<j>.*, fc)")


def inflate_conv_weight(weight: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inflate a 2D kernel (O, I, kh, kw) to the 3D ``shape`` (O, I', t, kh, kw).

    Solves: ``w3[:, :, s] = w2 / t`` for every s < t, so that a constant-in-time input gives the
    2D output. When the input channels differ and the source has one (a grey-image model on RGB
    clips), the kernel is also spread over the ``I'`` channels and divided by ``I'``: an RGB clip
    then gives the response of the 2D model to its channel mean.

    Raises:
        ValueError: shapes that no inflation relates.
    """
    o, i, kh, kw = weight.shape
    if len(shape) != 5 or (shape[0], shape[3], shape[4]) != (o, kh, kw) or (shape[1] != i and i != 1):
        raise ValueError(f"cannot inflate a conv kernel of shape {tuple(weight.shape)} into {tuple(shape)}")
    channels, t = shape[1] // i, shape[2]
    return weight.unsqueeze(2).repeat(1, channels, t, 1, 1) / (t * channels)


def inflate_resnet_state_dict(
    state: Mapping[str, Tensor],
    target: nn.Module | Mapping[str, Tensor],
    *,
    head: str | None = None,
    strict: bool = True,
) -> dict[str, Tensor]:
    """Map a torchvision-layout ResNet state_dict onto a pytorchvideo ``create_resnet`` network.

    Args:
        state: the 2D state_dict (``conv1.weight``, ``bn1.*``, ``layer1.0.bn1.mean_logits``,
            ``layer1.0.downsample.1.*``, optionally ``fc.*``), any normalizer.
        target: the 3D network (or its state_dict): supplies the names and shapes.
        head: the head prefix; found from the target's ``*.proj.weight`` when None.
        strict: refuse source keys the target lacks; with False they are passed on renamed (for a
            loader that converts between normalizers, e.g. BN statistics into an SN network).

    Returns:
        The state_dict to load into ``target``: every backbone tensor renamed, kernels inflated.
        ``fc`` becomes the head's projection only when its shape fits (same number of classes);
        otherwise it is dropped and the head keeps its initialisation.

    Raises:
        KeyError: a key of ``state`` that the target does not have (e.g. a deeper source network,
            or BN statistics for an SN target), listing them.
        ValueError: a tensor whose shape does not fit the target's, naming its key in both networks,
            both networks' block types and depths, and what 2-D checkpoint would fit.
    """
    want = target.state_dict() if isinstance(target, nn.Module) else target
    if head is None:
        proj = [k for k in want if k.endswith(".proj.weight")]
        head = proj[0][: -len(".proj.weight")] if len(proj) == 1 else "blocks.5"
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        new = torchvision_to_pytorchvideo_key(key, head)
        if new not in want:
            if not strict and not _HEAD.match(key):
                out[new] = value
            elif not _HEAD.match(key):
                unexpected.append(f"{key} -> {new}")
            continue
        shape = want[new].shape
        if _HEAD.match(key) and value.shape != shape:
            continue  # a new number of classes: the head stays new
        try:
            if value.dim() == 4 and len(shape) == 5:
                value = inflate_conv_weight(value, shape)
            elif value.shape != shape:
                raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(shape)}")
        except ValueError as e:
            why, _ = _structures(state, want)
            raise ValueError(f"{key} -> {new}: {e}" + (f"; {why}" if why else "")) from None
        out[new] = value
    if unexpected:
        why, differ = _structures(state, want)
        raise KeyError(
            f"{len(unexpected)} keys have no place in the 3D network: {unexpected[:8]}"
            + (f"; {why}" if why and differ else "")
        )
    return out
