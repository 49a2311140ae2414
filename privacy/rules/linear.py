"""nn.Linear on inputs of any rank: ghost (Gram) or materialised norms.

For one example with input rows a_t [d] and output-gradient rows g_t [p], the
weight gradient is ``sum_t g_t a_t^T`` and its squared norm is either
``sum_{t,s} (a_t.a_s)(g_t.g_s)`` (ghost, O(T^2 (p + d))) or the squared norm of
the materialised [p, d] matrix (O(T p d)); the cheaper one is used. The bias
gradient is ``sum_t g_t``: its norm is NOT ``sqrt(sum_t ||g_t||^2)``.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privacy.rules.base import (
    FP32,
    BufferFor,
    Call,
    Rule,
    bmm_fp32,
    cast,
    compute_dtype,
    gram,
    mm_fp32,
    pad_tokens,
    scale_in,
    zero_dropped,
)


def use_ghost(tokens: int, out_features: int, in_features: int) -> bool:
    """Ghost norm when the two [T, T] Grams cost less than the [p, d] matrix."""
    return 2 * tokens * tokens < out_features * in_features


def weight_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """fp32 [b]: squared norms of ``sum_t g[i, t] a[i, t]^T``; a [b,T,d], g [b,T,p]."""
    if use_ghost(a.shape[1], g.shape[2], a.shape[2]):
        if a.is_cuda:
            a, g = pad_tokens(a), pad_tokens(g)
        # elementwise, not a matmul: TF32 (if enabled) would round this fp32 sum
        return (gram(a) * gram(g)).sum((1, 2))
    per_example = bmm_fp32(g.transpose(1, 2), a)  # [b, p, d]
    return torch.linalg.vector_norm(per_example.flatten(1), dim=1).square()  # no squared temporary


def clipped_weight_sum(a: Tensor, g: Tensor, scale: Tensor, dropped: bool) -> Tensor:
    """fp32 [p, d]: ``sum_i scale_i sum_t g[i, t] a[i, t]^T`` as one matmul."""
    if dropped:
        a, g = zero_dropped(a, scale), zero_dropped(g, scale)
    # scale whichever of the two is smaller
    if g.shape[2] <= a.shape[2]:
        g = g * scale_in(scale, g.dtype).view(-1, 1, 1)
    else:
        a = a * scale_in(scale, a.dtype).view(-1, 1, 1)
    return mm_fp32(g.reshape(-1, g.shape[2]).T, a.reshape(-1, a.shape[2]))


def bias_per_example(g: Tensor) -> Tensor:
    """fp32 [b, p]: ``sum_t g[i, t]``."""
    return g.sum(1, dtype=FP32)


def tokens_view(t: Tensor) -> Tensor:
    """[b, *, k] -> [b, T, k] (T = 1 for a rank-2 input)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def stacked(calls: Sequence[Call], key) -> Tensor:
    """Concatenate the calls' tensors along tokens: several calls of one layer
    give the same per-example gradient as one call on all their tokens."""
    parts = [key(call) for call in calls]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class LinearRule(Rule):
    def forward(self, module: nn.Linear, call: Call, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = compute_dtype(x)
        x, weight, bias = x.to(dtype), weight.to(dtype), cast(bias, dtype)
        call.saved = (x, weight)
        return F.linear(x, weight, bias)

    def grad_input(self, module: nn.Linear, call: Call, grad: Tensor) -> Tensor:
        _, weight = call.saved
        return grad.to(weight.dtype) @ weight

    def _pairs(self, calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
        """Token-stacked (activation, output gradient); rebuilt when needed rather
        than kept, so a layer called several times holds no extra copies."""
        a = stacked(calls, lambda c: tokens_view(c.saved[0]))
        g = stacked(calls, lambda c: tokens_view(c.grad.to(c.saved[0].dtype)))
        return a, g

    def sq_norms(self, module, names, calls, scratch) -> Tensor:
        a, g = self._pairs(calls)
        total = torch.zeros(a.shape[0], dtype=FP32, device=a.device)
        if "weight" in names:
            total += weight_sq_norms(a, g)
        if "bias" in names:
            scratch["bias"] = bias_per_example(g)
            total += scratch["bias"].square().sum(1)
        return total

    def accumulate(self, module, names, calls, scratch, scale, dropped, buffer_for: BufferFor) -> None:
        a, g = self._pairs(calls)
        if "weight" in names:
            buffer_for("weight").add_(clipped_weight_sum(a, g, scale, dropped))
        if "bias" in names:
            buffer_for("bias").add_(zero_dropped(scratch["bias"], scale).T @ scale)
