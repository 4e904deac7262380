"""The Kinetics data module on real mp4 files written with PyAV: both layouts, corrupt videos,
workers and two-process sharding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssn
from datamodules.kinetics import MEAN, STD, KineticsDataModule

from helpers import LEVELS, csv_fixture, folder_fixture

SMALL = dict(frames=4, sampling_rate=2, fps=30, crop_size=32, train_short_side=(36, 40), val_short_side=36)


def level_of(clip: torch.Tensor) -> int:
    """The grey level a normalised clip was decoded from."""
    return round(((clip.mean() * STD[0] + MEAN[0]) * 255).item())


def test_class_folders_train_val_and_multiview_test(tmp_path):
    folder_fixture(tmp_path)
    dm = KineticsDataModule(
        str(tmp_path), batch_size=2, num_workers=0, val_clips=2, test_clips=2, test_crops=3, **SMALL
    )
    assert dm.num_classes == 2
    dm.setup("fit")
    dm.setup("test")  # no test split: the val videos, with the multi-view sampling
    train = list(dm.train_dataloader())
    assert len(train) == len(dm.train_dataloader()) == 3  # 6 videos, one random clip each
    assert all(x.shape[1:] == (3, 4, 32, 32) and x.dtype == torch.float32 for x, _ in train)
    assert sorted(torch.cat([y for _, y in train]).tolist()) == [0, 0, 0, 1, 1, 1]
    val = list(dm.val_dataloader())
    assert len(val) == len(dm.val_dataloader()) == 6  # 6 videos x 2 uniform clips
    assert torch.cat([y for _, y in val]).tolist() == [0] * 6 + [1] * 6  # in order
    test = list(dm.test_dataloader())
    assert len(test) == 3 and all(x.shape == (12, 3, 4, 32, 32) and len(y) == 2 for x, y in test)
    x, _ = test[0]  # 2 clips x 3 crops of one video, adjacent; left/centre/right crops of a 36x48 frame
    assert torch.allclose(x[0], x[0].mean(), atol=0.2)  # a grey video stays grey
    assert level_of(x[:6]) == LEVELS[6] and level_of(x[6:]) == LEVELS[7]  # val archery_0, archery_1
    assert dm.skipped_videos == 0


def test_path_label_lists_and_normalisation(tmp_path):
    csv_fixture(tmp_path)
    dm = KineticsDataModule(str(tmp_path), batch_size=4, num_workers=0, **SMALL)
    assert dm.num_classes == 3  # largest label + 1
    dm.setup("validate")
    x, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [0, 1, 2, 0]
    # Div255 then Normalize(0.45, 0.225), on the decoded pixels
    assert [level_of(c) for c in x] == pytest.approx(LEVELS[:4], abs=2)


def test_unreadable_videos_are_skipped_counted_once_and_replaced(tmp_path, caplog):
    folder_fixture(tmp_path)
    bad = tmp_path / "train" / "archery"
    (bad / "garbage.mp4").write_bytes(b"definitely not an mp4")
    good = (bad / "archery_0.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (bad / "empty.mp4").write_bytes(b"")
    dm = KineticsDataModule(str(tmp_path), batch_size=2, num_workers=2, **SMALL)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in range(2):
        loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
        batches = list(loader)
        # 9 videos, 3 unreadable: each worker still yields its fixed number of clips
        assert len(batches) == len(loader) and sum(len(y) for _, y in batches) == 9
        assert dm.skipped_videos == 3 and dm.skipped_images == 3  # distinct files, over workers and epochs
    dm = KineticsDataModule(str(tmp_path), batch_size=2, num_workers=0, **SMALL)
    dm.setup("fit")
    list(dm.train_dataloader())
    assert "skipping unreadable video" in caplog.text and "garbage.mp4" in caplog.text


def test_bad_roots_fail_at_once_with_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<class>/\*\.mp4"):
        KineticsDataModule(str(tmp_path / "missing")).num_classes
    (tmp_path / "nolabels").mkdir()
    (tmp_path / "nolabels" / "train").mkdir()
    (tmp_path / "nolabels" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        KineticsDataModule(str(tmp_path / "nolabels")).setup("fit")
    folder_fixture(tmp_path / "shifted", per_class=1)
    (tmp_path / "shifted" / "val" / "bowling").rename(tmp_path / "shifted" / "val" / "curling")
    with pytest.raises(ValueError, match="class folders differ"):
        KineticsDataModule(str(tmp_path / "shifted")).num_classes
    with pytest.raises(ValueError, match="test_crops"):
        KineticsDataModule(str(tmp_path), test_crops=2)


def test_pytorchvideo_bridge():
    """torchvision 0.29 lacks ``transforms.functional_tensor``, which pytorchvideo's transforms
    import; importing the data module bridges it (NOTE: at import, so that a worker started with
    "spawn" works too: it unpickles the transforms after importing the module)."""
    probe = "import importlib.util as u; print(u.find_spec('torchvision.transforms.functional_tensor'))"
    fresh = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert fresh.stdout.strip() == "None"  # what needs bridging
    import torchvision.transforms._functional_tensor as renamed

    assert sys.modules["torchvision.transforms.functional_tensor"] is renamed  # bridged by the import
    assert ssn.bridge_pytorchvideo() is False  # idempotent
    from pytorchvideo.transforms import augmentations

    assert augmentations.F_t is renamed


# ------------------------------------------------------------------------------------ DDP
WORLD = 2


def _rank_worker(rank: int, root: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    dm = KineticsDataModule(root, batch_size=2, num_workers=2, **SMALL)
    dm.setup("fit")  # no trainer: the rank comes from the process group
    loader = dm.train_dataloader()
    seen = {}
    for epoch in range(2):
        loader.batch_sampler.sampler.set_epoch(epoch)
        batches = list(loader)
        seen[epoch] = {
            "levels": [level_of(c) for x, _ in batches for c in x],
            "batches": len(batches),
            "len": len(loader),
        }
    torch.save(seen, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_ranks_and_two_workers_each_read_a_distinct_shard(tmp_path):
    csv_fixture(tmp_path)
    # NOTE: fork, not spawn: each spawned rank (and each of its spawned workers) would import torch,
    # Lightning and pytorchvideo again, ~10 s apiece on two cores.
    mp.start_processes(
        _rank_worker,
        args=(str(tmp_path), str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    orders = []
    for epoch in range(2):
        got = [r[epoch] for r in ranks]
        assert [g["batches"] for g in got] == [g["len"] for g in got] == [3, 3]  # the same known length
        levels = got[0]["levels"] + got[1]["levels"]
        assert sorted(levels) == pytest.approx(LEVELS, abs=2)  # every video once: disjoint shards
        orders.append(levels)
    assert orders[0] != orders[1]  # set_epoch reshuffles


def test_list_labels_out_of_range_negative_or_malformed_are_named(tmp_path):
    # the lists alone: labels are checked before any video is opened
    (tmp_path / "train.csv").write_text("videos/v0.mp4 0\nvideos/v1.mp4 1\nvideos/v2.mp4 2\n")
    (tmp_path / "val.csv").write_text("videos/v0.mp4 0\nvideos/v1.mp4 -1\n")
    with pytest.raises(
        ValueError, match=r"val.csv: labels outside 0..2 \(3 classes, from train.csv\): line 2: -1"
    ):
        KineticsDataModule(str(tmp_path)).num_classes
    (tmp_path / "val.csv").write_text("videos/v0.mp4 0\n")
    with pytest.raises(ValueError, match=r"train.csv: labels outside 0..1 \(2 classes\): line 3: 2"):
        KineticsDataModule(str(tmp_path), num_classes=2).setup("fit")
    (tmp_path / "test.csv").write_text("videos/v0.mp4 zero\n")
    with pytest.raises(ValueError, match=r"test.csv line 1: expected `<path> <label index>`"):
        KineticsDataModule(str(tmp_path)).num_classes
    folder_fixture(tmp_path / "folders", per_class=1)
    with pytest.raises(ValueError, match="num_classes is 5 but .*train has 2 class folders"):
        KineticsDataModule(str(tmp_path / "folders"), num_classes=5).num_classes
