"""Readers the trainer drives: data.loader.PoissonReader, or an in-memory one.

Both have data.loader.PoissonReader's interface: ``num_examples``,
``micro_batches(step)`` yielding this rank's non-empty micro-batches of that
logical step (decided by privacy.sampling.PoissonSampler from (seed, step)),
``skipped``, and ``state_dict()`` / ``load_state_dict()`` (the next step), so a
resumed run reads exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


class InMemoryReader:
    """Micro-batches of a random-access sequence of tuples of tensors (small data, tests)."""

    def __init__(self, dataset: Sequence[tuple[torch.Tensor, ...]], batch_source: Any):
        self.dataset = dataset
        self.batch_source = batch_source
        self.next_step = 0
        self.skipped = 0

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for indices in self.batch_source.step_batches(step):
            if indices:
                samples = [self.dataset[i] for i in indices]
                yield tuple(torch.stack(column) for column in zip(*samples))
        self.next_step = step + 1

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])
