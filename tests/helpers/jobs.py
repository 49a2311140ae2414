"""Running trainer jobs in the worker script (tests/helpers/worker.py) under real launchers:
the command for each launcher, several jobs in one launch, what rank 0 saved, ranks held at
a gate, ranks started by hand."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from tests.helpers.processes import PY, REPO, free_port, start_in_own_group, wait_for_file
from tests.helpers.worker import THEN, gate_files

WORKER = REPO / "tests" / "helpers" / "worker.py"


def worker_command(world: int, config: Path, out: Path, overrides=(), launcher: str = "torchrun") -> list[str]:
    script = [str(WORKER), str(config), str(out), *overrides]
    if world == 1 and launcher == "python":
        return [PY, *script]
    if launcher == "deepspeed":
        return [str(Path(PY).parent / "deepspeed"), "--no_ssh", "--node_rank", "0",
                "--num_gpus", str(world), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *script]
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-port", str(free_port()), *script]


def launch_jobs(world: int, tmp: Path, jobs: list[tuple[str, dict, list[str]]],
                launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Several jobs ``(name, config, overrides)`` one after the other in one launch, each
    config written to tmp/NAME.json and its results to tmp/NAME.pt; the launch, however it ended."""
    args = []
    for name, cfg, overrides in jobs:
        (tmp / f"{name}.json").write_text(json.dumps(cfg))
        args += [THEN] * bool(args) + [str(tmp / f"{name}.json"), str(tmp / f"{name}.pt"), *overrides]
    return subprocess.run(worker_command(world, Path(args[0]), Path(args[1]), args[2:], launcher), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def run_jobs(world: int, tmp: Path, jobs: list[tuple[str, dict, list[str]]], launcher: str = "torchrun") -> dict:
    """launch_jobs, which must succeed; returns name -> what rank 0 saved."""
    proc = launch_jobs(world, tmp, jobs, launcher)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: torch.load(tmp / f"{name}.pt", weights_only=True) for name, _, _ in jobs}


def run_worker(world: int, tmp: Path, cfg: dict, overrides=(), launcher: str = "torchrun",
               name: str = "out") -> dict:
    """Run the worker to completion; returns what rank 0 saved."""
    return run_jobs(world, tmp, [(name, cfg, list(overrides))], launcher)[name]


def paused_pids(out: Path, world: int, proc: subprocess.Popen) -> list[int]:
    """Wait until every rank of the worker run writing ``out`` (started with pause_at=STEP)
    waits at its gate, having finished STEP steps; their pids, by rank."""
    pids = []
    for rank in range(world):
        paused, _ = gate_files(out, rank)
        wait_for_file(paused, proc)
        pids.append(int(paused.read_text()))
    return pids


def start_rank(rank: int, world: int, port: int, config: Path, out: Path, extra=()) -> subprocess.Popen:
    """One rank of the worker started by hand, as Slurm's srun starts them (no launcher
    watching the others), in a process group of its own."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return start_in_own_group([PY, str(WORKER), str(config), str(out), *extra], cwd=REPO, env=env)


def start_worker(world: int, folder: Path, cfg: dict, overrides=(), launcher: str = "torchrun") -> subprocess.Popen:
    """The worker on ``cfg`` (written to folder/c.json, saving to folder/out.pt), left running
    in a process group of its own: for the tests that pause, signal or kill it."""
    (folder / "c.json").write_text(json.dumps(cfg))
    return start_in_own_group(worker_command(world, folder / "c.json", folder / "out.pt", list(overrides), launcher),
                              cwd=REPO)
