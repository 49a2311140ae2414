"""The data a job reads: tar shards (written first for synthetic data; indexed first
when another tool wrote them) through data.loader.PoissonReader, or examples given
in memory (:class:`InMemoryData`; a classification job's class folder is
``trainer.job.tasks``').

Every reader has data.loader.PoissonReader's interface:
``micro_batches(step)`` yielding this rank's non-empty micro-batches of that
logical step (decided by privacy.sampling.PoissonSampler from (seed, step)),
``skipped``, and ``state_dict()`` / ``load_state_dict()`` (the next step), so a
resumed run reads exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from data.wids_index import INDEX_NAME
from trainer.common.config import JobConfig
from trainer.common.inputs import transform
from trainer.job.distributed import Distributed

if TYPE_CHECKING:
    from data.shard_sets import ShardIndex

logger = logging.getLogger(__name__)

SYNTHETIC_MARKER = ".synthetic"  # beside shards that _write_synthetic wrote


class InMemoryData(Protocol):
    """Training examples given to the :class:`~trainer.job.trainer.Trainer` in memory (the
    tests' stand-in data) instead of read from data.shards: their number N, and a reader of
    the micro-batches a sampler draws (``micro_batches(step)``, ``skipped``, ``state_dict``)."""

    def __len__(self) -> int: ...

    def reader(self, sampler: Any) -> Any: ...


def prepare_shards(cfg: JobConfig, d: Distributed | None) -> ShardIndex:
    """The job's indexed shards (data.shard_sets): synthetic shards are written first, once,
    by rank 0; shards without an index are indexed once, every rank scanning its share on
    ``data.num_workers`` processes (collective). ``d`` None: one process (the dry run)."""
    from data.shard_sets import cached_index, merge_parts, resolve, scan_part

    if not cfg.data.shards and cfg.data.source != "synthetic":
        raise ValueError("set data.shards: a folder of .tar shards, a glob or a brace pattern "
                         "(e.g. data.shards='/data/laion/{00000..23380}.tar')")
    spec = cfg.data.shards or str(cfg.run_dir / "shards")
    if cfg.data.source == "synthetic":
        _write_synthetic(cfg, Path(spec), d)
    fallback = cfg.run_dir / "shard_index"  # where the index goes if the shards' folder is read-only
    main, rank, world = (True, 0, 1) if d is None else (d.is_main, d.rank, d.world_size)
    shards = _agreed(lambda: resolve(spec), d)
    # rank 0 decides whether to build and where: ranks must agree even if their views differ
    if _agreed(lambda: cached_index(shards, fallback) is None, d, share=True):
        start = time.perf_counter()
        beside = _agreed(lambda: shards.index_dir(fallback) == shards.beside, d, share=True)
        folder = shards.beside if beside else fallback
        if main:
            logger.info("indexing %d shards of data.shards=%s, once (the index is cached in %s), on %s",
                        len(shards.paths), spec, folder, _workers(world, cfg))
        job = f"{cfg.name}-{world}"  # two runs at once on the same shards keep their parts apart
        _agreed(lambda: scan_part(shards, folder, rank, world, _processes(cfg), job), d)
        _agreed(lambda: merge_parts(shards, folder, world, job) if main else None, d)
        if main:
            index = cached_index(shards, fallback)
            logger.info("indexed %d shards (%s samples) in %.1f s on %s: %s and %s",
                        len(index.paths), f"{sum(index.counts):,}", time.perf_counter() - start,
                        _workers(world, cfg), index.index_path, index.offsets_path)
    index = cached_index(shards, fallback)
    if index is None:
        raise ValueError(f"data.shards={spec}: rank {rank} does not see the index rank 0 found or wrote "
                         f"(beside the shards or in {fallback}): every rank needs the same shared file system")
    if main:
        logger.info("data.shards=%s: %d shards, %s samples (index %s)", spec, len(index.paths),
                    f"{sum(index.counts):,}", index.index_path)
    return index


def _write_synthetic(cfg: JobConfig, folder: Path, d: Distributed | None) -> None:
    """Synthetic shards into ``folder``, once, by rank 0; only into a folder that is empty or
    was written by this function before (its marker file), so that a synthetic preset pointed
    at someone's shards (data.shards=/data/mine) never mixes synthetic data into them."""
    from data.shards import write_shards
    from data.sources import synthetic_examples

    def write() -> None:
        if (folder / INDEX_NAME).is_file() and (folder / SYNTHETIC_MARKER).is_file():
            return
        if folder.is_dir() and any(folder.iterdir()) and not (folder / SYNTHETIC_MARKER).is_file():
            raise ValueError(f"data.shards={folder} is not empty and was not written by a synthetic job: "
                             f"data.source=synthetic writes shards there. To train on the shards in it, use "
                             f"data.source=shards (e.g. --config dpcap_own); for synthetic data, name an empty "
                             f"or new folder")
        size = cfg.img_size
        logger.info("writing %d synthetic examples (%dx%d) to %s", cfg.data.num_examples, size, size, folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SYNTHETIC_MARKER).write_text("synthetic shards written by the trainer (data.source=synthetic)\n")
        write_shards(synthetic_examples(cfg.data.num_examples, cfg.data.seed, size), folder)

    _agreed(lambda: write() if d is None or d.is_main else None, d)


def _processes(cfg: JobConfig) -> int:
    return max(1, cfg.data.num_workers)


def _workers(world: int, cfg: JobConfig) -> str:
    ranks, processes = world, _processes(cfg)
    return f"{ranks} rank{'s' * (ranks > 1)} x {processes} process{'es' * (processes > 1)}"


def _agreed(work, d: Distributed | None, share: bool = False):
    """``work()`` on every rank; if it fails on any rank, all raise (none waits forever at the
    next collective). ``share``: rank 0's result (a bool) for everyone. ``d`` None: one process."""
    if d is None:
        return bool(work()) if share else work()
    failure, result = None, None
    try:
        result = work()
    except (OSError, ValueError) as e:
        failure = e
    failed = torch.tensor([failure is not None], dtype=torch.int64, device=d.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        if failure is not None:
            raise ValueError(str(failure)) from failure
        raise ValueError("preparing data.shards failed on another rank (its log says why)")
    if not share:
        return result
    decision = torch.tensor([bool(result)], dtype=torch.int64, device=d.device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def build_reader(cfg: JobConfig, index: ShardIndex, sampler, tokenizer, *, pin_memory: bool = False):
    from data.loader import PoissonReader
    from data.tar_index import TarIndex

    return PoissonReader(TarIndex.of(index.paths, index.counts, index.offsets_path), sampler,
                         transform(cfg, tokenizer, training=True), num_workers=cfg.data.num_workers,
                         worker_timeout_s=cfg.data.worker_timeout_s, pin_memory=pin_memory,
                         captions=cfg.is_captioner)


def count_examples(index: ShardIndex) -> int:
    return sum(index.counts)


def sample_captions(cfg: JobConfig, index: ShardIndex | None, count: int = 500) -> list[str]:
    """Up to ``count`` training captions, spread over the data set (the zero-shot prompt hint):
    the synthetic generator's, or read from the shards (undecodable samples left out)."""
    from data import synthetic
    from data.decode import CAPTION_EXTENSION, BadSample, decode_caption

    n = cfg.data.num_examples
    picks = range(0, n, max(1, n // count))[:count]
    if cfg.data.source == "synthetic":
        return [synthetic.make_scene(cfg.data.seed, i).caption for i in picks]
    if index is None:
        return []
    from data.tar_index import TarIndex

    tars, captions = TarIndex.of(index.paths, index.counts, index.offsets_path), []
    for i in picks:
        try:
            captions.append(decode_caption(tars.members(i)[CAPTION_EXTENSION]))
        except (BadSample, KeyError, OSError, ValueError):
            continue
    return captions
