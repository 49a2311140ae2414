"""nn.Embedding: ghost norms by token equality; padding_idx respected.

One example's gradient has row ``v`` equal to the sum of the output gradients
at the positions holding token ``v`` (never the padding token, whose row gets
no gradient). Its squared norm is ``sum_{t,s} [id_t == id_s] (g_t.g_s)`` over
non-padding positions, which never forms a [vocab, dim] matrix per example; the
clipped sum adds the scaled rows in fp32 (``index_add_``).
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, ClipFactors, LayerPlan, Prepared, Rule, finite_or_zero, gram


def total_tokens(parts: Sequence[Tensor]) -> Tensor:
    """Several calls' [b, T_k, ...] tensors joined along tokens (the first itself if one)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class EmbeddingRule(Rule):
    slots = ("weight",)

    def check(self, module: nn.Embedding, name: str) -> None:
        if module.max_norm is not None:
            raise ValueError(f"{name}: Embedding(max_norm=...) rewrites its weight in forward; "
                             "the privacy engine needs max_norm=None")
        if module.scale_grad_by_freq:
            raise ValueError(f"{name}: Embedding(scale_grad_by_freq=True) is not supported by the privacy engine; "
                             "set it to False")
        if module.sparse:
            raise ValueError(f"{name}: Embedding(sparse=True) is not supported by the privacy engine; set sparse=False")

    def forward(self, module: nn.Embedding, call: Call, ids: Tensor, weight: Tensor) -> Tensor:
        call.saved = ids
        return F.embedding(ids, weight, module.padding_idx)

    def grad_input(self, module, call: Call, grad: Tensor) -> None:
        return None  # token ids have no gradient

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        def rows(t: Tensor) -> int:
            return t.shape[0] if ctx.batch is None else ctx.batch

        ids = total_tokens([c.saved.reshape(rows(c.saved), -1) for c in calls])  # [b, T]
        g = total_tokens([c.grad.reshape(rows(c.grad), -1, c.grad.shape[-1]) for c in calls])  # [b, T, D]
        real = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
        b, tokens, dim = g.shape
        sq = bound = None
        if ctx.norms:
            gram_g = gram(g)
            same = (ids[:, :, None] == ids[:, None, :]) & real[:, :, None] & real[:, None, :]
            sq = (gram_g * same).sum((1, 2))
            bound = (gram_g.diagonal(dim1=1, dim2=2).sqrt() * real).sum(1)  # one-hot inputs: ||a_t|| = 1
            del gram_g, same

        def accumulate(factors: ClipFactors) -> None:
            weights = torch.where(real, factors.fp32[:, None], 0.0)  # [b, T]
            rows = finite_or_zero(g.to(FP32) * weights[:, :, None])
            sums.buffer("weight").index_add_(0, ids.reshape(-1), rows.reshape(-1, dim))

        plan = LayerPlan("ghost", 2 * b * tokens * tokens * dim, 4 * b * tokens * (tokens + 2 * dim),
                         b * tokens * dim * g.element_size(), 0.0)
        return Prepared(sq_norm=sq, accumulate=accumulate, ghost_bound=bound, operand_dtype=FP32, tokens=tokens,
                        plan=plan)
