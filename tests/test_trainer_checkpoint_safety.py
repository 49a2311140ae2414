"""Checkpoint folders that two jobs, a fresh start or a crafted file cannot destroy: one job per
folder (a lock, real processes), a new run never over an earlier run's checkpoints nor pruning
them, secrets private (0600/0700), DCP storage paths inside the folder, DeepSpeed's own load
weights-only and its files fsynced, a step saved again never missing."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from tests.helpers.jobs import paused_pids, run_worker, start_worker, worker_command
from tests.helpers.processes import PY, REPO, free_port, kill_job
from tests.helpers.standin import TinyCaptioner, tiny_config
from tests.helpers.worker import gate_files
from trainer.common.checkpoints import (DCP_METADATA, META, CheckpointError, ModelOptimizerState, load_dcp,
                                        read_dcp_metadata, read_meta)
from trainer.job.checkpointer import RUN_ID, Checkpointer
from trainer.job.run_lock import LOCK, RunLock, private_folder, releases_lock_on_error


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_second_job_on_the_same_run_is_refused_until_the_first_ends_or_dies(tmp_path):
    """Job A holds the folder, paused mid-run: a second submit (`python -m trainer.train` on 2
    ranks) is refused on both ranks, naming A; A ends cleanly and releases the folder. A job
    killed with SIGKILL leaves its lock behind: the next job takes it over (its pid is gone)."""
    cfg = tiny_config(tmp_path, steps=4, **{"checkpoint.every_steps": 1})
    ckpt = tmp_path / "ckpt"
    first = start_worker(1, tmp_path, cfg, ["pause_at=2"], "python")
    (pid,) = paused_pids(tmp_path / "out.pt", 1, first)
    holder = json.loads((ckpt / LOCK).read_text())
    assert holder["pid"] == pid and holder["host"] == socket.gethostname()
    assert _mode(ckpt / LOCK) == 0o600
    saved = sorted(p.name for p in ckpt.iterdir())
    second = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             str(free_port()), "-m", "trainer.train", "--config", str(tmp_path / "c.json"),
                             "--allow-non-private"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode != 0
    refusals = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 2, second.stderr[-3000:]  # both ranks, neither waiting for the other
    assert all(f"in use by another job (pid {pid} on host {socket.gethostname()}" in r for r in refusals)
    assert sorted(p.name for p in ckpt.iterdir()) == saved  # nothing of A's touched
    gate_files(tmp_path / "out.pt", 0)[1].touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert not (ckpt / LOCK).exists()  # released at the clean exit
    assert [p.name for p in Checkpointer(ckpt, 2, 0).complete()] == ["step_00000003", "step_00000004"]

    # killed: the lock stays, and is stale at once on this host
    (tmp_path / "out.pt.go").unlink()
    (tmp_path / "out.pt.paused0").unlink()
    killed = start_worker(1, tmp_path, {**cfg, "steps": 6}, ["pause_at=5"], "python")
    kill_job(killed, paused_pids(tmp_path / "out.pt", 1, killed))
    assert json.loads((ckpt / LOCK).read_text())["pid"] != pid
    (tmp_path / "again.json").write_text(json.dumps({**cfg, "steps": 6}))
    proc = subprocess.run(worker_command(1, tmp_path / "again.json", tmp_path / "again.pt", [], "python"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the lock" in proc.stderr and "is gone from this host" in proc.stderr
    assert not (ckpt / LOCK).exists()
    assert Checkpointer(ckpt, 2, 0).latest().name == "step_00000006"


def _lock_file(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"host": "node-elsewhere", "pid": 4242, "pid_started": None, "started": time.time(),
              "renewed": time.time(), "token": "theirs"} | fields
    (folder / LOCK).write_text(json.dumps(holder))


def test_a_lock_from_another_host_is_taken_only_once_its_lease_is_over(tmp_path, caplog):
    _lock_file(tmp_path / "fresh")
    with pytest.raises(ValueError, match="pid 4242 on host node-elsewhere.*checkpoint.lock_lease_s=3600"):
        RunLock.acquire(tmp_path / "fresh", 3600, rank=0)
    assert json.loads((tmp_path / "fresh" / LOCK).read_text())["token"] == "theirs"
    _lock_file(tmp_path / "old", renewed=time.time() - 7200)
    with caplog.at_level(logging.WARNING):
        lock = RunLock.acquire(tmp_path / "old", 3600, rank=0)
    assert "lease was last renewed 2.00 h ago" in caplog.text
    # a job whose lease ran out, and whose folder another job took, stops at its next save
    lock.renew()
    _lock_file(tmp_path / "old", token="usurper")
    with pytest.raises(ValueError, match="no longer holds .* pid 4242 on host node-elsewhere"):
        lock.renew()
    lock.release()  # not this job's any more: left alone
    assert json.loads((tmp_path / "old" / LOCK).read_text())["token"] == "usurper"


def test_a_job_that_cannot_be_built_releases_its_folder_at_once(tmp_path):
    """In the same process too: the next attempt (a corrected setting) finds the folder free."""

    class Job:
        @releases_lock_on_error
        def __init__(self, setting_ok: bool):
            self.lock = RunLock.acquire(tmp_path, 60, rank=0)
            if not setting_ok:
                raise ValueError("a bad setting")

    with pytest.raises(ValueError, match="a bad setting"):
        Job(False)
    assert not (tmp_path / LOCK).exists()
    assert Job(True).lock.path == tmp_path / LOCK


class _Tensors:
    """The one method of a backend that Checkpointer.save calls, writing a small file."""

    def save(self, folder: Path) -> None:
        (folder / "tensors").write_text("t")


def test_a_new_run_over_an_earlier_runs_checkpoints_is_refused_and_pruning_keeps_other_runs(tmp_path):
    old = Checkpointer(tmp_path, 2, 0)
    for step in (5, 6):
        old.save(step, _Tensors(), {"step": step})
    new = Checkpointer(tmp_path, 2, 0)
    with pytest.raises(ValueError, match="checkpoint.resume=false, but .* earlier run's checkpoints .*mv "):
        new.start(resume=False)
    assert new.start(resume=True).name == "step_00000006" and new.run_id == old.run_id  # a resume is the same run
    # a run's pruning never touches another run's checkpoints, even of later steps
    other = Checkpointer(tmp_path, 1, 0)
    other.save(2, _Tensors(), {"step": 2})
    other.save(3, _Tensors(), {"step": 3})
    names = [p.name for p in other.complete()]
    assert names == ["step_00000003", "step_00000005", "step_00000006"], names
    assert read_meta(tmp_path / "step_00000003")[RUN_ID] == other.run_id != old.run_id


def test_a_trainer_with_resume_false_over_checkpoints_is_refused_and_deletes_nothing(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    run_worker(1, tmp_path, cfg, launcher="python")
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "ckpt").rglob("*"))
    (tmp_path / "fresh.json").write_text(json.dumps(cfg))
    proc = subprocess.run(worker_command(1, tmp_path / "fresh.json", tmp_path / "fresh.pt",
                                         ["checkpoint.resume=false"], "python"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "checkpoint.resume=false, but" in proc.stderr, proc.stderr[-3000:]
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "ckpt").rglob("*")) == before  # lock released
    # the secrets of that run: meta.json 0600, created so; folders 0700
    step = tmp_path / "ckpt" / "step_00000002"
    assert _mode(step / META) == 0o600 and _mode(step) == 0o700 and _mode(tmp_path / "ckpt") == 0o700


def test_checkpoint_files_and_new_folders_are_private_and_an_open_folder_is_named(tmp_path, caplog):
    umask = os.umask(0o022)  # the usual umask: files 0644 unless created otherwise
    try:
        path = Checkpointer(tmp_path / "runs" / "mine" / "checkpoints", 2, 0).save(1, _Tensors(), {"step": 1})
    finally:
        os.umask(umask)
    assert _mode(path / META) == 0o600
    assert [_mode(p) for p in (path, path.parent, path.parent.parent)] == [0o700] * 3
    open_folder = tmp_path / "shared"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        private_folder(open_folder)
    assert f"{open_folder} is open to other users (mode 755)" in caplog.text and "chmod 700" in caplog.text


def test_a_step_saved_again_is_never_missing(tmp_path, monkeypatch):
    """Saving step 3 again (resumed and stopped at once): the job killed right after the first
    deletion the save makes still leaves a complete step 3."""
    ckpt = Checkpointer(tmp_path, 2, 0)
    ckpt.save(3, _Tensors(), {"step": 3, "try": 1})
    real = shutil.rmtree

    class Killed(BaseException):
        pass

    def killed_after_deleting(path, *args, **kwargs):
        existed = Path(path).exists()
        real(path, *args, **kwargs)
        if existed:
            raise Killed

    monkeypatch.setattr(shutil, "rmtree", killed_after_deleting)
    with pytest.raises(Killed):
        ckpt.save(3, _Tensors(), {"step": 3, "try": 2})
    assert ckpt.latest() == tmp_path / "step_00000003"
    assert read_meta(ckpt.latest())["try"] == 2 and (ckpt.latest() / "tensors").exists()


@pytest.fixture
def dcp_checkpoint(tmp_path):
    import warnings

    with warnings.catch_warnings():  # DCP's note that it saves in one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"app": ModelOptimizerState(TinyCaptioner(), None)}, checkpoint_id=str(tmp_path / "step"))
    return tmp_path / "step"


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_dcp_storage_paths_outside_the_folder_are_refused_before_any_read(dcp_checkpoint, where):
    """A crafted .metadata points DCP at a file outside the checkpoint folder (here a real
    shard moved there, so an unconfined load would read it and succeed)."""
    outside = dcp_checkpoint.parent / "elsewhere.distcp"
    metadata = read_dcp_metadata(dcp_checkpoint)
    for info in metadata.storage_data.values():
        shard = dcp_checkpoint / info.relative_path
        if shard.exists():
            shard.rename(outside)
        info.relative_path = "../elsewhere.distcp" if where == "relative" else str(outside)
    (dcp_checkpoint / DCP_METADATA).write_bytes(pickle.dumps(metadata))
    state = {"app": ModelOptimizerState(TinyCaptioner(), None)}
    with pytest.raises(CheckpointError, match="outside its checkpoint folder.*Nothing was read"):
        load_dcp({"app": state["app"].state_dict()}, dcp_checkpoint)


DEEPSPEED_JOB = """
import json, os, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1]]
from tests.helpers.payloads import craft_torch_file
from tests.helpers.standin import TinyCaptioner, tiny_data
from trainer.common.config import load_config
from trainer.job import deepspeed_backend
from trainer.job.trainer import Trainer

config, marker = sys.argv[2], Path(sys.argv[3])
synced, fsync = [], os.fsync
def recorded(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    return fsync(fd)
os.fsync = recorded

def job(steps):
    cfg = load_config(config, [f"steps={steps}", "backend=deepspeed", "ds.zero_optimization.stage=2"])
    return Trainer(cfg, allow_non_private=True, model_factory=lambda c, t: TinyCaptioner(),
                   train_data=tiny_data(cfg.data.num_examples))
job(1).train()
out = {"synced": synced}
# a file replaced after the check every rank makes, before DeepSpeed reads it
check = deepspeed_backend.check_deepspeed_files
def check_then_swap(folder):
    check(folder)
    craft_torch_file(folder / "mp_rank_00_model_states.pt", marker)
deepspeed_backend.check_deepspeed_files = check_then_swap
try:
    job(2)
    out["resume"] = "loaded"
except ValueError as e:
    out["resume"] = str(e)
print(json.dumps(out))
"""


def test_deepspeed_reads_its_files_weights_only_and_they_are_fsynced(tmp_path):
    cfg = tiny_config(tmp_path, **{"optim.warmup_steps": 0})
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    marker = tmp_path / "MARKER"
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_JOB, str(REPO), str(tmp_path / "c.json"), str(marker)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "refusing" in out["resume"] and "mp_rank_00_model_states.pt" in out["resume"], out["resume"]
    assert not marker.exists()
    step = tmp_path / "ckpt" / "step_00000001"
    synced = {path.replace("/.tmp-step_", "/step_") for path in out["synced"]}  # fsynced before the rename
    written = {str(p) for p in step.rglob("*") if p.is_file()} | {str(step / "deepspeed"), str(step.parent)}
    assert written <= synced, sorted(written - synced)
