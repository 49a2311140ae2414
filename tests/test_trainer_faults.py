"""Fault injection: SIGKILL at seeded random points of a run (mid-step, mid-save, mid-index)
under both backends, each resumed to the end; and a rank that dies or hangs.

Every kill is a real SIGKILL a process sends itself at a precise point (the worker's
``kill_at``): nothing after it runs, as when a node fails. One launch resumes the
previous point and runs the next one up to its kill (a launch costs more than a job).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch

from tests.helpers.jobs import launch_jobs, paused_pids, start_rank, start_worker
from tests.helpers.processes import (PY, REPO, free_port, kill_job, output_by_deadline, running, start_in_own_group,
                                     wait_for_file)
from tests.helpers.standin import TINY_DPCAP_ON_SHARDS, tiny_config
from tests.helpers.worker import gate_files
from trainer.common.checkpoints import complete_checkpoints

STEPS, EVERY = 6, 2
NOISY = {"privacy.noise_multiplier": 1.0, "privacy.secret_seed": 7, "steps": STEPS,
         "checkpoint.every_steps": EVERY, "checkpoint.keep_last": 2}


def _points(seed: int = 19) -> list[tuple[str, str, int]]:
    """10 (backend, phase, step) points, 5 per backend, drawn from ``seed``."""
    rng = random.Random(seed)
    points = []
    for backend in ("fsdp2", "deepspeed"):
        phases = ["step", "step", "save", "save", "index"]
        rng.shuffle(phases)
        for phase in phases:
            step = {"step": rng.randint(1, STEPS), "save": rng.choice(range(EVERY, STEPS + 1, EVERY)),
                    "index": 0}[phase]
            points.append((backend, phase, step))
    return points


def _write_shards(folder: Path) -> None:
    from data.shards import write_shards
    from data.sources import synthetic_examples

    write_shards(synthetic_examples(96, 0, 32), folder)


def _latest_step(ckpt: Path) -> int:
    done = complete_checkpoints(ckpt)
    return int(done[-1].name.split("_")[1]) if done else 0


def test_sigkill_at_ten_random_points_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """Each point killed, then resumed: the final parameters equal the uninterrupted run's bit for
    bit, the epsilon is the same, and no complete checkpoint was lost (the latest one before the
    kill survives it; the end keeps the last two)."""
    shards = tmp_path / "shards"
    _write_shards(shards)
    for backend in ("fsdp2", "deepspeed"):
        points = [p for p in _points() if p[0] == backend]
        ref_cfg = tiny_config(tmp_path / f"ref_{backend}", **NOISY, backend=backend)
        jobs = [(f"ref_{backend}", ref_cfg, [*TINY_DPCAP_ON_SHARDS, f"data.shards={shards}"])]
        for i, (_, phase, step) in enumerate([*points, (backend, None, 0)]):
            run = tmp_path / f"{backend}_{i}"
            if phase is not None:
                data = shards
                if phase == "index":  # an unindexed copy of the same shards
                    data = run / "shards"
                    data.mkdir(parents=True)
                    for tar in shards.glob("*.tar"):
                        shutil.copy(tar, data)
                cfg = tiny_config(run, **NOISY, backend=backend)
                jobs.append((f"kill_{i}", cfg, [*TINY_DPCAP_ON_SHARDS, f"data.shards={data}", f"kill_at={phase}:{step}"]))
            proc = launch_jobs(1, tmp_path, jobs, "python")
            if phase is not None:
                assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
                # no complete checkpoint lost: the last one saved before the kill is there
                finished = step - 1 if phase == "step" else step - (phase == "save") * EVERY
                assert _latest_step(run / "ckpt") == max(0, finished) // EVERY * EVERY, (backend, phase, step)
            else:
                assert proc.returncode == 0, proc.stderr[-3000:]
            if i:  # the previous point, resumed in this launch
                _, done_phase, _ = points[i - 1]
                resumed = torch.load(tmp_path / f"resume_{i - 1}.pt", weights_only=True)
                ref = torch.load(tmp_path / f"ref_{backend}.pt", weights_only=True)
                assert resumed["summary"]["step"] == STEPS
                assert resumed["summary"]["epsilon_rdp"] == ref["summary"]["epsilon_rdp"]
                for key, value in ref["params"].items():
                    assert torch.equal(resumed["params"][key], value), (backend, points[i - 1], key)
                previous = tmp_path / f"{backend}_{i - 1}" / "ckpt"
                assert [p.name for p in complete_checkpoints(previous)] == ["step_00000004", "step_00000006"]
            if phase is not None:
                jobs = [(f"resume_{i}", cfg, jobs[-1][2][:-1])]


def test_a_hung_rank_fails_the_others_within_the_collective_timeout(tmp_path):
    """Rank 1 stops (SIGSTOP: alive, sockets open, never answering) before step 3; rank 0 waits at
    the step's collective for collective_timeout_s = 10 s, then fails instead of waiting torch's
    30 minutes."""
    cfg = tiny_config(tmp_path, steps=50, collective_timeout_s=10)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    port = free_port()
    ranks = [start_rank(r, 2, port, tmp_path / "c.json", tmp_path / "out.pt", ["pause_at=2"]) for r in (0, 1)]
    try:
        pids = []
        for rank, proc in enumerate(ranks):
            paused, go = gate_files(tmp_path / "out.pt", rank)
            wait_for_file(paused, proc)
            pids.append(int(paused.read_text()))
        os.kill(pids[1], signal.SIGSTOP)
        go.touch()
        _, err = output_by_deadline(ranks[0], 120, "rank 0 still waits for the hung rank 1 after 120 s")
        assert ranks[0].returncode != 0
        assert "timed out" in err.lower() or "timeout" in err.lower(), err[-3000:]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_one_rank_killed_ends_the_job_naming_the_rank(tmp_path):
    """SIGKILL to rank 1 of 2 (torchrun) while both wait before step 3: rank 0 does not train on
    alone nor wait; the job exits, and its report names rank 1."""
    cfg = tiny_config(tmp_path, steps=50, collective_timeout_s=30)
    proc = start_worker(2, tmp_path, cfg, ["pause_at=2"])
    pids = paused_pids(tmp_path / "out.pt", 2, proc)
    os.kill(pids[1], signal.SIGKILL)
    gate_files(tmp_path / "out.pt", 0)[1].touch()
    _, err = output_by_deadline(proc, 120, "the job outlived its killed rank 1 by 120 s",
                                kill=lambda: kill_job(proc, pids))
    assert proc.returncode != 0
    assert "rank      : 1" in err or "[rank1]" in err or "rank 1" in err, err[-3000:]
    assert not running(pids[0])


HUNG_READ = """
import os, sys
from data.shards import write_shards
from data.sources import synthetic_examples
from privacy.sampling import PoissonSampler
from trainer.common.build import build_tokenizer
from trainer.common.config import load_config
from trainer.job.training_data import build_reader, prepare_shards

folder = sys.argv[1]
write_shards(synthetic_examples(16, 0, 16), folder)
cfg = load_config("dpcap_own", [f"data.shards={folder}", "data.num_workers=1", "data.worker_timeout_s=3",
                                "model.overrides.img_size=16"])
index = prepare_shards(cfg, None)
for shard in index.paths:  # a file system that stops answering: opening a shard blocks forever
    os.remove(shard)
    os.mkfifo(shard)
reader = build_reader(cfg, index, PoissonSampler(16, 1.0, 0, max_physical_batch=16), build_tokenizer(cfg))
list(reader.micro_batches(0))
"""


def test_a_data_loader_worker_that_hangs_fails_the_rank_after_worker_timeout_s(tmp_path):
    proc = start_in_own_group([PY, "-c", HUNG_READ, str(tmp_path / "shards")], cwd=REPO)
    _, err = output_by_deadline(proc, 120, "the reader still waits for its hung worker after 120 s")
    assert proc.returncode != 0 and "DataLoader timed out after 3.0 seconds" in err, err[-3000:]
