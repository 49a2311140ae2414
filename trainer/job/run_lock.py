"""One job per checkpoint folder: an exclusive lock file, ``.lock``, beside the checkpoints.

Two jobs writing one folder (a requeued job whose first copy still runs, a submit sent
twice) delete each other's saves in progress, mix their files into one "complete"
checkpoint and prune each other's. So rank 0 creates ``.lock`` with
``O_CREAT | O_EXCL`` (atomic: of two jobs, one creates it), mode 0600, holding its
host, pid (and the process's start time, so a reused pid is not taken for it), start
time, a random token and the time its lease was last renewed; the other ranks learn
the outcome from rank 0, so a refusal stops every rank and none waits at a collective.

A lock is stale, and taken over (logged), when its process is gone from this host, or
when its lease, renewed at every save, is older than ``checkpoint.lock_lease_s`` (a
job on another host cannot be asked whether it lives). A job that saves less often
than its lease may thus lose its lock to a job on another host; its next save finds
the other's token in the file and stops before writing anything.

The lock is released when the job ends: at the end of ``Trainer.train`` (SIGTERM and
SIGUSR1 end it too), when the ``Trainer`` cannot be built, and at interpreter exit
after an error. A killed job (SIGKILL) leaves it behind, stale at once on its host.

Folders this job creates on the way to its checkpoints are private (0700): the
checkpoints hold the run's secret seeds, and the README asks for a shared file system.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.common.checkpoints import write_private_json
from trainer.job.distributed import from_rank0

logger = logging.getLogger(__name__)

LOCK = ".lock"
PRIVATE = 0o700


def private_folder(path: Path) -> None:
    """``path`` and its missing parents, created 0700; a warning when ``path`` is open to
    other users (its checkpoints hold the run's secret seeds)."""
    path = Path(path)
    missing, parent = [], path
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("%s is open to other users (mode %o): its checkpoints hold the run's secret noise and "
                       "sampling seeds; chmod 700 %s", path, mode, path)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: /proc/PID/stat's starttime), None if it is gone or unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    fields = {"host": str, "pid": int, "started": (int, float), "renewed": (int, float), "token": str}
    whole = isinstance(holder, dict) and all(isinstance(holder.get(k), t) for k, t in fields.items())
    return holder if whole and holder["pid"] > 0 else None


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"]))
    return f"pid {holder['pid']} on host {holder['host']}, started {started}"


@dataclass
class RunLock:
    path: Path
    token: str
    lease_s: float
    released: bool = False

    @classmethod
    def acquire(cls, directory: Path, lease_s: float, rank: int) -> RunLock | None:
        """Collective: rank 0 takes the folder's lock (creating the folder, 0700) and returns
        it; other ranks get None. A ValueError on every rank, naming the holder, if another
        job holds it."""
        if not lease_s > 0:
            raise ValueError(f"checkpoint.lock_lease_s={lease_s:g}: must be > 0 (seconds; a lock older is taken over)")
        lock, refusal = None, None
        if rank == 0:
            try:
                lock = cls._take(Path(directory), lease_s)
            except (OSError, ValueError) as e:
                refusal = str(e)
        refusal = from_rank0(refusal)
        if refusal is not None:
            raise ValueError(refusal)
        return lock

    @classmethod
    def _take(cls, directory: Path, lease_s: float) -> RunLock:
        private_folder(directory)
        path = directory / LOCK
        for _ in range(3):  # a stale lock is moved aside, then taken like a free one
            now = time.time()
            mine = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                    "started": now, "renewed": now, "token": secrets.token_hex(16)}
            try:
                write_private_json(path, mine)
            except FileExistsError:
                holder = _read(path)
                if holder is None:
                    raise ValueError(f"{path} exists but names no job (one writing it right now, or one that died "
                                     f"doing so): if no job runs on {directory}, delete it and start again") from None
                reason = _stale(holder, lease_s)
                if reason is None:
                    raise ValueError(
                        f"{directory} is in use by another job ({_describe(holder)}; lock {path}): two jobs on "
                        f"one checkpoint folder would delete and mix each other's checkpoints. Wait for it to "
                        f"end, stop it, or give this run its own folder (name=NEW_NAME or checkpoint.dir=DIR). "
                        f"A lock whose job is gone is taken over by itself (its pid gone on this host, or its "
                        f"lease older than checkpoint.lock_lease_s={lease_s:g} s)") from None
                logger.warning("taking over the lock %s of %s: %s", path, _describe(holder), reason)
                _break(path, holder)
                continue
            lock = cls(path, mine["token"], lease_s)
            atexit.register(lock.release)  # an error ends the job: the next one need not wait out the lease
            logger.info("locked %s for this job", directory)
            return lock
        raise ValueError(f"{path}: other jobs keep taking this folder's lock; is a job being started twice?")

    def renew(self) -> None:
        """Rank 0, at every save: the lease starts again. A ValueError if the lock is no longer
        this job's (its lease expired and another job took the folder)."""
        holder = _read(self.path)
        if holder is None or holder["token"] != self.token:
            other = _describe(holder) if holder else "nobody (the lock file is gone)"
            raise ValueError(f"this job no longer holds {self.path}: it is held by {other}, which took it "
                             f"over after this job's lease (checkpoint.lock_lease_s={self.lease_s:g} s) "
                             f"expired. This job stops without saving, so the two do not mix their "
                             f"checkpoints; save more often than the lease (checkpoint.every_steps)")
        holder["renewed"] = time.time()
        fresh = self.path.with_name(f"{LOCK}.renew-{self.token}")
        fresh.unlink(missing_ok=True)
        write_private_json(fresh, holder)
        os.replace(fresh, self.path)

    def release(self) -> None:
        """Deletes the lock if it is still this job's; once."""
        if self.released:
            return
        self.released = True
        holder = _read(self.path)
        if holder is not None and holder["token"] == self.token:
            self.path.unlink(missing_ok=True)
            logger.info("released %s", self.path)


def _stale(holder: dict, lease_s: float) -> str | None:
    """Why ``holder``'s lock is stale, or None if it may still be working."""
    if holder["host"] == socket.gethostname() and not _alive(holder["pid"], holder.get("pid_started")):
        return f"its process {holder['pid']} is gone from this host"
    age = time.time() - holder["renewed"]
    if age > lease_s:
        return f"its lease was last renewed {age / 3600:.2f} h ago (checkpoint.lock_lease_s={lease_s:g} s)"
    return None


def _break(path: Path, holder: dict) -> None:
    """Moves a stale lock out of the way. Two jobs may judge it stale at once: the one whose
    rename finds a lock other than the stale one (the other job's, just taken) puts it back."""
    aside = path.with_name(f"{LOCK}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another job moved it first
        return
    if _read(aside) != holder:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink()


def releases_lock_on_error(init):
    """For an ``__init__`` that takes a lock as ``self.lock``: released if the object cannot be
    built (a refused resume, a bad setting), so the next attempt, in this process too, finds
    the folder free."""

    @functools.wraps(init)
    def building(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if getattr(self, "lock", None) is not None:
                self.lock.release()
            raise

    return building
