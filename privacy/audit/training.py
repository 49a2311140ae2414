"""One audited training run: the engine under test, exactly as a trainer drives it.

Every rank samples its slice of the step's Poisson batch
(:class:`~privacy.sampling.PoissonSampler`), splits it into micro-batches,
calls ``engine.backward`` on each micro-batch's per-example losses, then
``engine.finish_step()``, the optimizer's step and ``engine.zero_grad()``.
Nothing of the DP step is re-implemented here: whatever the engine does (or
fails to do) is what the canaries see.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from privacy.audit.ranks import run_ranks
from privacy.sampling import PoissonSampler
from privacy.seeds import derived_seeds

# (model, max_grad_norm, noise_multiplier, expected_batch_size, seed, reducer) -> engine
EngineFactory = Callable[..., object]
# PoissonSampler's constructor -> an object with its expected_batch_size and step_batches
SamplerFactory = Callable[..., PoissonSampler]
Observer = Callable[[int, nn.Module], None]


@dataclass(frozen=True)
class Mechanism:
    """The DP-SGD setting of every run of an audit (what the accountant is told)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float = 1.0
    learning_rate: float = 1.0  # plain SGD: the update is -lr * the released gradient
    micro_batch: int = 32       # the largest physical batch per rank
    world_size: int = 1         # simulated ranks (threads), see privacy.audit.ranks

    def __post_init__(self):
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1 or self.micro_batch < 1 or self.world_size < 1:
            raise ValueError(f"steps ({self.steps}), micro_batch ({self.micro_batch}) and world_size "
                             f"({self.world_size}) must be >= 1")
        if not (self.max_grad_norm > 0 and self.learning_rate > 0):
            raise ValueError("max_grad_norm and learning_rate must be > 0")


def _seeds(seed: int) -> tuple[int, int]:
    """(sampler seed, engine noise seed) of one run, independent streams of ``seed``."""
    sampler_seed, engine_seed = derived_seeds(seed, count=2)
    return sampler_seed, engine_seed


def train_private(engine_factory: EngineFactory, model: nn.Module, dataset: tuple[Tensor, ...],
                  mechanism: Mechanism, seed: int, observe: Observer | None = None,
                  sampler_factory: SamplerFactory = PoissonSampler) -> nn.Module:
    """Train a copy of ``model`` per rank on ``dataset`` (tensors indexed by example);
    ``observe(step, model)`` sees rank 0's model after every optimizer step. Returns
    rank 0's trained copy (``model`` itself is left untouched). ``sampler_factory``
    is the batch sampler under test, with :class:`~privacy.sampling.PoissonSampler`'s
    constructor: the accountant's q is only as true as the sampler that draws the batches."""
    size = len(dataset[0])
    if any(len(t) != size for t in dataset):
        raise ValueError(f"dataset tensors disagree on the number of examples: {[len(t) for t in dataset]}")
    sampler_seed, engine_seed = _seeds(seed)
    replicas = [copy.deepcopy(model) for _ in range(mechanism.world_size)]

    def rank_body(rank: int, reducer) -> None:
        replica = replicas[rank]
        sampler = sampler_factory(size, mechanism.sample_rate, sampler_seed, mechanism.world_size, rank,
                                 max_physical_batch=mechanism.micro_batch)
        engine = engine_factory(replica, max_grad_norm=mechanism.max_grad_norm,
                                noise_multiplier=mechanism.noise_multiplier,
                                expected_batch_size=sampler.expected_batch_size, seed=engine_seed, reducer=reducer)
        optimizer = torch.optim.SGD(replica.parameters(), lr=mechanism.learning_rate)
        device = dataset[0].device
        for step in range(mechanism.steps):
            for micro_batch in sampler.step_batches(step):
                index = torch.tensor(micro_batch, dtype=torch.long, device=device)
                engine.backward(replica(*(t[index] for t in dataset)))
            engine.finish_step()
            optimizer.step()
            engine.zero_grad()
            if rank == 0 and observe is not None:
                observe(step, replica)

    run_ranks(mechanism.world_size, rank_body)
    return replicas[0]
