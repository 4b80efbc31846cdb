"""Deterministic, sharded batches of dialogues.

The training stream is a sequence of global micro-batches: epoch ``e`` shuffles the dialogue indices
with a generator seeded by ``(seed, e)`` and cuts them into consecutive global micro-batches of
``batch_size * world_size`` dialogues (the incomplete tail is dropped so every process gets the same
count). Process ``r`` takes the ``r``-th slice of each. Hence 2 processes x batch b see exactly the
dialogues of 1 process x batch 2b, and the position in the stream, ``(epoch, batch)``, is all a
checkpoint needs to continue it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mediround.data.dialogue import Dialogue


@dataclass(frozen=True)
class StreamPosition:
    """The next global micro-batch to read: ``batch`` within ``epoch``."""

    epoch: int = 0
    batch: int = 0


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled item order of one epoch; the same on every process and every run."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def batches_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Complete global micro-batches in one epoch."""
    return num_items // (batch_size * world_size)


def shard_batch(order: np.ndarray, batch: int, batch_size: int, world_size: int, rank: int) -> list[int]:
    """The indices process ``rank`` reads for global micro-batch ``batch`` of an epoch order."""
    start = batch * batch_size * world_size + rank * batch_size
    return [int(index) for index in order[start : start + batch_size]]


class ShardedStream:
    """An endless stream of this process's micro-batches (lists of dataset indices), resumable."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        position: StreamPosition = StreamPosition(),
    ):
        self.num_items = num_items
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.per_epoch = batches_per_epoch(num_items, batch_size, world_size)
        if self.per_epoch < 1:
            raise ValueError(
                f"{num_items} dialogue(s) cannot fill one global batch of {batch_size} x {world_size} process(es)"
            )
        self.position = position
        self._order = epoch_order(num_items, seed, position.epoch)

    def next_indices(self) -> list[int]:
        """This process's indices of the next global micro-batch; advances the position."""
        epoch, batch = self.position.epoch, self.position.batch
        if batch >= self.per_epoch:
            epoch, batch = epoch + 1, 0
            self._order = epoch_order(self.num_items, self.seed, epoch)
        indices = shard_batch(self._order, batch, self.batch_size, self.world_size, self.rank)
        self.position = StreamPosition(epoch, batch + 1)
        return indices


class DialogueDataset(torch.utils.data.Dataset):
    """Dialogues turned into model samples on access (image decoding happens here, in workers).

    Items are read by ``(epoch, index)``: ``augment(sample, epoch)``, when given, changes a sample as a
    function of its epoch, so an augmentation is the same on every process, worker and resumed run."""

    def __init__(self, dialogues: Sequence[Dialogue], to_sample: Callable[[Dialogue], Any],
                 augment: Callable[[Any, int], Any] | None = None):
        self.dialogues = list(dialogues)
        self.to_sample = to_sample
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dialogues)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample = self.to_sample(self.dialogues[index])
        return sample if self.augment is None else self.augment(sample, epoch)


class BatchLoader:
    """Collated batches for a stream of index lists, prefetched by ``num_workers`` worker processes."""

    def __init__(self, dataset: DialogueDataset, collate: Callable[[list], Any], num_workers: int = 0):
        self.dataset = dataset
        self.collate = collate
        self.num_workers = num_workers

    def iterate(self, index_batches: Sequence[list[tuple[int, int]]]) -> Iterator[Any]:
        """Batches in the given order (a finite list of lists of ``(epoch, index)`` keys)."""
        if self.num_workers == 0:
            for keys in index_batches:
                yield self.collate([self.dataset[key] for key in keys])
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=list(index_batches), collate_fn=self.collate, num_workers=self.num_workers
        )
        yield from loader


def validation_shard(num_items: int, world_size: int, rank: int, limit: int | None = None) -> list[int]:
    """Validation indices of process ``rank``: every ``world_size``-th of the first ``limit`` dialogues."""
    count = num_items if limit is None else min(limit, num_items)
    return list(range(rank, count, world_size))
