"""Data modules on fixtures written in the real on-disk layouts (idx files, ImageNet JPEG folders)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from datamodules import FashionMNISTDataModule, ImageNetDataModule
from datamodules import fashion_mnist as fm

from helpers import WNIDS, imagenet_fixture


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _fmnist_fixture(root, n_train=60, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), gz)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_folder(tmp_path, monkeypatch, gz):
    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "nowhere")
    _fmnist_fixture(tmp_path, gz=gz)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=8, val_size=10)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.data["train"]), len(dm.data["val"]), len(dm.data["test"])) == (50, 10, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x2, _ = dm.on_after_batch_transfer((x, y), 0)  # no trainer: normalised, not augmented
    torch.testing.assert_close(x2, (x.float() / 255 - fm.MEAN) / fm.STD)


def test_fashion_mnist_given_root_is_used_or_refused_never_replaced(tmp_path):
    """A root given by the user that is missing, empty or partial fails, even with the system copy
    installed (it used to train silently on the system copy)."""
    with pytest.raises(FileNotFoundError, match="not found"):
        FashionMNISTDataModule(root=str(tmp_path / "missing")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not found"):
        FashionMNISTDataModule(root=str(tmp_path / "empty")).setup("fit")
    (tmp_path / "partial").mkdir()
    _fmnist_fixture(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="all four idx files"):
        FashionMNISTDataModule(root=str(tmp_path / "partial")).setup("fit")


def test_fashion_mnist_missing_and_corrupt_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path)).prepare_data()
    _fmnist_fixture(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.open(path).read()
    gzip.open(path, "wb").write(raw[:-100])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable|not an idx"):
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")


def test_shift_and_flip_moves_pixels_not_content():
    x = torch.randn(64, 1, 28, 28)
    y = fm._shift_and_flip(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    # each output is a shifted (up to 2 px), possibly mirrored copy: its centre pixel is an input
    # pixel near the centre (rows 12..16; columns 12..16, or 11..15 when mirrored)
    for i in range(8):
        window = x[i, 0, 12:17, 11:17].flatten()
        assert torch.isclose(window, y[i, 0, 14, 14]).any()


def test_real_fashion_mnist_from_the_debian_package(fmnist_data):
    dm = FashionMNISTDataModule()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.data["train"]) == 55000 and len(dm.data["val"]) == 5000 and len(dm.data["test"]) == 10000
    labels = dm.data["test"].tensors[1]
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))


# --------------------------------------------------------------------------------- ImageNet
def test_imagenet_layout_transforms_and_skipped_images(tmp_path):
    imagenet_fixture(tmp_path)
    dm = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, crop_size=32, resize_size=36)
    assert dm.num_classes == 3 and dm.classes == WNIDS
    dm.setup("fit")
    assert len(dm.data["train"]) == 14 and len(dm.data["val"]) == 6
    readable = [s for s in dm.data["train"] if s is not None]  # every file once
    assert len(readable) == 12 and dm.skipped_images == 2
    x, y = next(b for b in dm.train_dataloader() if b is not None)
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and len(y) <= 4
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]


def test_imagenet_skip_count_is_shared_with_workers(tmp_path):
    imagenet_fixture(tmp_path)
    dm = ImageNetDataModule(str(tmp_path), batch_size=2, num_workers=2, crop_size=16, resize_size=18)
    dm.setup("fit")
    loader = torch.utils.data.DataLoader(
        dm.data["train"], batch_size=2, num_workers=2, collate_fn=dm.train_dataloader().collate_fn
    )
    n = sum(len(b[1]) for b in loader if b is not None)
    assert n == 12 and dm.skipped_images == 2


def test_imagenet_bad_roots_fail_early_with_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<wnid>/\*\.JPEG"):
        ImageNetDataModule(str(tmp_path / "missing")).num_classes
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageNetDataModule(str(tmp_path / "empty")).setup("fit")
    imagenet_fixture(tmp_path / "extra", corrupt=False)
    (tmp_path / "extra" / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="not in train"):
        ImageNetDataModule(str(tmp_path / "extra")).setup("fit")


def test_imagenet_skipped_images_count_distinct_files_across_epochs(tmp_path):
    imagenet_fixture(tmp_path)
    (tmp_path / "val" / WNIDS[2] / "ILSVRC2012_val_broken.JPEG").write_bytes(b"not a jpeg")
    dm = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, crop_size=16, resize_size=18)
    dm.setup("fit")
    for _ in range(3):  # three validation epochs see the same bad image
        sum(len(b[1]) for b in dm.val_dataloader() if b is not None)
    assert dm.skipped_images == 1
    for epoch in range(3):  # (a new order each epoch, as Lightning sets it; the last 2 files are dropped)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        sum(len(b[1]) for b in loader if b is not None)
    assert dm.skipped_images == 3  # + the two bad training files, once each


def test_imagenet_val_may_lack_a_class(tmp_path):
    imagenet_fixture(tmp_path, corrupt=False)
    import shutil

    shutil.rmtree(tmp_path / "val" / WNIDS[1])
    dm = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, crop_size=16, resize_size=18)
    dm.setup("fit")
    assert dm.num_classes == 3 and sorted({y for _, y in dm.data["val"].samples}) == [0, 2]


def test_digits_from_scikit_learn():
    from sklearn.datasets import load_digits

    from datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=32, train_size=100)
    dm.setup("fit")
    assert [len(dm.data[s]) for s in ("train", "val", "test")] == [100, 297, 500]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and y.max() <= 9
    raw = load_digits()
    assert (
        sorted(dm.data["test"].tensors[1].tolist() + dm.data["val"].tensors[1].tolist()).count(0)
        <= (raw.target == 0).sum()
    )
    with pytest.raises(ValueError, match="leaves no training image"):
        DigitsDataModule(val_size=1000, test_size=900).setup("fit")
