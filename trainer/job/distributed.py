"""Process-group start from the launcher's environment.

Understood launchers: the deepspeed launcher (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT, plus an appended ``--local_rank=N`` argument), torchrun (the
same variables) and Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR
from the environment or SLURM_LAUNCH_NODE_IPADDR). Without any of them the job
runs as a single rank. gloo on CPU, nccl on GPU. Every run has a process group
and a device mesh, a single rank included, so that one code path (FSDP2, DCP)
serves every world size.

Every collective waits at most ``collective_timeout_s`` (the config's; torch's
own defaults are 30 minutes for gloo, 10 for NCCL): a rank that died or hangs
fails the others' next collective after that long instead of holding them.
:func:`agree` is how ranks check, before training, that they see the same run.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env(local_rank_arg: int | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the environment of the launcher."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed launcher, torchrun
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        if "MASTER_ADDR" not in env and "SLURM_LAUNCH_NODE_IPADDR" not in env:
            raise ValueError("Slurm job without MASTER_ADDR: export MASTER_ADDR (first node)")
    else:
        rank, world, local = 0, 1, 0
    if local_rank_arg is not None and local_rank_arg != local:
        raise ValueError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, world size {world})")
    return rank, local, world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank_arg: int | None = None, timeout_s: float = 900.0) -> Distributed:
    rank, local, world = launcher_env(local_rank_arg)
    # what torchrun and the deepspeed launcher export, for a single process or Slurm too
    # (deepspeed.initialize asserts LOCAL_RANK is set)
    for key, value in (("RANK", rank), ("LOCAL_RANK", local), ("WORLD_SIZE", world)):
        os.environ.setdefault(key, str(value))
    if "MASTER_ADDR" not in os.environ:
        if world == 1:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        else:  # Slurm
            os.environ["MASTER_ADDR"] = os.environ["SLURM_LAUNCH_NODE_IPADDR"]
            os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world,))
    logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local, device, backend)
    return Distributed(rank=rank, local_rank=local, world_size=world, device=device, mesh=mesh)


def from_rank0(value: Any) -> Any:
    """Collective: rank 0's ``value`` (a small picklable object) on every rank; it also
    waits for rank 0, as a barrier does."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(fields: dict[str, Any], what: str) -> None:
    """Collective: every rank's ``fields`` (JSON-able values) compared with rank 0's; any
    difference raises the same ValueError on every rank, naming each rank and field that
    differs, so no rank trains alone on what it alone sees."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    seen: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, fields)
    differences = [f"rank {rank} has {key}={value!r}, rank 0 {seen[0].get(key)!r}"
                   for rank, theirs in enumerate(seen[1:], start=1)
                   for key, value in theirs.items() if value != seen[0].get(key)]
    if differences:
        raise ValueError(f"the ranks disagree on {what}: {'; '.join(differences)}. Every rank must see "
                         f"the same files (a shared file system, no stale caches) and the same config")


def reduce_floats(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """Collective: ``values`` reduced across ranks (fp64, one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def shutdown() -> None:
    """Collective: a barrier first, so no rank tears gloo/nccl down while another still talks."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a distributed process now, skipping interpreter teardown.

    After a clean ``shutdown`` a gloo rank sometimes still aborts in a C++
    destructor at interpreter exit ("terminate called without an active
    exception", seen under load), turning a finished run into a failed one.
    Everything worth keeping (checkpoints, event files, logs) is written by now.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

