"""Simulated ranks: several engines in one process, reduced through the reducer hook.

A distributed bug (noise added on one rank only, two ranks drawing the same
noise) is invisible to a single process, and starting real process groups for
every audit run would cost seconds each. Here each rank is a thread with its
own model replica, engine and Poisson slice; :class:`ShardedReducer` plays
FSDP's part behind the engine's :class:`~privacy.reducer.GradReducer` hook:
rank r owns the r-th contiguous part of every flattened parameter, receives
the cross-rank sum of that part, noises it with its own noise stream, and all
parts are gathered into every replica's gradient. Every coordinate is noised
exactly once, by its owner, as in the trainer.
"""

import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

# A rank waits this long for the others at a collective before the run is declared hung.
COLLECTIVE_TIMEOUT_S = 600.0


class InProcessGroup:
    """All-gather between ``world_size`` threads (the one collective the reducer needs)."""

    def __init__(self, world_size: int, timeout: float = COLLECTIVE_TIMEOUT_S):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list[Tensor | None] = [None] * world_size

    def all_gather(self, rank: int, tensor: Tensor) -> list[Tensor]:
        self._slots[rank] = tensor
        self._barrier.wait()
        gathered = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return gathered

    def abort(self) -> None:
        """Release ranks waiting at a collective (they get BrokenBarrierError) after one failed."""
        self._barrier.abort()


class ShardedReducer:
    """FSDP-like reduction for a replica on ``rank``: reduce-scatter, then all-gather on assign."""

    def __init__(self, group: InProcessGroup, rank: int):
        self.group, self.rank = group, rank
        self.noise_stream = rank

    def _part(self, flat: Tensor) -> Tensor:
        return flat.tensor_split(self.group.world_size)[self.rank]

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor:
        total = torch.stack(self.group.all_gather(self.rank, summed)).sum(0)  # same order on every rank
        return self._part(total.flatten()).clone()

    def assign(self, param: nn.Parameter, grad: Tensor) -> None:
        parts = self.group.all_gather(self.rank, grad)
        param.grad = torch.cat(parts).view(param.shape).to(param.dtype)


def run_ranks(world_size: int, body: Callable[[int, ShardedReducer | None], None]) -> None:
    """``body(rank, reducer)`` on every rank: in this thread for one rank (reducer None,
    the engine's own LocalReducer), else one thread per rank; the first error is re-raised."""
    if world_size == 1:
        body(0, None)
        return
    group = InProcessGroup(world_size)
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            body(rank, ShardedReducer(group, rank))
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread below
            errors.append(error)
            group.abort()

    threads = [threading.Thread(target=target, args=(rank,), name=f"audit-rank{rank}") for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise first
