"""SSN in mmengine's own Runner (ssn.integrations.mmengine_hooks): the example config, the radius
ramp and latches through a real Runner on the Cityscapes fixture, save/resume, the ratio parameter
group and gradient clip, norm_eval, and the round trip with the Lightning task's ``pretrained``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from mmengine.hooks import Hook
from torch import nn

import ssn

from helpers import ROOT, write_cityscapes

EXAMPLE = ROOT / "configs/mmseg/deeplabv3_r50_ssn_cityscapes-769x769.py"
ITERS, SAVE_AT = 6, 3
# delay 1 iteration, ramp over 3 from 0 to 1: written out, and checked against ssn.radius_at below
RADII = [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0]
HOOK = dict(type="SSNRadiusHook", end=1.0, delay_fraction=1 / 6, ramp_fraction=0.5, ratio_grad_clip=1.0)


@pytest.fixture(scope="module")
def mm():
    from mmengine.registry import init_default_scope

    import ssn.integrations.mmengine_hooks as hooks  # registers SSN, SSNRadiusHook; bridges mmcv-lite

    init_default_scope("mmseg")
    return hooks


def tiny_cfg(data: Path, work_dir: Path, **changes: Any):
    """The example config, shrunk: ResNet-18 (the Lightning task's depth-18 widths), 32x64 images,
    6 iterations on CPU. Deterministic (no random augmentation, no dropout, no shuffling), so that
    a resumed run is the same computation as the uninterrupted one."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(EXAMPLE))
    size = (32, 64)
    cfg.model.data_preprocessor.size = size
    cfg.model.backbone.depth = 18
    cfg.model.decode_head.update(in_channels=512, channels=128, dropout_ratio=0.0, num_classes=19)
    cfg.model.auxiliary_head.update(in_channels=256, channels=64, dropout_ratio=0.0)
    cfg.model.test_cfg = dict(mode="whole")
    # NOTE: the fixture's images are written at the crop size, so no resizing is needed
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    for loader, shuffle in ((cfg.train_dataloader, False), (cfg.val_dataloader, False)):
        loader.update(batch_size=2, num_workers=0, persistent_workers=False)
        loader.sampler.shuffle = shuffle
        loader.dataset.update(data_root=str(data), pipeline=pipeline)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.param_scheduler[0].end = ITERS
    cfg.train_cfg.update(max_iters=ITERS, val_interval=ITERS)
    cfg.default_hooks.checkpoint.interval = SAVE_AT
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.pop("visualization")  # draws nothing by default; saves building the visualizer hook
    cfg.custom_hooks = [dict(HOOK)]
    cfg.env_cfg = dict(
        cudnn_benchmark=False,
        mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
        dist_cfg=dict(backend="gloo"),
    )
    cfg.randomness = dict(seed=0)
    cfg.log_level = "WARNING"
    cfg.work_dir = str(work_dir)
    cfg.update(changes)
    return cfg


class Recorder(Hook):
    """Reads the model after SSNRadiusHook's before_train_iter (lower priority: it runs later)."""

    priority = "NORMAL"

    def __init__(self) -> None:
        self.radius: dict[int, set[float]] = {}
        self.latched: dict[int, int] = {}

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        layers = [m for _, m in ssn.switch_norms(runner.model) if isinstance(m, ssn.SparseSwitchNormBase)]
        self.radius[runner.iter] = {float(m.radius) for m in layers}
        self.latched[runner.iter] = sum(v is not None for m in layers for v in m.latched)


def _run(cfg) -> tuple[Any, Recorder]:
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    recorder = Recorder()
    runner.register_hook(recorder, priority="NORMAL")
    runner.train()
    return runner, recorder


def _ssn_state(model: nn.Module) -> dict[str, Any]:
    return {n: (float(m.radius), m.latched) for n, m in ssn.switch_norms(model)}


# ---------------------------------------------------------------------------------- the Runner
@pytest.mark.slow
def test_runner_ramps_latches_resumes_and_round_trips_with_pretrained(mm, tmp_path, caplog):
    """One fixture, one uninterrupted run and one resumed from its middle checkpoint (~the time of
    9 training iterations of a ResNet-18 DeepLabV3 at 32x64)."""
    data = write_cityscapes(tmp_path / "cityscapes", n=2, h=32, w=64)
    full, rec = _run(tiny_cfg(data, tmp_path / "full"))
    model = full.model

    # the radius follows the schedule at every iteration, the same in every SSN layer
    # (the radius is a float32 buffer)
    assert [rec.radius[i] for i in range(ITERS)] == [
        {float(torch.tensor(r, dtype=torch.float32))} for r in RADII
    ]
    assert RADII == [ssn.radius_at(i, 3, 0.0, 1.0, 1) for i in range(ITERS)]
    # layers latch: none at radius 0, every ratio once the radius passes sqrt(2/3)
    n_ratios = 2 * sum(isinstance(m, ssn.SparseSwitchNormBase) for _, m in ssn.switch_norms(model))
    assert rec.latched[0] == 0 and rec.latched[4] == rec.latched[5] == n_ratios > 0
    assert all(v is not None for _, m in ssn.switch_norms(model) for v in m.latched)
    hub = full.message_hub.get_scalar("train/ssn_radius")
    assert hub.current() == RADII[-1]
    assert full.message_hub.get_scalar("train/ssn_ratio_grad_norm").current() > 0

    # the ratio logits' own group: the authors' lr/10 and no decay, as ssn.param_groups has them
    ratio_ids = {id(p) for _, m in ssn.switch_norms(model) for p in (m.mean_logits, m.var_logits)}
    optimizer = full.optim_wrapper.optimizer
    base_lr = full.cfg.optimizer.lr
    ref = next(g for g in ssn.param_groups(model, lr=base_lr, weight_decay=5e-4) if g["name"] == "ratios")
    got = [g for g in optimizer.param_groups if any(id(p) in ratio_ids for p in g["params"])]
    assert {id(p) for g in got for p in g["params"]} == ratio_ids == {id(p) for p in ref["params"]}
    assert all(
        g["initial_lr"] == pytest.approx(ref["lr"]) and g["weight_decay"] == ref["weight_decay"] for g in got
    )
    others = [g for g in optimizer.param_groups if not any(id(p) in ratio_ids for p in g["params"])]
    assert all(g["initial_lr"] == pytest.approx(base_lr) for g in others)

    # the hook's state is in the checkpoint's meta; a resumed run continues radius and latches exactly
    middle = tmp_path / "full" / f"iter_{SAVE_AT}.pth"
    with torch.serialization.safe_globals(mm.mmengine_checkpoint_globals()):  # what mmengine itself saves
        saved = torch.load(middle, map_location="cpu", weights_only=True)
    assert saved["meta"]["ssn_radius_hook"]["ramp_steps"] == 3
    resumed, rec2 = _run(tiny_cfg(data, tmp_path / "resumed", resume=True, load_from=str(middle)))
    assert sorted(rec2.radius) == list(range(SAVE_AT, ITERS))
    assert all(rec2.radius[i] == rec.radius[i] and rec2.latched[i] == rec.latched[i] for i in rec2.radius)
    assert _ssn_state(resumed.model) == _ssn_state(model)
    for (k, a), b in zip(model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)

    # the final checkpoint loads into the Lightning task's pretrained path, and back into mmseg
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    from tasks import SemanticSegmenter

    final = tmp_path / "full" / f"iter_{ITERS}.pth"
    with caplog.at_level(logging.WARNING):
        # NOTE: trusted: an mmengine checkpoint holds mmengine objects (its message hub)
        seg = SemanticSegmenter(
            depth=18, num_classes=19, norm="ssn", pretrained=str(final), pretrained_trusted=True
        )
        seg.configure_model()
    backbone = seg.pretrained_module()
    want = {
        k.removeprefix("backbone."): v
        for k, v in torch.load(final, weights_only=False)["state_dict"].items()
        if k.startswith("backbone.")
    }
    got_sd = backbone.state_dict()
    assert set(want) == set(got_sd)
    for k, v in want.items():
        torch.testing.assert_close(got_sd[k], v, rtol=0, atol=0, msg=k)
    assert _ssn_state(backbone) == _ssn_state(model.backbone)
    back = tmp_path / "from_lightning.pth"
    torch.save({"state_dict": seg.model.state_dict()}, back)
    twin = MODELS.build(copy.deepcopy(full.cfg.model))
    load_checkpoint(twin, str(back), map_location="cpu", strict=True, logger="silent")
    assert _ssn_state(twin.backbone) == _ssn_state(model.backbone)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(twin.backbone.state_dict()[k], v, rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------- the hook's parts, alone
def _fake_runner(model: nn.Module, **kw: Any) -> Any:
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("test_mmengine")
    return SimpleNamespace(model=model, iter=0, max_iters=4, message_hub=hub, _resume=False, **kw)


def _resnet(norm_cfg: dict, norm_eval: bool) -> nn.Module:
    from mmseg.registry import MODELS

    torch.manual_seed(0)
    return MODELS.build(
        dict(
            type="ResNet", depth=18, base_channels=8, stem_channels=8, norm_cfg=norm_cfg, norm_eval=norm_eval
        )
    )


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for k, t in model.state_dict().items() if k.endswith(("running_mean", "running_var"))]


@pytest.mark.parametrize("norm_eval", [True, False])
def test_norm_eval_freezes_ssn_statistics_as_mmseg_freezes_bn(mm, norm_eval):
    """The reference is mmseg's own behaviour for BN: with norm_eval=True its train() leaves every
    BN layer in eval mode and a training forward keeps their statistics."""
    x = torch.randn(2, 3, 32, 32)
    bn = _resnet(dict(type="BN", requires_grad=True), norm_eval)
    bn.train()  # NOTE: mmseg's ResNet.train() returns None
    bn_layers = [m for m in bn.modules() if isinstance(m, nn.BatchNorm2d)]
    before = _stats(bn)
    bn(x)
    bn_frozen = all(not m.training for m in bn_layers)
    bn_kept = all(torch.equal(a, b) for a, b in zip(before, _stats(bn), strict=True))
    assert bn_frozen == bn_kept == norm_eval  # what mmseg does natively

    model = _resnet(dict(type="SSN", requires_grad=True), norm_eval)
    model.train()
    hook = mm.SSNRadiusHook(end=1.0)
    runner = _fake_runner(model)
    hook.before_train(runner)
    runner.iter = 3  # radius 3/4 of the way; set_radius(1.0) below makes every ratio one-hot
    hook.before_train_iter(runner, 0)
    layers = [m for _, m in ssn.switch_norms(model)]
    before = _stats(model)
    model(x)
    assert all(not m.training for m in layers) == norm_eval == bn_frozen
    assert all(torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True)) == bn_kept
    ssn.set_radius(model, 1.0)
    assert (ssn.update_latches(model) == 0) == norm_eval  # frozen layers do not latch
    # the documented switch off: the hook leaves the layers as the backbone's train() left them
    model.train()
    off = mm.SSNRadiusHook(end=1.0, norm_eval=False)
    off.before_train(runner)
    off.before_train_iter(runner, 0)
    assert all(m.training for m in layers)


def test_ratio_gradient_clip_only_touches_the_ratio_logits(mm):
    """Against torch's clip_grad_norm_ formula applied by hand to a copy of the gradients."""
    from mmengine.optim import OptimWrapper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ssn.SparseSwitchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1.0))
    hook = mm.SSNRadiusHook(ratio_grad_clip=1e-3)
    runner = _fake_runner(model, optim_wrapper=wrapper)
    hook.before_train(runner)
    hook.before_train_iter(runner, 0)
    loss = (model(torch.randn(2, 3, 8, 8)) ** 2).sum() * 100
    wrapper.backward(loss)
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    ratios = [n for n in before if n.endswith("_logits")]
    raw = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(before[n][1]) for n in ratios]))
    scale = min(1.0, 1e-3 / (float(raw) + 1e-6))
    assert scale < 1  # the clip is active
    wrapper.step()
    for n, p in model.named_parameters():
        w, g = before[n]
        torch.testing.assert_close(p.detach(), w - (g * scale if n in ratios else g), msg=n)
    assert runner.message_hub.get_scalar("train/ssn_ratio_grad_norm").current() == pytest.approx(float(raw))
    hook.after_train(runner)  # the optimizer's step hook is removed
    assert not wrapper.optimizer._optimizer_step_pre_hooks


def test_only_a_resume_restores_the_ramp_and_bad_arguments_are_named(mm):
    saved = mm.SSNRadiusHook(end=0.9, delay_fraction=0.25, ramp_fraction=0.5)
    model = _resnet(dict(type="SSN", requires_grad=True), False)
    runner = _fake_runner(model)
    saved.before_train(runner)
    checkpoint: dict[str, Any] = {"state_dict": {}, "meta": {}}
    saved.before_save_checkpoint(runner, checkpoint)
    assert checkpoint["meta"]["ssn_radius_hook"] == dict(
        ramp_steps=2, delay_steps=1, start=0.0, end=0.9, ramp_fraction=0.5, delay_fraction=0.25, radius=0.0
    )
    fresh = mm.SSNRadiusHook()
    fresh.after_load_checkpoint(runner, checkpoint)  # load_from: a new ramp
    assert fresh.ramp_steps is None and fresh.end == 1.0
    runner._resume = True
    fresh.after_load_checkpoint(runner, checkpoint)
    assert fresh.state_dict() == checkpoint["meta"]["ssn_radius_hook"]
    for bad in (dict(ramp_fraction=0), dict(delay_fraction=0.5, ramp_fraction=0.6), dict(start=2.0)):
        with pytest.raises(ValueError, match="need"):
            mm.SSNRadiusHook(**bad)
    with pytest.raises(ValueError, match="ratio_grad_clip"):
        mm.SSNRadiusHook(ratio_grad_clip=0)
