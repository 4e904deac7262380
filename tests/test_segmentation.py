"""Segmentation: the mmcv-lite bridge, our norm names in mmcv, DeepLabV3 with every normalizer,
metrics and schedule against mmseg/mmengine, Cityscapes/ADE20K data in their real layouts,
backbone transfer from a classification checkpoint, the configs through the CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import ssn
from ssn.integrations import MmcvOpUnavailable, bridge_mmcv_lite, mm_norm_cfg

from helpers import ROOT, cityscapes_args, png, scene, write_cityscapes

CONFIGS = [
    Path(f"configs/{c}.yaml")
    for c in (
        "ade20k/deeplabv3_r50_ade20k-512x512",
        "cityscapes/deeplabv3_r50_cityscapes-769x769",
        "nuclei/deeplabv3_r18_nuclei-128x128",
    )
]
SSN = ["--config", str(ROOT / "configs/norms/ssn.yaml")]


@pytest.fixture(scope="module")
def mmseg_ready():
    bridge_mmcv_lite()
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")


# ------------------------------------------------------------------------------- fixtures
def write_ade20k(root: Path, n: int = 2, h: int = 40, w: int = 56) -> Path:
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        for i in range(n):
            image, label = scene(rng, h, w, [0, 1, 150])  # "other", wall, the last class
            png(root / "images" / split / f"ADE_{split[:5]}_{i:08d}.jpg", image)
            png(root / "annotations" / split / f"ADE_{split[:5]}_{i:08d}.png", label)
    return root


def _tiny_cityscapes(root: Path, **kw):
    from datamodules import CityscapesDataModule

    return CityscapesDataModule(
        str(root), batch_size=2, num_workers=0, crop_size=(32, 32), scale=(96, 48), **kw
    )


# --------------------------------------------------------------------------- mmcv bridge
def test_mmcv_lite_bridge_imports_mmseg_and_fails_loudly_on_compiled_ops():
    assert bridge_mmcv_lite() is True and bridge_mmcv_lite() is True  # mmcv-lite here; idempotent
    import mmseg.models  # noqa: F401  (imports mmcv.ops at module level)
    from mmcv.ops import point_sample, roi_align
    from mmcv.utils.ext_loader import check_ops_exist

    assert not check_ops_exist()  # the stand-in does not pretend to be compiled mmcv
    # pure-PyTorch ops still work: point_sample is grid_sample at normalised points
    feats, points = torch.randn(1, 2, 5, 5), torch.rand(1, 4, 2)
    ref = nn.functional.grid_sample(feats, (2 * points - 1).unsqueeze(2), align_corners=False).squeeze(3)
    torch.testing.assert_close(point_sample(feats, points), ref)
    with pytest.raises(MmcvOpUnavailable, match=r"'roi_align_forward'.*install full mmcv"):
        roi_align(torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 0, 0, 4, 4]]), (2, 2))


# ------------------------------------------------------------------------- norm mapping
@pytest.mark.parametrize("name", ssn.NORM_NAMES)
def test_mm_norm_cfg_builds_exactly_create_norm(name, mmseg_ready):
    from mmcv.cnn import ConvModule, build_norm_layer

    kw = {"groups": 4} if name == "gn" else {}
    layer_name, layer = build_norm_layer(mm_norm_cfg(name, **kw), 16, postfix=2)
    ref = ssn.create_norm(name, 16, **kw)
    assert layer_name == "bn2"  # torchvision's key whatever the normalizer
    assert build_norm_layer(dict(type="SSN"), 16, postfix=1)[0] == "bn1"  # the plain registration too
    assert type(layer) is type(ref) and repr(layer) == repr(ref)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    conv = ConvModule(8, 16, 3, norm_cfg=mm_norm_cfg(name, **kw))
    assert type(conv.bn) is type(ref) and conv.conv.bias is None  # mmcv drops the conv bias before a norm
    with pytest.raises(KeyError, match="valid names"):
        mm_norm_cfg("batchnorm")


# ---------------------------------------------------------------------------- the model
def _batch(n: int = 2, h: int = 32, w: int = 32, classes: int = 3, seed: int = 0) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        label = torch.randint(0, classes, (1, h, w), generator=g)
        label[:, :2] = 255  # ignored pixels
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]
    return dict(inputs=images, data_samples=samples)


def test_deeplabv3_structure_follows_mmseg(mmseg_ready):
    from tasks import SemanticSegmenter

    m = SemanticSegmenter(depth=18, num_classes=5, norm="bn")
    bb, head, aux = m.model.backbone, m.model.decode_head, m.model.auxiliary_head
    assert type(bb).__name__ == "ResNet" and not bb.deep_stem  # torchvision-shaped stem
    assert bb.strides == (1, 2, 1, 1) and bb.dilations == (1, 1, 2, 4)
    assert type(head).__name__ == "ASPPHead" and head.in_channels == 512 and head.channels == 128
    assert type(aux).__name__ == "FCNHead" and aux.loss_decode.loss_weight == 0.4
    with torch.no_grad():
        feats = m.model.extract_feat(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 8, 8]  # output stride 8
    with pytest.raises(KeyError, match="depth"):
        SemanticSegmenter(depth=34)
    with pytest.raises(ValueError, match="test_crop_size"):
        SemanticSegmenter(depth=18, test_mode="slide")


@pytest.mark.parametrize("name", ssn.NORM_NAMES)
def test_training_step_finite_for_every_norm_with_aspp_at_batch_2(name, mmseg_ready):
    from tasks import SemanticSegmenter

    torch.manual_seed(0)
    m = SemanticSegmenter(
        depth=18, num_classes=3, norm=name, norm_kwargs={"groups": 8} if name == "gn" else None
    )
    pool = m.model.decode_head.image_pool
    seen = []
    pool.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out)))
    loss = m.training_step(_batch(), 0)
    loss.backward()
    ((shape, out),) = seen
    assert shape[0] == 2 and shape[-2:] == (32 // 8, 32 // 8) and out.shape[-2:] == (1, 1)  # a 1x1 map
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    norms = [mod for mod in m.model.modules() if type(mod) is type(ssn.create_norm(name, 64))]
    assert len(norms) > 20  # backbone and both heads use the normalizer


def test_image_pool_norm_for_in_is_instance_norm_defined_on_one_pixel(mmseg_ready):
    from tasks import SemanticSegmenter

    m = SemanticSegmenter(depth=18, num_classes=3, norm="in")
    norm = m.model.decode_head.image_pool[1].bn
    ref = nn.InstanceNorm2d(128, affine=True)
    with torch.no_grad():
        ref.bias.normal_()
        ref.weight.normal_()
        norm.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 128, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(norm.double()(x), ref.double()(x))
    one = norm(torch.randn(2, 128, 1, 1, dtype=torch.float64))  # mean = the pixel, variance 0
    torch.testing.assert_close(one, ref.bias.detach().double().view(1, -1, 1, 1).expand(2, -1, 1, 1))


def test_scores_match_mmseg_iou_metric(mmseg_ready):
    from mmseg.evaluation import IoUMetric
    from torchmetrics.classification import MulticlassConfusionMatrix

    from tasks.segmentation import seg_scores

    g = torch.Generator().manual_seed(0)
    k = 5
    pred = torch.randint(0, k - 1, (3, 20, 30), generator=g)  # class 4 never predicted
    label = torch.randint(0, k, (3, 20, 30), generator=g)
    label[label == 3] = 255  # class 3 never labelled
    label[:, :4] = 255
    cm = MulticlassConfusionMatrix(k, ignore_index=255)
    cm.update(pred.flatten(), label.flatten())
    ours = seg_scores(cm.compute())
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=[str(i) for i in range(k)])
    results = [metric.intersect_and_union(p, t, k, 255) for p, t in zip(pred, label, strict=True)]
    area = [sum(r[i] for r in results) for i in range(4)]
    ref = metric.total_area_to_metrics(*area, ["mIoU"])
    assert ours["aAcc"].item() == pytest.approx(float(ref["aAcc"]))
    assert ours["mIoU"].item() == pytest.approx(float(np.nanmean(ref["IoU"])))
    assert ours["mAcc"].item() == pytest.approx(float(np.nanmean(ref["Acc"])))


def test_poly_schedule_matches_mmengine_poly_lr():
    from mmengine.optim.scheduler import PolyLR

    from tasks.base import lr_factor

    base, eta_min, end = 0.01, 1e-4, 50
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = PolyLR(opt, eta_min=eta_min, power=0.9, begin=0, end=end, by_epoch=False)
    for step in range(end + 1):
        # NOTE: mmengine's ramp spans end - 1 steps (its last step sits at eta_min)
        ours = base * lr_factor(step, end - 1, 0, "poly", [], 0.1, power=0.9, min_factor=eta_min / base)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        sched.step()
    m = __import__("tasks").SemanticSegmenter(depth=18, norm="bn")
    assert (m.hparams.schedule, m.hparams.poly_power, m.hparams.min_lr, m.hparams.weight_decay) == (
        "poly",
        0.9,
        1e-4,
        5e-4,
    )


# -------------------------------------------------------------------- backbone transfer
def test_backbone_keys_are_torchvision_resnet_keys(mmseg_ready):
    from mmseg.registry import MODELS

    for depth in (18, 50):
        bb = MODELS.build(
            dict(
                type="ResNet",
                depth=depth,
                dilations=(1, 1, 2, 4),
                strides=(1, 2, 1, 1),
                contract_dilation=True,
                norm_cfg=mm_norm_cfg("gn"),
            )
        )
        ref = getattr(torchvision.models, f"resnet{depth}")(norm_layer=ssn.get_norm_layer("gn"))
        want = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
        assert {k: v.shape for k, v in bb.state_dict().items()} == want


def _trained_looking_classifier(radius: float):
    """A ResNet-18 SSN classifier as if trained: statistics, logits, ``radius``, every third layer
    latched (to different statistics for mean and variance)."""
    from tasks import ImageClassifier

    torch.manual_seed(0)
    clf = ImageClassifier(arch="resnet18", num_classes=10, norm="ssn")
    with torch.no_grad():
        for i, (_, m) in enumerate(ssn.switch_norms(clf.net)):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7 + i)
            m.mean_logits.normal_()
            m.var_logits.normal_()
            m.radius.fill_(radius)
            if i % 3 == 0:
                m.latch(ssn.STATS[i % 3], ssn.STATS[(i + 1) % 3])
    return clf


def test_classification_backbone_loads_into_segmentation_backbone(mmseg_ready):
    from tasks import SemanticSegmenter

    clf = _trained_looking_classifier(radius=0.3)
    layers = list(ssn.switch_norms(clf.net))
    state = {k: v for k, v in clf.net.state_dict().items() if not k.startswith("fc.")}
    seg = SemanticSegmenter(depth=18, num_classes=3, norm="ssn")
    target = seg.pretrained_module()
    result = target.load_state_dict(seg.map_pretrained(state, target))
    assert not result.missing_keys and not result.unexpected_keys
    loaded = target.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    got = dict(ssn.switch_norms(target))
    assert len(got) == len(layers)
    for name, m in layers:
        twin = got[name.removeprefix("net.") if name.startswith("net.") else name]
        assert twin.latched == m.latched
        for a, b in zip(twin.ratios(), m.ratios(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["keep", "reopen"])
def test_pretrained_argument_keep_and_reopen_in_the_segmentation_task(mode, mmseg_ready, tmp_path):
    """Through the task's own ``pretrained`` path (a checkpoint file of our classification task)."""
    from tasks import SemanticSegmenter

    clf = _trained_looking_classifier(radius=0.4)
    path = tmp_path / "clf.ckpt"
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams)}, path)
    source = {n.removeprefix("net."): m for n, m in ssn.switch_norms(clf)}
    seg = SemanticSegmenter(
        depth=18,
        num_classes=3,
        norm="ssn",
        pretrained=str(path),
        pretrained_ratios=mode,
        pretrained_radius_start=0.25,
    )
    seg.configure_model()
    got = dict(ssn.switch_norms(seg.pretrained_module()))
    assert set(source) <= set(got)  # every backbone layer found (the heads' layers are new)
    for name, src in source.items():
        m = got[name]
        torch.testing.assert_close(m.mean_logits, src.mean_logits, rtol=0, atol=0)
        torch.testing.assert_close(m.running_mean, src.running_mean, rtol=0, atol=0)
        if mode == "keep":
            assert m.latched == src.latched and float(m.radius) == pytest.approx(0.4)
        else:  # reopened: the ratios learn again from the inherited logits, from radius 0.25
            assert m.latched == (None, None) and float(m.radius) == pytest.approx(0.25)


def test_authors_resnet50_loads_into_the_segmentation_backbone(mmseg_ready):
    from mmseg.registry import MODELS

    from ssn.authors import AUTHORS_MOMENTUM, authors_resnet50

    theirs = authors_resnet50(num_classes=10)  # what ssn.authors builds from their released files
    with torch.no_grad():
        for i, (_, m) in enumerate(ssn.switch_norms(theirs)):
            m.running_var.uniform_(0.5, 2)
            m.mean_logits.normal_()
            if i % 4 == 0:
                m.latch("bn", "in")
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    # NOTE: their layers' settings (unbiased IN variance, momentum) are arguments, not state
    cfg = mm_norm_cfg("ssn", in_var_correction=1, momentum=1 - AUTHORS_MOMENTUM)
    bb = MODELS.build(
        dict(
            type="ResNet",
            depth=50,
            dilations=(1, 1, 2, 4),
            strides=(1, 2, 1, 1),
            contract_dilation=True,
            norm_cfg=cfg,
        )
    )
    result = bb.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    ours, want = dict(ssn.switch_norms(bb)), dict(ssn.switch_norms(theirs))
    assert ours.keys() == want.keys()
    for name, m in want.items():
        assert ours[name].latched == m.latched and ours[name].in_var_correction == 1
        torch.testing.assert_close(ours[name].running_var, m.running_var, rtol=0, atol=0)


# --------------------------------------------------------------------------------- data
def test_cityscapes_fixture_in_real_layout(tmp_path):
    dm = _tiny_cityscapes(write_cityscapes(tmp_path / "cs"))
    dm.setup("fit")
    assert dm.num_classes == 19 and len(dm.data["train"]) == 2 and len(dm.data["val"]) == 2
    batch = next(iter(dm.train_dataloader()))
    # random scale 0.5-2.0, then a crop of at most 32x32 (the data preprocessor pads to the crop size)
    assert all(x.shape[0] == 3 and x.shape[1] <= 32 and x.shape[2] <= 32 for x in batch["inputs"])
    labels = torch.cat([s.gt_sem_seg.data.unique() for s in batch["data_samples"]]).unique().tolist()
    assert set(labels) <= {0, 13, 10, 255}
    val = next(iter(dm.val_dataloader()))
    assert tuple(val["data_samples"][0].gt_sem_seg.data.shape) == (1, 48, 96)  # label at full size
    assert dm.skipped_images == 0


def test_missing_roots_fail_at_once_with_the_layout(tmp_path):
    from datamodules import ADE20KDataModule, CityscapesDataModule

    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/\{train,val\}/<city>/\*_leftImg8bit.png"):
        CityscapesDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"images/\{training,validation\}"):
        ADE20KDataModule(str(tmp_path / "nowhere"))


def test_cityscapes_label_ids_only_offers_the_conversion(tmp_path):
    from datamodules.cityscapes import main

    root = write_cityscapes(tmp_path / "cs", label_ids=True)
    with pytest.raises(
        FileNotFoundError, match=rf"(?s)labelIds.png but no .*python -m datamodules.cityscapes {root}"
    ):
        _tiny_cityscapes(root)
    main([str(root)])  # the offered command
    written = sorted((root / "gtFine").rglob("*_gtFine_labelTrainIds.png"))
    assert len(written) == 4
    ids = cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)
    # cityscapesscripts' table: road 7 -> 0, car 26 -> 13, sky 23 -> 10, unlabeled 0 -> 255
    assert set(np.unique(ids).tolist()) == {0, 13, 10, 255}
    _tiny_cityscapes(root).setup("fit")


def test_unreadable_files_are_skipped_logged_and_counted_once(tmp_path, caplog):
    root = write_cityscapes(tmp_path / "cs", n=3)
    bad_image = next((root / "leftImg8bit/train/aachen").glob("aachen_000001*"))
    bad_label = next((root / "gtFine/train/aachen").glob("aachen_000002*"))
    bad_image.write_bytes(b"not a png")
    bad_label.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dm = _tiny_cityscapes(root)
    dm.batch_size = 3
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="datamodules.segmentation"):
        for _ in range(3):  # three epochs meet the same two files
            batch = next(iter(dm.train_dataloader()))
            assert len(batch["inputs"]) == 1
    assert dm.skipped_images == 2
    logged = [r.getMessage() for r in caplog.records]
    assert (
        len(logged) == 2
        and any(str(bad_image) in m for m in logged)
        and any(str(bad_label) in m for m in logged)
    )


def test_label_of_another_size_is_an_error_naming_both(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    label = next((root / "gtFine/train/aachen").glob("*_labelTrainIds.png"))
    png(label, np.zeros((24, 48), np.uint8))
    dm = _tiny_cityscapes(root)
    dm.setup("fit")
    with pytest.raises(ValueError, match=rf"label {label} is 48x24 .* image .*leftImg8bit.png is 96x48"):
        for i in range(len(dm.data["train"])):
            dm.data["train"][i]


def test_ade20k_fixture_reduces_zero_label(tmp_path):
    from datamodules import ADE20KDataModule

    dm = ADE20KDataModule(
        str(write_ade20k(tmp_path / "ADEChallengeData2016")),
        batch_size=2,
        num_workers=0,
        crop_size=(32, 32),
        scale=(56, 40),
    )
    dm.setup("fit")
    assert dm.num_classes == 150
    sample = dm.data["val"][0]
    # 0 ("other") -> 255 ignored, class k -> k - 1
    assert set(sample["data_samples"].gt_sem_seg.data.unique().tolist()) == {255, 0, 149}


# ------------------------------------------------------------------------------ configs
def test_every_config_names_its_source_and_schedule():
    import yaml

    assert len(CONFIGS) == 3  # one base file per task; the normalizer comes from configs/norms/
    for path in CONFIGS:
        text = (ROOT / path).read_text()
        cfg = yaml.safe_load(text)
        model = cfg["model"]["init_args"]
        assert "norm" not in model, path
        assert cfg["model"]["class_path"] == "tasks.SemanticSegmenter" and model["schedule"] == "poly", path
        assert "pretrained" in model and cfg["trainer"]["max_steps"] > 0, path
        assert "mmseg" in text.split("model:")[0] or "nuclei" in str(path), path  # the recipe's source


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_configs_parse_through_the_cli(config, capsys):
    from tasks.cli import main

    overlay = ROOT / config.parent / "norms/ssn.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/base/trainer.yaml"),
                "--config",
                str(ROOT / config),
                *SSN,
                *(["--config", str(overlay)] if overlay.is_file() else []),
                "--print_config",
            ]
        )
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "SemanticSegmenter" in out and "max_steps" in out


@pytest.mark.slow
def test_fit_through_the_cli_on_a_cityscapes_fixture(tmp_path):
    from tasks.cli import main

    root = write_cityscapes(tmp_path / "cs")
    out = str(tmp_path / "out")
    cli = main(
        [
            "fit",
            *cityscapes_args(root, out, "ssn", "--trainer.val_check_interval=2"),
            f"--trainer.logger.init_args.save_dir={out}",
            "--export=false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for key in (
        "train/loss",
        "train/decode.loss_ce",
        "train/aux.loss_ce",
        "val/mIoU",
        "val/mAcc",
        "val/aAcc",
    ):
        assert key in metrics and torch.isfinite(metrics[key]), key
    lrs = [g["lr"] for g in cli.trainer.optimizers[0].param_groups]
    assert len(lrs) == 3  # params, norm, ratios


def _read_all(dm, split: str = "train") -> None:
    for i in range(len(dm.data[split])):
        dm.data[split][i]


def test_label_values_channels_and_missing_files_are_named(tmp_path):
    from datamodules import ADE20KDataModule

    root = write_cityscapes(tmp_path / "cs")
    labels = sorted((root / "gtFine/train/aachen").glob("*_labelTrainIds.png"))
    png(labels[0], np.full((48, 96), 200, np.uint8))  # a trainId past the 19 classes
    dm = _tiny_cityscapes(root)
    dm.setup("fit")
    with pytest.raises(ValueError, match=rf"label {labels[0]} holds values \[200\] outside the 19 classes"):
        _read_all(dm)
    png(labels[0], np.zeros((48, 96, 3), np.uint8))  # a colour PNG
    with pytest.raises(ValueError, match=rf"label {labels[0]} has shape \(48, 96, 3\): expected one channel"):
        _read_all(dm)
    labels[1].unlink()  # a layout error, found before training, not a corrupt file to skip
    with pytest.raises(FileNotFoundError, match=rf"1 train image\(s\) have no label file, .*no {labels[1]}"):
        _tiny_cityscapes(root).setup("fit")
    ade = write_ade20k(tmp_path / "ADEChallengeData2016")
    label = sorted((ade / "annotations/validation").glob("*.png"))[0]
    png(label, np.full((40, 56), 180, np.uint8))
    dm = ADE20KDataModule(str(ade), batch_size=2, num_workers=0, crop_size=(32, 32), scale=(56, 40))
    dm.setup("fit")
    with pytest.raises(
        ValueError,
        match=rf"label {label} holds values \[180\] outside the 150 classes \(0..150, read "
        r"with 0 as ignore\)",
    ):
        _read_all(dm, "val")


def _fit_in_process(tmp_path: Path, dm, **model: object) -> None:
    import lightning.pytorch as pl

    from tasks import SemanticSegmenter

    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(SemanticSegmenter(depth=18, num_classes=19, crop_size=(32, 32), **model), datamodule=dm)


def test_training_split_smaller_than_one_batch_is_an_error(tmp_path):
    dm = _tiny_cityscapes(write_cityscapes(tmp_path / "cs"))
    dm.batch_size = 4  # 2 training images, drop_last
    with pytest.raises(
        ValueError, match=r"training split gives no batch: 2 samples .*batch_size 4, drop_last=True"
    ):
        _fit_in_process(tmp_path, dm, norm="ssn")
    assert not (tmp_path / "summary.json").exists()


def test_bn_at_batch_1_names_the_aspp_image_pool_and_the_fix(tmp_path):
    dm = _tiny_cityscapes(write_cityscapes(tmp_path / "cs"))
    dm.batch_size = 1
    with pytest.raises(ValueError, match=r"norm 'bn' at 1 sample .*decode_head.image_pool.* batch_size >= 2"):
        _fit_in_process(tmp_path, dm, norm="bn")
    dm.batch_size = 2  # two virtual devices of one sample each
    with pytest.raises(ValueError, match=r"norm 'bn' at 1 sample .*decode_head.image_pool"):
        _fit_in_process(tmp_path, dm, norm="bn", norm_kwargs={"virtual_devices": 2})


def test_segmentation_options_out_of_range_are_named(tmp_path):
    from tasks import SemanticSegmenter

    with pytest.raises(
        ValueError, match=r"ignore_index must be in \[num_classes, 255\] = \[19, 255\] .*, got 3"
    ):
        SemanticSegmenter(depth=18, num_classes=19, ignore_index=3)
    with pytest.raises(ValueError, match=r"cat_max_ratio must be in \(0, 1\], got 0"):
        _tiny_cityscapes(write_cityscapes(tmp_path / "cs"), cat_max_ratio=0)
