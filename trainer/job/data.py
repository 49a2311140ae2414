"""The data a job reads: tar shards (written first for synthetic data) through
data.loader.PoissonReader, or an in-memory sequence (small data, tests).

Both have data.loader.PoissonReader's interface: ``num_examples``,
``micro_batches(step)`` yielding this rank's non-empty micro-batches of that
logical step (decided by privacy.sampling.PoissonSampler from (seed, step)),
``skipped``, and ``state_dict()`` / ``load_state_dict()`` (the next step), so a
resumed run reads exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.common.config import JobConfig
from trainer.common.inputs import transform
from trainer.job.distributed import Distributed

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"


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


def prepare_shards(cfg: JobConfig, d: Distributed) -> Path:
    """The job's shard index; synthetic shards are written first, once, by rank 0."""
    from data.shards import write_shards
    from data.sources import synthetic_examples

    if not cfg.data.shards and cfg.data.source != "synthetic":
        raise ValueError("set data.shards=FOLDER (tar shards with index.json)")
    index = Path(cfg.data.shards or cfg.run_dir / "shards") / INDEX_NAME
    if cfg.data.source == "synthetic" and d.is_main and not index.is_file():
        size = cfg.model.overrides.get("img_size", 224)
        logger.info("writing %d synthetic examples (%dx%d) to %s", cfg.data.num_examples, size, size,
                    index.parent)
        write_shards(synthetic_examples(cfg.data.num_examples, cfg.data.seed, size), index.parent)
    if dist.is_initialized():
        dist.barrier()
    if not index.is_file():
        raise ValueError(f"data.shards={cfg.data.shards}: no {INDEX_NAME} there (write shards with "
                         f"python -m data.write_shards)")
    return index


def build_reader(cfg: JobConfig, index: Path, sampler, tokenizer, *, pin_memory: bool = False):
    from data.loader import PoissonReader

    return PoissonReader(index, sampler, transform(cfg, tokenizer, training=True),
                         num_workers=cfg.data.num_workers, pin_memory=pin_memory)


def count_examples(index: Path) -> int:
    from data.tar_index import TarIndex

    return len(TarIndex(index))
