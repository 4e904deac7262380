"""Kinetics (or any video folder in its layout) through ``pytorchvideo.data.Kinetics``, decoded with PyAV.

Training: one random clip per video and epoch; validation: ``val_clips`` uniformly spaced clips per
video, each scored on its own; test: ``test_clips`` uniform clips x ``test_crops`` spatial crops per
video, returned together so the task averages the views (how Kinetics results are reported).

Sharding: each rank reads a distinct part of the videos (a ``DistributedSampler`` as pytorchvideo's
``video_sampler``, as in its Lightning example), and pytorchvideo splits that part between the
DataLoader workers. Every worker yields whole batches and a fixed number of them, so the trainer
knows the epoch length and every rank runs the same number of steps; an unreadable video is
replaced by further clips of the same shard.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import multiprocessing as mp
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler, get_worker_info

from ssn.checks import check_range
from ssn.integrations import bridge_pytorchvideo

from .base import SplitDataModule

# NOTE: at import, not only before building the transforms: a worker or rank started with
# "spawn" unpickles the transforms after importing this module, in a fresh interpreter.
bridge_pytorchvideo()

__all__ = ["KineticsDataModule", "ClipStream", "LAYOUT"]

log = logging.getLogger(__name__)

LAYOUT = """expected one of the two layouts of pytorchvideo.data.Kinetics:
  {root}/train.csv, {root}/val.csv [, {root}/test.csv]   one video a line: `<path> <label index>`
      (paths relative to {root}, or absolute)
  {root}/train/<class>/*.mp4, {root}/val/<class>/*.mp4 [, {root}/test/<class>/*.mp4]
      (one folder per class, the same classes in every split)"""
MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # pytorchvideo's Kinetics statistics


class _EpochSampler(Sampler[None]):
    """The index stream of an iterable dataset's loader, forwarding Lightning's ``set_epoch``.

    NOTE: Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` at each epoch start;
    an IterableDataset's loader otherwise has no sampler of ours, and the video order (and the
    rank's shard) would never be reshuffled.
    """

    def __init__(self, stream: ClipStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


class _CountingVideo:
    """A decoded video that reports clips it cannot decode to its :class:`ClipStream`."""

    def __init__(self, video: Any, on_fail: Callable[[str], None]) -> None:
        self._video, self._on_fail = video, on_fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._video, name)

    def get_clip(self, start: float, end: float) -> dict[str, Any]:
        clip = self._video.get_clip(start, end)
        if clip is None or clip.get("video") is None:
            self._on_fail(f"no frames decoded in [{float(start):.2f}, {float(end):.2f}) s")
        return clip


class _CountingHandler:
    """Wraps pytorchvideo's ``VideoPathHandler``: failed opens are counted before it skips them."""

    def __init__(self, handler: Any, stream: ClipStream) -> None:
        self._handler, self._stream = handler, stream

    def video_from_path(self, path: str, **kwargs: Any) -> Any:
        try:
            video = self._handler.video_from_path(path, **kwargs)
        except Exception as e:
            self._stream.mark_bad(path, f"{type(e).__name__}: {e}")
            raise  # pytorchvideo logs at debug level and moves on to the next video
        return _CountingVideo(video, functools.partial(self._stream.mark_bad, path))


class ClipStream(IterableDataset):
    """pytorchvideo's ``LabeledVideoDataset`` as fixed-length batches, with unreadable videos counted.

    Args:
        dataset: built by ``pytorchvideo.data.Kinetics`` with a ``DistributedSampler`` video sampler.
        samples_per_video: clips taken from each video (train 1, val ``val_clips``); with ``views``
            > 1 a sample is one video's views stacked.
        views: clips x crops per video that form one test sample (1: every clip is a sample).
        batch_size: samples per batch; each worker batches its own clips.
        num_workers: the DataLoader workers that will read this stream (for the epoch length).
    """

    def __init__(
        self, dataset: Any, *, samples_per_video: int, views: int, batch_size: int, num_workers: int
    ) -> None:
        self.dataset = dataset
        self.samples_per_video, self.views = samples_per_video, views
        self.batch_size, self.num_workers = batch_size, num_workers
        paths = dataset._labeled_videos  # (path with prefix, info) per video index
        self._index = {paths[i][0]: i for i in range(len(paths))}
        self._bad = mp.Array("b", len(paths), lock=False)  # NOTE: shared with the worker processes
        self._epoch = mp.Value("i", 0, lock=False)
        self._logged: set[str] = set()
        # NOTE: pytorchvideo gives up (RuntimeError) after 10 consecutive failures; here a shard may
        # hold any number of bad videos, and a worker stops once it has tried every one.
        dataset._MAX_CONSECUTIVE_FAILURES = len(paths) + 1
        dataset.video_path_handler = _CountingHandler(dataset.video_path_handler, self)

    # ------------------------------------------------------------------------ bookkeeping
    @property
    def skipped(self) -> int:
        """Distinct videos found unreadable so far (this process and its workers)."""
        return int(sum(self._bad))

    def mark_bad(self, path: str, reason: str) -> None:
        i = self._index.get(path)
        if i is not None:
            self._bad[i] = 1
        if path not in self._logged:
            self._logged.add(path)
            log.warning("skipping unreadable video %s (%s)", path, reason)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def _worker_videos(self, worker: int, workers: int) -> int:
        # NOTE: the split pytorchvideo's MultiProcessSampler makes of this rank's videos.
        return len(np.array_split(range(len(self.dataset.video_sampler)), max(1, workers))[worker])

    def _worker_batches(self, worker: int, workers: int) -> int:
        samples = self._worker_videos(worker, workers) * self.samples_per_video
        return math.ceil(samples / self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank, summed over the workers."""
        workers = max(1, self.num_workers)
        return sum(self._worker_batches(w, workers) for w in range(workers))

    # --------------------------------------------------------------------------- iteration
    def _samples(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        # NOTE: a previous epoch may have stopped inside a video (pytorchvideo keeps it open).
        ds._loaded_video_label, ds._next_clip_start_time = None, 0.0
        ds._clip_sampler.reset()
        ds.video_sampler.set_epoch(self._epoch.value)
        if self.views == 1:
            yield from ds
            return
        group: list[dict[str, Any]] = []
        for sample in ds:  # the views of one video come in order, from one worker
            if group and sample["video_index"] != group[0]["video_index"]:
                group = []  # an incomplete video (a clip failed to decode): dropped
            group.append(sample)
            if len(group) == self.views:
                yield {**group[0], "video": torch.stack([g["video"] for g in group])}
                group = []

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        wanted = self._worker_videos(worker, workers) * self.samples_per_video
        batch: list[dict[str, Any]] = []
        done = 0
        while done < wanted:
            before = done
            for sample in self._samples():
                batch.append(sample)
                done += 1
                if len(batch) == self.batch_size or done == wanted:
                    yield _collate(batch)
                    batch = []
                if done == wanted:
                    return
            if done == before:
                raise RuntimeError(f"every video of this shard is unreadable ({self.skipped} skipped so far)")
            # NOTE: some videos were unreadable: refill with the shard's readable clips again, so
            # this worker (and so every rank) still yields its fixed number of batches.


def _collate(samples: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """Clips ``(N, C, T, H, W)`` (test: ``(N * views, C, T, H, W)``, views of a video adjacent)
    and labels ``(N,)``."""
    video = torch.cat([s["video"] if s["video"].dim() == 5 else s["video"][None] for s in samples])
    return video, torch.tensor([int(s["label"]) for s in samples])


def _read_list(path: Path) -> list[tuple[int, int]]:
    """(line number, label) of each `<path> <label>` line of a list file; a malformed line is named."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rsplit(None, 1)
        try:
            rows.append((number, int(fields[1])))
        except (IndexError, ValueError):
            raise ValueError(
                f"{path} line {number}: expected `<path> <label index>`, got {line[:120]!r}"
            ) from None
    return rows


def _first(batch: list[Any]) -> Any:
    return batch[0]  # the stream yields whole batches; the loader's batch of one is unwrapped


class KineticsDataModule(SplitDataModule):
    """Kinetics-400/600/700 (or any video set in its layout) for video classification.

    Clips of ``frames`` frames taken every ``sampling_rate`` frames of a ``fps`` video (pytorchvideo's
    Slow 8x8: 8 frames x 8 = a 64-frame window at 30 fps, 2.13 s). Train: random clip,
    ``RandomShortSideScale(*train_short_side)``, ``RandomCrop(crop_size)``, horizontal flip; val:
    ``ShortSideScale(val_short_side)`` + ``CenterCrop(crop_size)``; test: ``ShortSideScale`` + 3
    uniform crops (left/centre/right) or a centre crop. Pixels: ``Div255`` then
    ``Normalize(0.45, 0.225)``.

    Args:
        root: a folder in one of the two layouts (see ``LAYOUT``).
        batch_size: clips per device (test: videos per device, each with all its views).
        num_workers: DataLoader workers per device.
        test_crop_size: of the test views (default ``crop_size``; SlowFast tests Slow 8x8 on 256-pixel
            crops, which the network's global average over its head pooling accepts).
        num_classes: the number of classes (default: largest train label + 1, or the class
            folders); every list file's labels are checked against it when the module is set up.
        seed: of the video order (the same on every rank, which keeps the shards disjoint).
    """

    in_channels = 3

    def __init__(
        self,
        root: str,
        batch_size: int = 8,
        num_workers: int = 8,
        frames: int = 8,
        sampling_rate: int = 8,
        fps: float = 30.0,
        crop_size: int = 224,
        train_short_side: tuple[int, int] = (256, 320),
        val_short_side: int = 256,
        val_clips: int = 1,
        test_clips: int = 10,
        test_crops: int = 3,
        test_crop_size: int | None = None,
        num_classes: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if test_crops not in (1, 3):
            raise ValueError(f"test_crops must be 1 (centre) or 3 (left, centre, right), got {test_crops}")
        for name, value in (
            ("batch_size", batch_size),
            ("frames", frames),
            ("sampling_rate", sampling_rate),
            ("crop_size", crop_size),
            ("val_short_side", val_short_side),
            ("val_clips", val_clips),
            ("test_clips", test_clips),
            ("test_crop_size", test_crop_size),
            ("num_classes", num_classes),
            *(("train_short_side (each)", v) for v in train_short_side),
        ):
            check_range(name, value, "[1, inf)")
        check_range("num_workers", num_workers, "[0, inf)")
        check_range("fps", fps, "(0, inf)")
        # NOTE: num_classes stays out of the hparams: the task's (linked from this module's property)
        # is the one the loggers record, and Lightning refuses two different values of one key.
        self.save_hyperparameters(ignore=["num_classes"])
        self.batch_size = batch_size
        self.root = Path(root).expanduser()
        self._num_classes = num_classes  # as given; the checked count is self._classes
        self._classes: int | None = None
        self.data: dict[str, ClipStream] = {}

    # ------------------------------------------------------------------------------ layout
    def _source(self, split: str) -> Path | None:
        """The list file or class folder of ``split`` (None when absent)."""
        for path in (self.root / f"{split}.csv", self.root / split):
            if path.exists():
                return path
        return None

    def _check_root(self) -> int:
        """The number of classes, after checking the layout and every label against it."""
        train, val = self._source("train"), self._source("val")
        if not self.root.is_dir() or train is None or val is None:
            missing = "train" if train is None else "val"
            raise FileNotFoundError(
                f"no videos at {self.root}: no {missing}.csv or {missing}/; " + LAYOUT.format(root=self.root)
            )
        given = self._num_classes
        if train.is_dir():
            classes = sorted(p.name for p in train.iterdir() if p.is_dir())
            if not classes:
                raise FileNotFoundError(f"{train} has no class folders; " + LAYOUT.format(root=self.root))
            for split in ("val", "test"):
                other = self._source(split)
                found = (
                    sorted(p.name for p in other.iterdir() if p.is_dir())
                    if other and other.is_dir()
                    else classes
                )
                if found != classes:
                    # NOTE: pytorchvideo indexes each split's own sorted folders: different folders
                    # would silently shift the labels.
                    raise ValueError(
                        f"{other}: class folders differ from train's: "
                        f"{sorted(set(found) ^ set(classes))[:5]}; " + LAYOUT.format(root=self.root)
                    )
            if given is not None and given != len(classes):
                raise ValueError(f"num_classes is {given} but {train} has {len(classes)} class folders")
            return len(classes)
        lists = {
            split: _read_list(src)
            for split in ("train", "val", "test")
            if (src := self._source(split)) is not None and src.is_file()
        }
        if not lists["train"]:
            raise ValueError(f"{train} holds no `<path> <label>` lines; " + LAYOUT.format(root=self.root))
        count = given if given is not None else max(label for _, label in lists["train"]) + 1
        for split, rows in lists.items():
            bad = [(line, label) for line, label in rows if not 0 <= label < count]
            if bad:
                where = ", ".join(f"line {line}: {label}" for line, label in bad[:5])
                raise ValueError(
                    f"{self._source(split)}: labels outside 0..{count - 1} ({count} classes"
                    f"{'' if given is not None else ', from train.csv'}): {where}"
                )
        return count

    @property
    def num_classes(self) -> int:
        if self._classes is None:
            self._classes = self._check_root()
        return self._classes

    @property
    def skipped_videos(self) -> int:
        """Distinct videos skipped as unreadable so far, over every split and worker of this rank."""
        return sum(s.skipped for s in self.data.values())

    @property
    def skipped_images(self) -> int:
        # NOTE: the name NormTask.on_train_epoch_end logs (data/skipped_images); here it counts videos.
        return self.skipped_videos

    # ------------------------------------------------------------------------------ build
    def _transform(self, split: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        from pytorchvideo import transforms as V
        from torchvision import transforms as T

        hp = self.hparams
        pixels = [V.UniformTemporalSubsample(hp.frames), V.Div255(), V.Normalize(MEAN, STD)]
        if split == "train":
            lo, hi = hp.train_short_side
            video = [
                *pixels,
                V.RandomShortSideScale(lo, hi),
                T.RandomCrop(hp.crop_size),
                T.RandomHorizontalFlip(),
            ]
        elif split == "val":
            video = [*pixels, V.ShortSideScale(hp.val_short_side), T.CenterCrop(hp.crop_size)]
        else:
            test_crop = hp.test_crop_size or hp.crop_size
            video = [*pixels, V.ShortSideScale(hp.val_short_side)]
            video += [T.CenterCrop(test_crop)] if hp.test_crops == 1 else []
        steps: list[Callable] = [V.ApplyTransformToKey("video", T.Compose(video))]
        if split == "test" and hp.test_crops == 3:
            steps.append(V.UniformCropVideo(test_crop))  # the crop of each view's aug_index
        return T.Compose([*steps, V.RemoveKey("audio")])

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _stream(self, split: str) -> ClipStream:
        from pytorchvideo.data import Kinetics, make_clip_sampler

        hp = self.hparams
        source = self._source(split)
        if source is None and split == "test":
            source = self._source("val")  # NOTE: Kinetics' test labels are not public: test on val
        if source is None:
            raise FileNotFoundError(
                f"no {split}.csv or {split}/ under {self.root}; " + LAYOUT.format(root=self.root)
            )
        duration = hp.frames * hp.sampling_rate / hp.fps
        if split == "train":
            sampler, per_video, views = make_clip_sampler("random", duration), 1, 1
        elif split == "val":
            sampler, per_video, views = (
                make_clip_sampler("constant_clips_per_video", duration, hp.val_clips),
                hp.val_clips,
                1,
            )
        else:
            views = hp.test_clips * hp.test_crops
            sampler = make_clip_sampler("constant_clips_per_video", duration, hp.test_clips, hp.test_crops)
            per_video = 1
        world, rank = self._rank()
        video_sampler = functools.partial(
            DistributedSampler, num_replicas=world, rank=rank, shuffle=split == "train", seed=hp.seed
        )
        ds = Kinetics(
            data_path=str(source),
            clip_sampler=sampler,
            video_sampler=video_sampler,
            transform=self._transform(split),
            video_path_prefix=str(self.root) if source.is_file() else "",
            decode_audio=False,
            decoder="pyav",
        )
        return ClipStream(
            ds,
            samples_per_video=per_video,
            views=views,
            batch_size=self.batch_size,
            num_workers=hp.num_workers,
        )

    def setup(self, stage: str | None = None) -> None:
        self.num_classes  # noqa: B018 (a bad root fails here, with the layout)
        for split in {"validate": ("val",), "test": ("test",)}.get(stage or "fit", ("train", "val")):
            if split not in self.data:
                self.data[split] = self._stream(split)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        """A stream is batched, sharded and shuffled by itself: the loader takes one batch at a time."""
        stream = self.data[split]
        if split == "train" and self.trainer is not None:
            stream.set_epoch(self.trainer.current_epoch)  # a resumed run continues the order
        w = self.hparams.num_workers
        loader = DataLoader(
            stream,
            batch_size=1,
            num_workers=w,
            collate_fn=_first,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=w > 0,
        )
        loader.batch_sampler.sampler = _EpochSampler(stream)
        return loader
