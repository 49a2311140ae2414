"""trainer.common.torch_compat: the collectives behave as documented on the installed torch,
and no other module calls an API that only some supported torch versions have."""

import ast
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.processes import REPO
from trainer.common import torch_compat
VERSION_DEPENDENT = {"reduce_scatter_single", "all_gather_single", "reduce_scatter_tensor", "all_gather_into_tensor"}


def test_version_dependent_names_are_used_only_in_the_compat_module():
    offenders = []
    for package in ("trainer", "privacy", "models", "data"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "torch_compat.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in VERSION_DEPENDENT:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.attr}")
    assert offenders == []


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = torch.arange(world * 3 * 2, dtype=torch.float32).reshape(world * 3, 2) * (rank + 1)
        part = torch.empty(3, 2)
        torch_compat.reduce_scatter_sum(part, rows, None)
        gathered = torch.empty(world * 3, 2)
        torch_compat.all_gather(gathered, part, None)
        results[rank] = (part.clone(), gathered.clone())
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_gloo_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, port, results), nprocs=world)
        results = dict(results)
    total = torch.arange(world * 3 * 2, dtype=torch.float32).reshape(world * 3, 2) * sum(r + 1 for r in range(world))
    for rank in range(world):
        part, gathered = results[rank]
        assert torch.equal(part, total[3 * rank: 3 * rank + 3])
        assert torch.equal(gathered, total)
