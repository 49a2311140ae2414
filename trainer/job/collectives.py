"""The one collective the privacy engine's reducers share: a clipped sum's dim-0 chunks.

Rows are split as ``torch.chunk`` splits them (ceil(rows / world) per rank, the
last chunks short or empty), which is also FSDP2's dim-0 sharding; the sum is
padded with zero rows so every rank sends and receives equal chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.common.torch_compat import reduce_scatter_sum


def chunk_rows(rows: int, world: int) -> int:
    """Rows per rank (the last ranks' chunks may be short or empty)."""
    return -(-rows // world)


def reduce_scatter_rows(summed: Tensor, world: int, group) -> Tensor:
    """The cross-rank sum of this rank's padded dim-0 chunk of ``summed`` (fp32)."""
    assert summed.dtype == torch.float32, summed.dtype
    rows = summed.shape[0]
    chunk = chunk_rows(rows, world)
    padded = summed.new_zeros((chunk * world, *summed.shape[1:]))
    padded[:rows] = summed
    out = summed.new_empty((chunk, *summed.shape[1:]))
    reduce_scatter_sum(out, padded, group)
    return out
