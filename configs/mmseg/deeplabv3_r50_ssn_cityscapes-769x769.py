# DeepLabV3 R50-D8 on Cityscapes 769x769 (80k iterations, 4 GPUs x 2 images) with Sparse Switchable
# Normalization in the backbone and both heads, trained by mmengine's own Runner:
#
#   python tools/train.py configs/mmseg/deeplabv3_r50_ssn_cityscapes-769x769.py   # mmseg's script
#   bash tools/dist_train.sh configs/mmseg/deeplabv3_r50_ssn_cityscapes-769x769.py 4 [--resume]
#
# It is mmseg 1.2.2's deeplabv3_r50b-d8_4xb2-80k_cityscapes-769x769.py written out (the torchvision-
# shaped ResNet, whose keys our classification checkpoints have) with three changes, marked SSN:
#   1. every norm_cfg is SSN (registered by the custom import; 'SN' for Switchable Norm,
#      'ssn:syncssn' for statistics synchronised over the GPUs as mmseg's SyncBN does);
#   2. SSNRadiusHook ramps the SparsestMax radius 0 -> 1 per iteration, latches each layer once its
#      ratios are one-hot, averages the per-GPU statistics before validation and saving, and clips
#      the ratio gradients (the SSN authors' 1.0); its state is saved in the checkpoints' meta, so
#      --resume continues the ramp exactly;
#   3. the ratio logits get their own parameter group: lr / 10 and no weight decay (the authors').
# NOTE: written out rather than `_base_ = 'mmseg::deeplabv3/...'`: mmengine 0.10 resolves `mmseg::`
# bases through pkg_resources, which setuptools >= 81 no longer ships.
#
# No ImageNet SSN weights are downloaded: train a backbone with our classification task and set
# model.backbone.init_cfg = dict(type='Pretrained', checkpoint=<its state_dict file>), or keep
# the backbone random (pretrained=None, as here).
custom_imports = dict(imports=["ssn.integrations.mmengine_hooks"], allow_failed_imports=False)  # SSN

# ---------------------------------------------------------------------------------------- model
norm_cfg = dict(type="SSN", requires_grad=True)  # SSN (mmseg: SyncBN)
crop_size = (769, 769)
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,  # SSN (mmseg: torchvision://resnet50, a BN ResNet)
    backbone=dict(
        type="ResNet",
        depth=50,
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
        in_channels=2048,
        in_index=3,
        channels=512,
        dilations=(1, 12, 24, 36),
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=True,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=1024,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=True,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=(769, 769), stride=(513, 513)),
)

# ----------------------------------------------------------------------------------------- data
dataset_type = "CityscapesDataset"
data_root = "data/cityscapes/"
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomResize", scale=(2049, 1025), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2049, 1025), keep_ratio=True),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="leftImg8bit/train", seg_map_path="gtFine/train"),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="leftImg8bit/val", seg_map_path="gtFine/val"),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator

# ------------------------------------------------------------------------------------- schedule
optimizer = dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0005)
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=optimizer,
    clip_grad=None,
    # SSN: ssn.integrations.mmengine_hooks.RATIO_CUSTOM_KEYS written out. mmengine matches these
    # substrings of parameter names; only the SN/SSN ratio logits have them.
    paramwise_cfg=dict(
        custom_keys={
            "mean_logits": dict(lr_mult=0.1, decay_mult=0.0),
            "var_logits": dict(lr_mult=0.1, decay_mult=0.0),
        }
    ),
)
param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=80000, by_epoch=False)]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=80000, val_interval=8000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

# -------------------------------------------------------------------------------------- runtime
default_scope = "mmseg"
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=8000),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
custom_hooks = [
    # SSN. end=1.0 latches every layer by ~82% of the run (every ratio is one-hot from radius
    # sqrt(2/3)); norm_eval=True keeps SN/SSN statistics frozen inside a backbone with
    # norm_eval=True, as mmseg keeps BN's (its check covers only _BatchNorm).
    dict(
        type="SSNRadiusHook",
        end=1.0,
        ramp_fraction=1.0,
        delay_fraction=0.0,
        ratio_grad_clip=1.0,
        norm_eval=True,
    ),
]
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
tta_model = dict(type="SegTTAModel")
