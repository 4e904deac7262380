"""What used to go silently wrong on the CLI: resuming from nothing, another run's checkpoint, a
checkpoint of another normalizer, evaluating an untrained model, corrupt checkpoint files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tasks.cli import main

from helpers import ROOT, fmnist_args, imagenet_fixture, needs_fmnist


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt_path last: no .*checkpoints/last.ckpt"):
        main(["fit", *fmnist_args(tmp_path, "bn", "--trainer.max_epochs=1", "--ckpt_path=last")])


@pytest.mark.parametrize("content", [b"", b"\x13\x37 not a checkpoint" * 50])
def test_corrupt_checkpoint_file_is_named(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"{bad}: (empty file|not a readable PyTorch checkpoint)"):
        main(["validate", *fmnist_args(tmp_path, "bn"), f"--ckpt_path={bad}"])


@pytest.mark.slow
@needs_fmnist
def test_checkpoint_of_another_normalizer_is_refused_by_name(tmp_path, capsys):
    main(
        [
            "fit",
            *fmnist_args(
                tmp_path, "bn", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--export=false"
            ),
        ]
    )
    # another config in the same folder: `last` is that folder's last.ckpt, which holds BN weights
    with pytest.raises(ValueError, match="trained with norm='bn', the config has norm='ssn'"):
        main(["validate", *fmnist_args(tmp_path, "ssn"), "--ckpt_path=last"])
    with pytest.raises(ValueError, match="trained with arch='resnet_small', the config has arch='resnet18'"):
        main(["fit", *fmnist_args(tmp_path, "bn", "--model.init_args.arch=resnet18", "--ckpt_path=last")])
    main(["validate", *fmnist_args(tmp_path, "bn"), "--ckpt_path=last"])  # the matching config loads it
    assert "untrained" not in capsys.readouterr().out
    main(["test", *fmnist_args(tmp_path, "bn")])
    assert "test without --ckpt_path: these are the metrics of an untrained" in capsys.readouterr().out


@pytest.mark.slow
@needs_fmnist
def test_diverging_update_stops_before_a_checkpoint_and_names_the_layer(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"step 0 .*the update made net\.\S+ \(layer net\.\S+\) non-finite"
    ):
        # in range, but the first update overflows float32 (lr x weight decay x weight > 3.4e38)
        main(
            [
                "fit",
                *fmnist_args(
                    tmp_path,
                    "ssn",
                    "--trainer.max_epochs=1",
                    "--model.init_args.lr=1e4",
                    "--model.init_args.weight_decay=1e38",
                    "--export=false",
                ),
            ]
        )
    assert not list((tmp_path / "out").rglob("*.ckpt"))  # nothing non-finite was saved


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nan_loss_stops_or_skips_the_step(tmp_path, mode):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    run = [
        "fit",
        *fmnist_args(
            tmp_path,
            "ssn",
            "--trainer.max_epochs=1",
            "--export=false",
            f"--model.init_args.nonfinite={mode}",
            "--trainer.callbacks+=faults.NaNInputAt",
            "--trainer.callbacks.step=2",
        ),
    ]
    if mode == "stop":
        with pytest.raises(FloatingPointError, match=r"step 2 \(epoch 0, batch 2\): non-finite loss \(nan\)"):
            main(run)
        return
    cli = main(run)
    assert cli.trainer.global_step == 6  # the skipped step counts (the schedules move on) but updates nothing
    assert cli.trainer.callback_metrics["train/skipped_nonfinite"] == 1
    state = cli.model.state_dict()  # weights and running statistics (the NaN forward's are put back)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_truncated_idx_header_names_the_file(tmp_path):
    from datamodules.fashion_mnist import read_idx

    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match=f"{bad}: truncated idx header"):
        read_idx(bad)


@needs_fmnist
def test_fashion_mnist_checks_val_size_and_every_split_before_fitting(tmp_path):
    import gzip
    import shutil

    from datamodules import fashion_mnist as fm

    with pytest.raises(ValueError, match="val_size 100000 must be in"):
        fm.FashionMNISTDataModule(val_size=100_000).setup("fit")
    for f in fm.DEBIAN_ROOT.glob("*-ubyte.gz"):
        shutil.copy(f, tmp_path / f.name)
    test_images = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(test_images.read_bytes())
    test_images.write_bytes(gzip.compress(data[: len(data) // 2]))  # a half-copied test file
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated"):
        fm.FashionMNISTDataModule(root=str(tmp_path)).setup("fit")  # found before training, not after


def test_negative_batch_size_is_named(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        main(["fit", *fmnist_args(tmp_path, "bn", "--trainer.max_epochs=1", "--data.batch_size=-4")])


def test_imagenet_class_folder_without_images_names_the_folder(tmp_path):

    from datamodules import ImageNetDataModule

    imagenet_fixture(tmp_path)
    (tmp_path / "train" / "n09999999").mkdir()
    with pytest.raises(
        FileNotFoundError, match=f"{tmp_path / 'train' / 'n09999999'}: class folder without images"
    ):
        ImageNetDataModule(str(tmp_path), batch_size=2).setup("fit")


@pytest.mark.slow
def test_every_training_image_unreadable_fails_the_run(tmp_path):

    imagenet_fixture(tmp_path / "imagenet", corrupt=False)
    for f in (tmp_path / "imagenet" / "train").rglob("*.JPEG"):
        f.write_bytes(b"\xff\xd8\xff garbage")
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="epoch 0: every training batch was unreadable"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/base/trainer.yaml"),
                "--config",
                str(ROOT / "configs/imagenet/resnet50_imagenet-224.yaml"),
                "--config",
                str(ROOT / "configs/norms/bn.yaml"),
                "--config",
                str(ROOT / "configs/base/quiet.yaml"),
                "--model.init_args.arch=resnet18",
                f"--data.init_args.root={tmp_path / 'imagenet'}",
                "--data.init_args.crop_size=32",
                "--data.init_args.resize_size=36",
                "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0",
                "--trainer.max_epochs=1",
                f"--trainer.default_root_dir={out}",
                f"--trainer.logger.init_args.save_dir={out}",
                "--export=false",
            ]
        )


def test_training_split_smaller_than_one_batch_is_an_error(tmp_path):
    import lightning.pytorch as pl

    from datamodules import DigitsDataModule
    from tasks import ImageClassifier

    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    model = ImageClassifier(arch="resnet_small", num_classes=10, in_channels=1, norm="bn")
    with pytest.raises(
        ValueError, match=r"training split gives no batch: 10 samples .*batch_size 64, drop_last=True"
    ):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, train_size=10))
    assert not (tmp_path / "summary.json").exists()  # nothing recorded as a finished run


def test_a_run_never_writes_beside_its_pretrained_source(tmp_path):
    from tasks import ImageClassifier

    source = tmp_path / "out" / "checkpoints" / "last.ckpt"  # another run's last.ckpt, in this run's folder
    source.parent.mkdir(parents=True)
    torch.save(
        ImageClassifier(arch="resnet_small", num_classes=10, in_channels=1, norm="bn").net.state_dict(),
        source,
    )
    with pytest.raises(
        ValueError, match=rf"pretrained {source} lies in {source.parent}, where this run writes"
    ):
        main(
            [
                "fit",
                *fmnist_args(
                    tmp_path, "bn", "--trainer.max_epochs=1", f"--model.init_args.pretrained={source}"
                ),
            ]
        )
    with pytest.raises(ValueError, match="where this run writes"):  # and not its export's folder either
        main(
            [
                "fit",
                *fmnist_args(
                    tmp_path,
                    "bn",
                    f"--model.init_args.pretrained={tmp_path}/out/exported/model.state_dict.pt",
                ),
            ]
        )


def test_the_digits_fine_tuning_config_writes_into_its_own_folder():
    import yaml

    digits = yaml.safe_load((ROOT / "configs/digits/resnet_small_digits-28.yaml").read_text())
    base = yaml.safe_load((ROOT / "configs/base/trainer.yaml").read_text())
    source = Path(digits["model"]["init_args"]["pretrained"])
    root = Path({**base["trainer"], **digits["trainer"]}["default_root_dir"])
    assert source.parent not in (root, root / "checkpoints", root / "exported")


@pytest.mark.slow
@needs_fmnist
def test_last_is_always_this_runs_own_checkpoint(tmp_path):
    main(
        [
            "fit",
            *fmnist_args(
                tmp_path, "bn", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--export=false"
            ),
        ]
    )
    main(
        [
            "fit",
            *fmnist_args(
                tmp_path, "bn", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--export=false"
            ),
        ]
    )
    folder = tmp_path / "out" / "checkpoints"
    assert not list(folder.glob("last-v*.ckpt"))  # the new run replaced the earlier run's last.ckpt
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    ("option", "value", "interval"),
    [
        ("backbone_lr_scale", -0.5, "[0, inf)"),
        ("lr", float("nan"), "(0, inf)"),
        ("lr", 0.0, "(0, inf)"),
        ("momentum", 1.0, "[0, 1)"),
        ("weight_decay", -1e-4, "[0, inf)"),
        ("warmup_epochs", -1, "[0, inf)"),
        ("gamma", 0.0, "(0, 1]"),
        ("radius_ramp_fraction", 0.0, "(0, 1]"),
        ("radius_end", -1.0, "(0, inf)"),
        ("ratio_grad_clip", 0.0, "(0, inf)"),
        ("label_smoothing", 1.0, "[0, 1)"),
        ("lr_batch_size", 0, "[1, inf)"),
    ],
)
def test_numeric_options_out_of_range_name_the_option_and_range(option, value, interval):
    from tasks import ImageClassifier

    with pytest.raises(ValueError, match=rf"{option} must be in {re.escape(interval)}, got {value!r}"):
        ImageClassifier(arch="resnet_small", num_classes=10, in_channels=1, norm="ssn", **{option: value})


def test_data_module_sizes_out_of_range_are_named():
    from datamodules import DigitsDataModule
    from datamodules.kinetics import KineticsDataModule

    with pytest.raises(ValueError, match=r"train_size must be in \[1, inf\), got 0"):
        DigitsDataModule(train_size=0)
    with pytest.raises(ValueError, match=r"fps must be in \(0, inf\), got 0"):
        KineticsDataModule("videos", fps=0)
