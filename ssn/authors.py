"""Import of the SSN authors' released ImageNet ResNet-50 checkpoints (their model zoo).

Their format, read from their code: a ResNet laid out like torchvision's but with each norm named
``sn1``/``sn2``/``sn3`` (stem ``sn1``; shortcut ``downsample.0`` conv, ``downsample.1`` norm),
possibly under a ``module.`` prefix and a ``state_dict`` key. Each norm holds ``weight``/``bias`` of
shape (1, C, 1, 1), ``mean_weight``/``var_weight`` (3,) in IN, LN, BN order, ``running_mean``/
``running_var`` of shape (1, C, 1), ``mean_fixed``/``var_fixed`` latch flags and ``radius``. A fixed
ratio's ``mean_weight`` holds the one-hot ratio itself (their code overwrites the logits when it
latches). Their instance variance is unbiased and their running averages keep 0.997 of the old
value; their network has a max-pool with padding 0 and ceil mode, and dropout 0.5 before ``fc``.

    python -m ssn.authors their_checkpoint.pth ours.pt      # convert to our state_dict
    model = authors_resnet50(); model.load_state_dict(torch.load("ours.pt"))

The written state_dict records the SparsestMax projection (``--projection``) in its metadata and
:func:`authors_resnet50`'s network restores it on ``load_state_dict``, so a mid-training checkpoint
converted with ``--projection authors`` loads back as their network.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from .functional import PROJECTIONS, authors_sparsestmax, sparsestmax
from .io import save_atomic
from .norm import STATS, SparseSwitchNorm2d
from .transfer import read_checkpoint

__all__ = ["authors_resnet50", "convert_authors_state_dict", "load_authors_checkpoint", "unfixed_layers"]

log = logging.getLogger(__name__)

AUTHORS_MOMENTUM = 0.997  # weight of the old value in their running averages
_PROJECTION_META = "ssn_projection"  # key in the metadata of the network's root module
_NORM_KEYS = (
    "weight",
    "bias",
    "mean_weight",
    "var_weight",
    "running_mean",
    "running_var",
    "mean_fixed",
    "var_fixed",
    "radius",
)


def authors_resnet50(num_classes: int = 1000, *, projection: str = "exact") -> nn.Module:
    """torchvision's ResNet-50 rebuilt as the authors' network, with our SSN layers.

    ``projection`` is the SparsestMax of the SSN layers: ``"exact"`` (ours) or ``"authors"``
    (their approximation; see :func:`unfixed_layers`). The network records it in its state_dict's
    metadata (``"ssn_projection"``) and ``load_state_dict`` restores a recorded one, so a file
    written by ``python -m ssn.authors --projection authors`` loads back as their network whatever
    ``projection`` it was built with; a state_dict without the record keeps the built one.

    Their differences are reproduced: unbiased instance variance, momentum 0.997 on the old value
    (0.003 in PyTorch's convention), max-pool with padding 0 and ceil mode, dropout 0.5 before the
    classifier (placed after the average pool, which keeps torchvision's ``fc.*`` keys).
    """
    from torchvision.models import resnet50

    def norm(c: int) -> nn.Module:
        return SparseSwitchNorm2d(
            c, momentum=1 - AUTHORS_MOMENTUM, in_var_correction=1, projection=projection
        )

    model = resnet50(num_classes=num_classes, norm_layer=norm)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(0.5))
    # NOTE: the projection is a constructor argument, not state; these hooks carry it through the
    # state_dict's metadata (the keys stay torchvision's, so other ResNets still load it strictly).
    # Public since torch 2.5; the private forms have the same signatures for torch 2.2-2.4.
    if hasattr(model, "register_state_dict_post_hook"):
        model.register_state_dict_post_hook(_record_projection)
        model.register_load_state_dict_pre_hook(_restore_projection)
    else:  # pragma: no cover - torch < 2.5
        model._register_state_dict_hook(_record_projection)
        model._register_load_state_dict_pre_hook(_restore_projection, with_module=True)
    return model


def _ssn_layers(model: nn.Module) -> list[SparseSwitchNorm2d]:
    return [m for m in model.modules() if isinstance(m, SparseSwitchNorm2d)]


def _record_projection(
    model: nn.Module, state: dict[str, Any], prefix: str, metadata: dict[str, Any]
) -> None:
    projections = {m.projection for m in _ssn_layers(model)}
    if len(projections) == 1:  # NOTE: a network whose layers were changed one by one records nothing
        metadata[_PROJECTION_META] = projections.pop()


def _restore_projection(
    model: nn.Module,
    state: dict[str, Any],
    prefix: str,
    metadata: dict[str, Any],
    strict: bool,
    missing: list[str],
    unexpected: list[str],
    errors: list[str],
) -> None:
    projection = metadata.get(_PROJECTION_META)
    if projection is None:  # no record (e.g. copied into a plain dict): keep the built projection
        return
    if projection not in PROJECTIONS:
        errors.append(
            f"the state_dict records projection {projection!r} (metadata {_PROJECTION_META!r}), "
            f"not one of {PROJECTIONS}"
        )
        return
    for m in _ssn_layers(model):
        m.projection = projection


def _our_norm_name(theirs: str) -> str:
    """``sn1`` -> ``bn1``, ``layer2.0.sn3`` -> ``layer2.0.bn3``; ``downsample.1`` is unchanged."""
    return re.sub(r"(^|\.)sn(\d)$", r"\1bn\2", theirs)


def _latch_of(flag: torch.Tensor, ratio: torch.Tensor, where: str) -> str | None:
    if not bool(flag.reshape(-1)[0]):
        return None
    if not (
        torch.isclose(ratio.max(), ratio.new_tensor(1.0))
        and torch.isclose(ratio.sum(), ratio.new_tensor(1.0))
    ):
        raise ValueError(f"{where}: marked fixed but its ratio {ratio.tolist()} is not one-hot")
    return STATS[int(ratio.argmax())]


def convert_authors_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Their state_dict (or checkpoint dict) -> the state_dict of :func:`authors_resnet50`.

    Raises:
        ValueError: anything that is not their ResNet-50 SSN layout, with what differs.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state_dict: some values are not tensors")
    norms = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".mean_weight")})
    if "sn1" not in norms or "fc.weight" not in sd:
        raise ValueError(
            "not an SSN ResNet checkpoint in the authors' layout: expected keys like 'sn1.mean_weight', "
            f"'layer1.0.sn1.weight', 'fc.weight'; found e.g. {sorted(sd)[:6]}"
        )
    out: dict[str, torch.Tensor] = {}
    for name in norms:
        missing = [k for k in _NORM_KEYS if f"{name}.{k}" not in sd]
        if missing:
            raise ValueError(f"norm {name}: missing {missing}")
        g = {k: sd.pop(f"{name}.{k}") for k in _NORM_KEYS}
        ours = _our_norm_name(name)
        c = g["weight"].numel()
        for k in ("weight", "bias", "running_mean", "running_var"):
            if g[k].numel() != c:
                raise ValueError(f"norm {name}: {k} has {g[k].numel()} values for {c} channels")
            out[f"{ours}.{k}"] = g[k].reshape(c).float()
        for k in ("mean_weight", "var_weight"):
            if g[k].shape != (3,):
                raise ValueError(
                    f"norm {name}: {k} must have 3 entries (IN, LN, BN), got {tuple(g[k].shape)}"
                )
        out[f"{ours}.mean_logits"] = g["mean_weight"].float()
        out[f"{ours}.var_logits"] = g["var_weight"].float()
        mean = _latch_of(g["mean_fixed"], g["mean_weight"], f"norm {name} mean")
        var = _latch_of(g["var_fixed"], g["var_weight"], f"norm {name} var")
        out[f"{ours}.mean_latch"] = torch.tensor(-1 if mean is None else STATS.index(mean))
        out[f"{ours}.var_latch"] = torch.tensor(-1 if var is None else STATS.index(var))
        out[f"{ours}.radius"] = g["radius"].reshape(-1)[0].float()
        out[f"{ours}.num_batches_tracked"] = torch.tensor(0)
    out.update(sd)  # convolutions and fc, same names as torchvision's
    return out


@torch.no_grad()
def unfixed_layers(model: nn.Module) -> list[tuple[str, float, float]]:
    """The SSN layers with a ratio not yet fixed (latched) at a radius above 0, each with its
    radius and how far apart the two projections put its ratios (max abs difference).

    Their ratios depend on the projection: the authors' code measures the radius from the centroid
    of sparsemax's support (the midpoint of an edge when two statistics are left) rather than the
    simplex centre, so ``projection="exact"`` builds a different network from a mid-training
    checkpoint than their code did; ``projection="authors"`` reproduces theirs.
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, SparseSwitchNorm2d) and None in m.latched and float(m.radius) > 0:
            logits = torch.stack([m.mean_logits, m.var_logits]).double()
            r = float(m.radius)
            diff = (sparsestmax(logits, r) - authors_sparsestmax(logits, r)).abs().max()
            out.append((name, r, float(diff)))
    return out


def load_authors_checkpoint(
    path: str | os.PathLike, *, trusted: bool = False, projection: str = "exact"
) -> nn.Module:
    """Build :func:`authors_resnet50` and load the authors' checkpoint file into it.

    Args:
        path: their ``.pth`` file.
        trusted: allow unpickling arbitrary objects (their files may hold training state such as
            numpy scalars, which ``torch.load(weights_only=True)`` refuses). Only for files you trust.
        projection: SparsestMax of the rebuilt layers. Irrelevant for a fully fixed (released)
            model; for a mid-training one ``"authors"`` reproduces their network, ``"exact"``
            (default) continues with the exact projection. Unfixed layers are logged with the
            difference it makes (:func:`unfixed_layers`).

    Raises:
        FileNotFoundError, ValueError: a missing, corrupt or mismatching file, with the reason.
    """
    # NOTE: their files may hold training state (numpy scalars) that only ``trusted`` unpickles
    state = read_checkpoint(path, trusted=trusted, allow_hint="trusted=True, or --trusted")
    ours = convert_authors_state_dict(state)
    model = authors_resnet50(num_classes=ours["fc.weight"].shape[0], projection=projection)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not the authors' ResNet-50: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bad = [k for k, v in ours.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(
            f"{path}: shape mismatch for {bad[:5]}, e.g. {bad[0]}: "
            f"{tuple(ours[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}"
        )
    model.load_state_dict(ours)
    unfixed = unfixed_layers(model)
    if unfixed:
        worst = max(d for _, _, d in unfixed)
        log.warning(
            "%s: %d SSN layers are not fixed yet (a mid-training checkpoint): %s. Their ratios depend on "
            "the projection (max difference between the exact and the authors' one: %.3g); loaded with "
            "projection=%r%s.",
            path,
            len(unfixed),
            ", ".join(f"{n} (r={r:.3f})" for n, r, _ in unfixed),
            worst,
            projection,
            "" if projection == "authors" else ", pass projection='authors' to reproduce their network",
        )
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert an SSN authors' ResNet-50 checkpoint to ours.")
    ap.add_argument("src", help="their .pth file")
    ap.add_argument(
        "dst",
        help="where to write our state_dict: authors_resnet50().load_state_dict("
        "torch.load(dst)) rebuilds the network, projection included",
    )
    ap.add_argument("--trusted", action="store_true", help="allow non-tensor objects in the file")
    ap.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default="exact",
        help="SparsestMax of layers not yet fixed (mid-training checkpoints); recorded in the "
        "file and restored by load_state_dict",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_authors_checkpoint(args.src, trusted=args.trusted, projection=args.projection)
    save_atomic(model.state_dict(), args.dst)
    latched = sum(all(m.latched) for m in model.modules() if isinstance(m, SparseSwitchNorm2d))
    total = sum(isinstance(m, SparseSwitchNorm2d) for m in model.modules())
    fc = model.get_submodule("fc")
    assert isinstance(fc, nn.Linear)  # torchvision's classifier
    print(
        f"wrote {args.dst}: ResNet-50, {fc.out_features} classes, {latched}/{total} SSN layers "
        f"latched, projection={args.projection!r}"
    )


if __name__ == "__main__":
    main()
