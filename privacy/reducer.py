"""The engine's one distribution hook: how a clipped sum becomes a gradient.

The engine never talks to ranks. It hands each parameter's full-shape fp32
clipped sum to a reducer, adds noise to what comes back (this rank's part),
scales it, and hands the result back for assignment. A trainer that shards
parameters implements :class:`GradReducer`; one process uses
:class:`LocalReducer`.
"""

from typing import Protocol

from torch import Tensor, nn


class GradReducer(Protocol):
    noise_stream: int
    """Distinct per rank: the noise generator is seeded with (seed, noise_stream)."""

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor:
        """Full-shape fp32 clipped sum of this rank -> cross-rank sum of this
        rank's part (its shard for a DTensor parameter), fp32."""
        ...

    def assign(self, param: nn.Parameter, grad: Tensor) -> None:
        """Set ``param.grad`` from this rank's (noised, scaled) fp32 part."""
        ...


class LocalReducer:
    """Single process: the local sum is the total, and it is all ours."""

    noise_stream = 0

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor:
        return summed

    def assign(self, param: nn.Parameter, grad: Tensor) -> None:
        param.grad = grad.to(param.dtype)
