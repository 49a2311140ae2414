"""nn.Embedding: ghost norms by token equality; padding_idx respected.

One example's gradient has row ``v`` equal to the sum of the output gradients
at the positions holding token ``v`` (never the padding token, whose row gets
no gradient). Its squared norm is ``sum_{t,s} [id_t == id_s] (g_t.g_s)`` over
non-padding positions, which never forms a [vocab, dim] matrix per example.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, Rule, gram
from privacy.rules.linear import stacked


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

    def _pairs(self, module: nn.Embedding, calls) -> tuple[Tensor, Tensor, Tensor]:
        ids = stacked(calls, lambda c: c.saved.reshape(c.saved.shape[0], -1, 1)).squeeze(2)  # [b, T]
        g = stacked(calls, lambda c: c.grad.reshape(c.grad.shape[0], -1, c.grad.shape[-1]))  # [b, T, D]
        if module.padding_idx is None:
            real = torch.ones_like(ids, dtype=torch.bool)
        else:
            real = ids != module.padding_idx
        return ids, g, real

    def sq_norms(self, module, names, calls, scratch) -> Tensor:
        ids, g, real = self._pairs(module, calls)
        same = (ids[:, :, None] == ids[:, None, :]) & real[:, :, None] & real[:, None, :]
        return (gram(g) * same).sum((1, 2))

    def accumulate(self, module, names, calls, scratch, scale, dropped, buffer_for) -> None:
        ids, g, real = self._pairs(module, calls)
        weights = torch.where(real, scale[:, None], 0.0)  # [b, T]
        rows = g.to(FP32) * weights[:, :, None]
        if dropped:
            rows = torch.where(weights[:, :, None] > 0, rows, 0.0)
        buffer_for("weight").index_add_(0, ids.reshape(-1), rows.reshape(-1, g.shape[-1]))
