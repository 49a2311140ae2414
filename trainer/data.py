"""Per-step batches: Poisson micro-batches of a random-access data set.

A data set here is anything with ``__len__`` and ``__getitem__(i)`` returning
a tuple of tensors (DP-Cap: ``(image [3, H, W], tokens [T])``). The Poisson
sampler (privacy.sampling) decides, from (seed, step) alone, which indices
form each step and how they split into this rank's micro-batches, so the
reader's position is the step number and a resumed run reads exactly what the
uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader


def collate(samples: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...] | None:
    """Stack a micro-batch; None for an empty one (the trainer substitutes a 0-row batch)."""
    if not samples:
        return None
    return tuple(torch.stack(column) for column in zip(*samples))


class _MicroBatches:
    """batch_sampler for DataLoader: every micro-batch of every step from `start`."""

    def __init__(self, sampler: Any, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.sampler.step_batches(step)

    def __len__(self) -> int:
        raise TypeError("the number of micro-batches is random")


class StepLoader:
    """Iterates ``(step, [micro-batch, ...])`` from ``start`` to ``stop``; an empty
    micro-batch is ``None``. Worker processes prefetch across step boundaries."""

    def __init__(self, dataset: Sequence, sampler: Any, start: int, stop: int, num_workers: int):
        self.dataset, self.sampler = dataset, sampler
        self.start, self.stop, self.num_workers = start, stop, num_workers

    def __iter__(self) -> Iterator[tuple[int, list[tuple[torch.Tensor, ...] | None]]]:
        if self.num_workers == 0:
            for step in range(self.start, self.stop):
                yield step, [collate([self.dataset[i] for i in mb])
                             for mb in self.sampler.step_batches(step)]
            return
        loader = DataLoader(self.dataset, batch_sampler=_MicroBatches(self.sampler, self.start, self.stop),
                            collate_fn=collate, num_workers=self.num_workers,
                            persistent_workers=False, prefetch_factor=4)
        it = iter(loader)
        for step in range(self.start, self.stop):
            count = len(self.sampler.step_batches(step))
            yield step, [next(it) for _ in range(count)]
