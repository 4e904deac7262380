"""A training DataLoader that Lightning resumes exactly, mid-epoch included.

A resumed run must see the same batches with the same augmentation as the run it continues. Three
things decide that, and each is made a pure function of saved state:

- **the order**: a permutation of ``(seed, epoch)`` (``torch.utils.data.DistributedSampler``'s own
  rule, sharded by rank), so no global random state is drawn for it; resuming mid-epoch skips the
  indices the saved run had already consumed (on this rank);
- **augmentation in the main process** (``num_workers=0``, or a datamodule's
  ``on_after_batch_transfer``): the global torch / numpy / python random states are saved with the
  loader's position and restored just before the first batch after a resume;
- **augmentation in worker processes**: each sample's random streams are seeded from
  ``(seed, epoch, index)`` inside the worker, so the result does not depend on which worker read it
  or on how far a worker had got when the run was killed.

Lightning saves ``state_dict()`` into every checkpoint and calls ``load_state_dict()`` on resume for
any loader that has them (``lightning.fabric.utilities.types._Stateful``); with a sized loader it
does not prefetch, so the batches yielded are the batches trained on.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

__all__ = ["ResumableLoader", "eval_loader", "rng_states", "run_seed", "set_rng_states"]


def rng_states() -> dict[str, Any]:
    """The process's global random states (torch CPU and CUDA, numpy, python), in types that
    ``torch.load(weights_only=True)`` reads back (Lightning loads checkpoints that way)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def run_seed(default: int = 0) -> int:
    """The run's seed (``seed_everything``'s, exported as ``PL_GLOBAL_SEED``), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


class _ResumableSampler(DistributedSampler):
    """DistributedSampler (a permutation of ``seed + epoch``, this rank's shard) that can start
    after the first ``skip`` indices of its current epoch and yields ``(epoch, index)`` keys.

    NOTE: a DistributedSampler subclass, so Lightning does not replace it under DDP; with one
    process it is one shard of everything.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, drop_last: bool) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        super().__init__(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.skip = 0
        self.skip_epoch = -1

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        skip = self.skip if self.skip_epoch == self.epoch else 0
        self.skip, self.skip_epoch = 0, -1  # a skip applies to one pass only
        order = list(super().__iter__())
        return iter([(self.epoch, i) for i in order[skip:]])


class _SeededSamples(Dataset):
    """Reads ``dataset[index]`` for an ``(epoch, index)`` key; inside a worker process it first seeds
    torch, numpy and python's ``random`` from ``(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if get_worker_info() is not None:
            # NOTE: only in workers: the main process's streams belong to the run (and are what
            # the checkpoint restores); a worker's are private to it.
            s = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
            torch.manual_seed(int(s[0]) << 32 | int(s[1]))
            np.random.seed(int(s[0]))
            random.seed(int(s[1]))
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (e.g. skip counters)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableLoader(DataLoader):
    """The training loader of every map-style datamodule here: shuffled per ``(seed, epoch)``,
    sharded by rank, resumable mid-epoch with the run's random states (see the module docstring).

    Args:
        dataset: the training set.
        seed: the order's and the workers' seed (default: the run's ``seed_everything`` seed).
        shuffle, drop_last: as ``DataLoader``'s; ``drop_last`` also evens the ranks' shards.
        **kwargs: any other ``DataLoader`` argument except ``sampler``/``batch_sampler``/``generator``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        seed = run_seed() if seed is None else seed
        sampler = _ResumableSampler(dataset, shuffle, seed, drop_last)
        # NOTE: a private generator: creating an iterator draws the workers' base seed from it
        # instead of from the global stream the checkpoint restores.
        generator = torch.Generator().manual_seed(seed)
        super().__init__(
            _SeededSamples(dataset, seed),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            generator=generator,
            **kwargs,
        )
        self._batches = 0  # batches yielded in the current pass
        self._restore: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # NOTE: lazy: Lightning creates the first iterator before it sets the sampler's epoch, and
        # worker processes would start reading indices at once.
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        self._batches = self._batches if sampler.skip_epoch == sampler.epoch else 0
        if self._restore is not None:  # the first pass after a resume: the saved run's streams
            set_rng_states(self._restore)
            self._restore = None
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        return {"epoch": sampler.epoch, "batches": self._batches, "seed": sampler.seed, "rng": rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        if state.get("seed", sampler.seed) != sampler.seed:
            raise ValueError(
                f"the checkpoint's data order was seeded with {state['seed']}, this run with "
                f"{sampler.seed}: resume with the same seed_everything"
            )
        if state["batches"] < len(self):  # mid-epoch: skip what the saved run had trained on
            sampler.skip, sampler.skip_epoch = state["batches"] * self.batch_size, state["epoch"]  # type: ignore[operator]
            self._batches = state["batches"]
        self._restore = state["rng"]


def eval_loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
    """A validation/test loader (in order) that draws nothing from the global random streams.

    NOTE: an iterator without a ``generator`` draws its worker seed from the global torch stream;
    validation would then shift the training augmentation of every later step, and a run resumed
    from a checkpoint taken just before a validation would differ from the uninterrupted one.
    """
    kwargs.pop("shuffle", None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(), **kwargs)
