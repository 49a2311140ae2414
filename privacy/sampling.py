"""Poisson sampling: which examples form each logical step, and who reads them.

DP-SGD's privacy amplification assumes every example joins every step
independently with probability q, so batch sizes vary and an empty step is
valid. The draw is a pure function of (seed, step): a resumed run, every rank
and every data-loading worker see the same logical batch without talking to
each other.

The amplification also assumes the adversary cannot tell which steps used an
example, so in a real run ``seed`` should be kept as private as the noise seed.
"""

import numpy as np


class PoissonSampler:
    """The Poisson batch of each step, split across ranks and micro-batches.

    ``logical_batch(step)`` is the whole step's (sorted) index set; each rank
    takes a contiguous slice of it (sizes differ by at most one) and splits it
    evenly into micro-batches of at most ``max_physical_batch``. Every rank
    gets the SAME number of micro-batches, ``ceil(ceil(n / world_size) /
    max_physical_batch)`` for a logical batch of n (zero for an empty step), so
    sharded forward/backward collectives line up; a rank with fewer examples
    than that gets empty micro-batches at the end.
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        *,
        max_physical_batch: int,
    ):
        if not (int(num_examples) == num_examples and num_examples > 0):
            raise ValueError(f"num_examples must be a positive integer, got {num_examples}")
        if not 0 <= sample_rate <= 1:
            raise ValueError(f"sample_rate must be in [0, 1] (expected batch / num_examples), got {sample_rate}")
        if not (int(seed) == seed and seed >= 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if not world_size >= 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not max_physical_batch >= 1:
            raise ValueError(f"max_physical_batch must be >= 1 (the largest micro-batch that fits), "
                             f"got {max_physical_batch}")
        self.num_examples = int(num_examples)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.world_size, self.rank = int(world_size), int(rank)
        self.max_physical_batch = int(max_physical_batch)
        self._last: tuple[int, np.ndarray] | None = None  # loaders ask for the same step repeatedly

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def logical_batch(self, step: int) -> np.ndarray:
        """Sorted int64 indices of every example in ``step`` (read-only).

        A Binomial(N, q) count followed by a uniform subset of that size has
        exactly the distribution of N independent coin flips, at O(batch) cost.
        """
        if not (int(step) == step and step >= 0):
            raise ValueError(f"step must be a non-negative integer, got {step}")
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        rng = np.random.default_rng([self.seed, int(step)])
        count = rng.binomial(self.num_examples, self.sample_rate)
        batch = np.sort(rng.choice(self.num_examples, size=count, replace=False, shuffle=False).astype(np.int64))
        batch.flags.writeable = False
        self._last = (int(step), batch)
        return batch

    def num_micro_batches(self, logical_size: int) -> int:
        """Micro-batches per rank for a logical batch of ``logical_size``: the same on every rank."""
        per_rank = -(-logical_size // self.world_size)
        return -(-per_rank // self.max_physical_batch)

    def step_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of ``step``: lists of dataset indices."""
        batch = self.logical_batch(step)
        mine = np.array_split(batch, self.world_size)[self.rank]
        count = self.num_micro_batches(len(batch))
        return [part.tolist() for part in np.array_split(mine, count)] if count else []
