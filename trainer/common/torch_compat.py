"""The one place where the supported torch versions (setup.cfg's range, 2.11 to 2.14) differ.

Everything version-dependent the project calls is resolved here once, at import,
by feature (never by parsing ``torch.__version__``), so the rest of the code is
written against one API and a new torch release touches this file alone.

- Tensor collectives: torch 2.14 names them ``reduce_scatter_single`` and
  ``all_gather_single`` and deprecates ``reduce_scatter_tensor`` and
  ``all_gather_into_tensor`` (a FutureWarning at every call); torch 2.11 has only
  the latter. Same arguments, same semantics.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_sum(output: Tensor, input: Tensor, group) -> None:
    """``output`` = this rank's equal dim-0 part of the cross-rank sum of ``input``."""
    _reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=group)


def all_gather(output: Tensor, input: Tensor, group) -> None:
    """``output`` = every rank's ``input``, concatenated along dim 0 in rank order."""
    _all_gather(output, input, group=group)
