"""Data for the Trainer: resumable, sharded sampling and moving batches to the device.

The order of an epoch depends only on (seed, epoch): ``ShardSampler`` draws the permutation from its
own generator, and each DataLoader gets its own seeded generator, so loading data never touches the
global RNG (which dropout uses) and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)


class ShardSampler(Sampler[int]):
    """Indices of one epoch for one rank, starting at position ``start`` of the rank's share.

    The epoch's order is ``randperm(n)`` seeded with ``seed + epoch`` (or ``0..n-1`` without
    shuffling). With ``pad`` the order is extended by its first indices to a multiple of ``world``
    (every rank then takes the same number of batches); rank r takes positions r, r + world, ...
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        pad: bool = True,
    ) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, epoch
        self.rank, self.world, self.start, self.pad = rank, world, start, pad

    def indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.world > 1 and order:
            order += (order * self.world)[: -len(order) % self.world]
        return order[self.rank :: self.world][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


@dataclass(frozen=True)
class LoaderSpec:
    """How to build a DataLoader over a map-style dataset: from a Dataset, or taken from a loader."""

    dataset: Any
    batch_size: int
    shuffle: bool
    collate_fn: Callable[[list[Any]], Any] | None
    num_workers: int
    drop_last: bool = False
    pin_memory: bool = False


def loader_spec(
    data: Any,
    batch_size: int,
    shuffle: bool,
    collate_fn: Callable[[list[Any]], Any] | None,
    num_workers: int,
) -> LoaderSpec | None:
    """A rebuildable description of ``data``, or None for a plain iterable of batches."""
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or data.batch_size is None:
            return None
        shuffled = _shuffles(data.sampler)
        if shuffled is None:
            return None  # a sampler of its own (subset, weighted, distributed): used as it comes
        return LoaderSpec(
            data.dataset,
            data.batch_size,
            shuffled,
            data.collate_fn,
            data.num_workers,
            data.drop_last,
            data.pin_memory,
        )
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return LoaderSpec(data, batch_size, shuffle, collate_fn, num_workers)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, Mapping):
        return LoaderSpec(data, batch_size, shuffle, collate_fn, num_workers)  # e.g. a list
    if not isinstance(data, Iterable):
        raise TypeError(
            f"training data must be a Dataset, a DataLoader or an iterable of batches, got "
            f"{type(data).__name__}"
        )
    return None


def _shuffles(sampler: Any) -> bool | None:
    """Whether a DataLoader's sampler is torch's plain shuffle (True) or in-order one (False); None
    for any other sampler, whose choice of examples the Trainer's own sampling would not keep."""
    if type(sampler) is SequentialSampler:
        return False
    plain = type(sampler) is RandomSampler and not sampler.replacement
    return True if plain and sampler.num_samples == len(sampler.data_source) else None


def build_loader(spec: LoaderSpec, sampler: ShardSampler, seed: int) -> DataLoader[Any]:
    return DataLoader(
        spec.dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        collate_fn=spec.collate_fn,
        num_workers=spec.num_workers,
        drop_last=spec.drop_last,
        pin_memory=spec.pin_memory,
        generator=torch.Generator().manual_seed(seed),  # worker seeds, not the global RNG
    )


def batches_per_epoch(spec: LoaderSpec | None, data: Any, world: int) -> int | None:
    """Micro-batches one rank sees per epoch (None when the data has no length)."""
    if spec is None:
        return len(data) if hasattr(data, "__len__") else None
    per_rank = -(-len(spec.dataset) // world)
    full, rest = divmod(per_rank, spec.batch_size)
    return full + (1 if rest and not spec.drop_last else 0)


def announce_epoch(data: Any, epoch: int) -> None:
    """Tell a sampler or dataset with ``set_epoch`` (torch's DistributedSampler, an
    ``augment.AugmentedDataset``) which epoch begins, so it can draw new choices for it."""
    for owner in (getattr(data, "sampler", None), getattr(data, "dataset", None), data):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def skip(iterable: Iterable[Any], n: int) -> Iterator[Any]:
    """``iterable`` without its first ``n`` items (resuming a plain iterable of batches)."""
    return itertools.islice(iter(iterable), n, None)


def groups(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` batches (the last one may be shorter)."""
    it = iter(batches)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists, tuples and HF BatchEncodings)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def count_tokens(batch: Any) -> int:
    """Tokens in a batch: the attention mask's ones, else input_ids' size, else the leading dim."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None and first.ndim else 0
    if isinstance(batch, (list, tuple)) and batch:
        return count_tokens(batch[0])
    if isinstance(batch, torch.Tensor):
        return batch.numel() if not batch.is_floating_point() else int(batch.shape[0])
    return 0
