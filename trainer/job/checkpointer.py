"""Atomic, resumable checkpoints of the training job, whatever its backend.

A step folder's tensors are the backend's (fsdp2: DCP, resharded on load, so a
run resumes on any number of ranks; deepspeed: the engine's save_checkpoint);
everything else, the privacy ledger included, is ``meta.json`` (layout in
``trainer.common.checkpoints``).

Atomicity: every rank writes into ``.tmp-step_N`` (0700), then rank 0 writes
``meta.json`` last (0600: it holds the secret seeds) and renames the folder; a
checkpoint without ``meta.json`` or with a ``.tmp-`` name is ignored, so a killed
save never replaces the last good one. A step saved again (resumed and stopped at
once) replaces the old folder by renames: old aside, new in place, old deleted.

One run per folder: the job holds the folder's lock (``trainer.job.run_lock``),
renewed at every save. Every checkpoint records its run's id (``run_id``, drawn
when the run starts and kept by every resume); pruning deletes only this run's
checkpoints. A new run (``checkpoint.resume=false``) over an earlier run's
checkpoints is refused: its saves would mix with them, and every tool that takes
the folder's latest checkpoint could read the old run's.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.common.checkpoints import (
    META,
    CheckpointError,
    complete_checkpoints,
    fsync_dir,
    read_meta,
    unloadable,
    write_private_json,
)
from trainer.job.backend import Backend
from trainer.job.distributed import agree, from_rank0
from trainer.job.run_lock import PRIVATE, RunLock, private_folder

logger = logging.getLogger(__name__)

RUN_ID = "run_id"  # meta.json: the run that wrote the checkpoint


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """``lock``: rank 0's hold on the folder (None on the other ranks, and in tools that
    write one checkpoint outside a job)."""

    def __init__(self, directory: Path, keep_last: int, rank: int, lock: RunLock | None = None):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.lock = lock
        self.run_id = secrets.token_hex(8)  # a new run's; start() keeps a resumed run's

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.directory)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def start(self, resume: bool) -> Path | None:
        """Collective: the checkpoint this job resumes from (None: a new run).

        Rank 0 chooses it and every rank must see it: ranks choosing alone, on a file
        system with attribute caching, could resume different steps. A ValueError on
        every rank if a rank does not see it, or if a new run (``resume`` false) would
        start over an earlier run's checkpoints."""
        latest = self.latest() if self.rank == 0 else None
        name = from_rank0(None if latest is None else latest.name)
        if name is None:
            return None
        latest = self.directory / name
        if not resume:
            raise ValueError(
                f"checkpoint.resume=false, but {self.directory} holds an earlier run's checkpoints (latest: "
                f"{name}); a new run there would mix its checkpoints with them, and resume, --init and "
                f"the tools, which take the folder's latest, could read the old run's. Start the new run in a "
                f"folder of its own (name=NEW_NAME or checkpoint.dir=DIR), or move the old checkpoints aside "
                f"first: mv {self.directory} {self.directory.parent / (self.directory.name + '.old')}")
        agree({f"{name} visible": (latest / META).is_file()},
              f"the checkpoint rank 0 resumes from ({name} in {self.directory})")
        self.run_id = read_meta(latest).get(RUN_ID)  # None: written before run ids; all such are this run's
        return latest

    def save(self, step: int, backend: Backend, meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-step_{step:08d}"
        refusal = None
        if self.rank == 0:
            try:
                if self.lock is not None:
                    self.lock.renew()
                if not self.directory.exists():
                    private_folder(self.directory)
                for stale in self.directory.glob(".tmp-*"):  # killed saves (of this run: the folder is locked)
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(mode=PRIVATE)
            except (OSError, ValueError) as e:
                refusal = str(e)
        refusal = from_rank0(refusal)  # and no rank writes before the folder is there
        if refusal is not None:
            raise ValueError(refusal)
        backend.save(tmp)
        _barrier()
        if self.rank == 0:
            write_private_json(tmp / META, {**meta, RUN_ID: self.run_id})
            old = self.directory / f".tmp-old-{final.name}"
            if final.exists():  # re-saving a step (e.g. resumed and stopped at once)
                os.rename(final, old)
            os.replace(tmp, final)
            fsync_dir(self.directory)
            shutil.rmtree(old, ignore_errors=True)
            self._prune()
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final

    def _prune(self) -> None:
        """All but the last ``keep_last`` checkpoints of this run; other runs' are never touched."""
        ours = [path for path in self.complete() if _run_of(path) == self.run_id]
        for old in ours[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: Path, backend: Backend) -> None:
        """Collective: the backend's tensors of a complete checkpoint, into the job."""
        try:
            backend.load(Path(path))
        except CheckpointError:  # already says which file, and why
            raise
        except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
            raise unloadable(path, e) from e


def _run_of(path: Path) -> str | None:
    """The run that wrote a checkpoint; a damaged meta.json is no run's (never pruned)."""
    try:
        return read_meta(path).get(RUN_ID)
    except ValueError:
        return "unreadable"
