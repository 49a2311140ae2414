"""Atomic, resumable checkpoints of the training job, whatever its backend.

A step folder's tensors are the backend's (fsdp2: DCP, resharded on load, so a
run resumes on any number of ranks; deepspeed: the engine's save_checkpoint);
everything else, the privacy ledger included, is ``meta.json`` (layout in
``trainer.common.checkpoints``).

Atomicity: every rank writes into ``.tmp-step_N``, then rank 0 writes
``meta.json`` last and renames the folder; a checkpoint without ``meta.json``
or with a ``.tmp-`` name is ignored, so a killed save never replaces the last
good one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.common.checkpoints import META, CheckpointError, complete_checkpoints, unloadable
from trainer.job.backend import Backend

logger = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, rank: int):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.directory)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, backend: Backend, meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-step_{step:08d}"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        backend.save(tmp)
        _barrier()
        if self.rank == 0:
            _write_json(tmp / META, meta)
            if final.exists():  # re-saving a step (e.g. resumed and stopped at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final

    @staticmethod
    def load(path: Path, backend: Backend) -> None:
        """Collective: the backend's tensors of a complete checkpoint, into the job."""
        try:
            backend.load(Path(path))
        except CheckpointError:  # already says which file, and why
            raise
        except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
            raise unloadable(path, e) from e


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
