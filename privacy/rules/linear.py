"""nn.Linear on inputs of any rank: ghost (Gram) norms, or per-example gradients
materialised and reused for the clipped sum, whichever the cost model says is faster.

For one example with input rows a_t [d] and output-gradient rows g_t [p], the
weight gradient is ``G = sum_t g_t a_t^T`` and its squared norm is either
``sum_{t,s} (a_t.a_s)(g_t.g_s)`` (ghost) or that of the materialised [p, d]
matrix. The bias gradient is ``sum_t g_t``: its norm is NOT
``sqrt(sum_t ||g_t||^2)``.

The choice (:func:`plan_linear`) minimises predicted time, not memory alone:
- ghost: two [T, T] Grams, ``2 b T^2 (p + d)`` extra FLOPs, then the clipped sum
  ``sum_i c_i G_i`` as one matmul over (a, g) with the smaller operand scaled,
  which takes the place of autograd's weight gradient (no extra FLOPs);
- per-example: one bmm forms every ``G_i`` (the weight gradient's own FLOPs,
  split by example), its norms are read off, and the clipped sum is a weighted
  sum of the ``G_i`` (``2 b p d`` extra FLOPs); (a, g) are freed at once.
  Allowed only where the ``G_i`` take no more memory than ``reuse_memory`` times
  the (a, g) pair they replace, so it never raises what the engine holds.
Materialising without keeping the ``G_i`` is never faster than one of these
two: where the ``G_i`` are too big to keep, ``pd > T (p + d)``, so the ghost
norm costs fewer FLOPs and moves fewer bytes.
"""

from typing import Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from privacy.rules.base import (
    FP32,
    Call,
    ClipFactors,
    Context,
    LayerPlan,
    Prepared,
    Rule,
    Sums,
    cast,
    compute_dtype,
    example_tokens,
    finite_or_zero,
    ghost_sq_norm,
    gram,
    mm_fp32,
    operand,
    padded_tokens,
    predicted_seconds,
    row_norm_products,
    sanitising_value,
    sq_norms,
    weighted_rows,
)


def plan_linear(batch: int, tokens: int, out_features: int, in_features: int, element_size: int,
                device_type: str, reuse_memory: float, bias: bool) -> LayerPlan:
    """The faster of ghost and per-example for a weight [p, d] over ``tokens`` rows."""
    b, T, p, d, e = batch, tokens, out_features, in_features, element_size
    Tp = padded_tokens(T, device_type)
    bias_flops, bias_bytes = (2 * b * p, 4 * b * p) if bias else (0, 0)
    pair_bytes = b * T * (p + d) * e
    # ghost: Grams, the clipped sum over padded rows; operand copies, Gram outputs and
    # their product, the scaled copy of the smaller operand
    ghost_flops = 2 * b * Tp * Tp * (p + d) + 2 * b * (Tp - T) * p * d + bias_flops
    ghost_bytes = b * Tp * (p + d) * e + 3 * 4 * b * Tp * Tp + b * Tp * min(p, d) * e + bias_bytes
    ghost = LayerPlan("ghost", ghost_flops, ghost_bytes, b * Tp * (p + d) * e + bias_bytes,
                      predicted_seconds(device_type, ghost_flops, ghost_bytes))
    # per-example: the bmm's output (its FLOPs are the weight gradient's), cleaned in place, summed
    kept = b * p * d * e
    per_flops, per_bytes = 2 * b * p * d + bias_flops, 2 * kept + bias_bytes
    per_example = LayerPlan("per_example", per_flops, per_bytes, kept + bias_bytes,
                            predicted_seconds(device_type, per_flops, per_bytes))
    options = [ghost] + ([per_example] if kept <= reuse_memory * pair_bytes else [])
    best = min(options, key=lambda plan: plan.seconds)
    weighed = (("ghost", ghost.seconds), ("per_example", per_example.seconds))
    return LayerPlan(best.kind, best.extra_flops, best.extra_bytes, best.held_bytes, best.seconds, weighed)


def total(values: Sequence[Tensor]) -> Tensor:
    """The sum of ``values`` (the first itself when there is one: no copy)."""
    out = values[0]
    for value in values[1:]:
        out = out + value
    return out


def rows_plan(rows: dict[str, Tensor], device_type: str) -> LayerPlan:
    """The plan of a layer whose per-example gradients are all small rows."""
    b = next(iter(rows.values())).shape[0]
    numel = sum(r.shape[1:].numel() for r in rows.values())
    flops, nbytes = 2 * b * numel, 12 * b * numel  # the shared matmul; formed, copied, cleaned
    return LayerPlan("per_example", flops, nbytes, 4 * b * numel, predicted_seconds(device_type, flops, nbytes))


def linear_prepare(a_parts: Sequence[Tensor], g_parts: Sequence[Tensor], names: Sequence[str], ctx: Context,
                   sums: Sums, owned_inputs: bool = False) -> Prepared:
    """Weight [p, d] (viewed so: a conv's is [out, C, k, k]) and bias [p] of a
    layer that is a Linear on token rows: ``a_parts`` [b, T_k, d] (the
    caller's own copies if ``owned_inputs``) and ``g_parts`` [b, T_k, p], one
    pair per call."""
    dtype = a_parts[0].dtype
    g_parts = [g.to(dtype) for g in g_parts]
    b, d, p = a_parts[0].shape[0], a_parts[0].shape[-1], g_parts[0].shape[-1]
    tokens = sum(a.shape[1] for a in a_parts)
    rows = {"bias": total([g.sum(1, dtype=FP32) for g in g_parts])} if "bias" in names else {}
    if "weight" not in names:
        return Prepared(rows, plan=rows_plan(rows, ctx.device_type))
    if not ctx.norms:  # two-pass, second pass: the plain sum of already scaled gradients
        a = operand(a_parts, dtype, tokens, fill=0.0, owned=owned_inputs).view(-1, d)
        g = operand(g_parts, dtype, tokens, fill=0.0).view(-1, p)
        sums.add("weight", mm_fp32(g.T, a))
        return Prepared(rows, plan=LayerPlan("sum", 0, b * tokens * (p + d) * dtype.itemsize, 0, 0.0))

    plan = plan_linear(b, tokens, p, d, dtype.itemsize, ctx.device_type, ctx.reuse_memory, "bias" in names)
    if plan.kind == "per_example":
        per_example = total([torch.bmm(g.transpose(1, 2), a) for g, a in zip(g_parts, a_parts)])  # [b, p, d]
        return Prepared(rows, sq_norms(per_example),
                        lambda factors: sums.add("weight", weighted_rows(per_example, factors)), plan=plan)

    # ghost
    fill = sanitising_value(dtype)
    padded = padded_tokens(tokens, ctx.device_type)
    a, g = operand(a_parts, dtype, padded, fill, owned=owned_inputs), operand(g_parts, dtype, padded, fill)
    gram_a, gram_g = gram(a), gram(g)
    sq = ghost_sq_norm(gram_a, gram_g)  # may round below 0 if tokens cancel: the engine clamps the total
    bound = row_norm_products(gram_a, gram_g)
    del gram_a, gram_g
    if fill is None:  # fp16: cleaned only now that the norm has seen the inf/nan
        finite_or_zero(a), finite_or_zero(g)

    def accumulate(factors: ClipFactors) -> None:
        s = factors.in_dtype(dtype).view(-1, 1, 1)
        if p <= d:
            sums.add("weight", mm_fp32((g * s).view(-1, p).T, a.view(-1, d)))
        else:
            sums.add("weight", mm_fp32(g.view(-1, p).T, (a * s).view(-1, d)))

    return Prepared(rows, sq, accumulate if ctx.keep_sum else None, bound, dtype, tokens, plan)


class LinearRule(Rule):
    def forward(self, module: nn.Linear, call: Call, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = compute_dtype(x)
        x, weight, bias = x.to(dtype), weight.to(dtype), cast(bias, dtype)
        call.saved = (x, weight)
        return F.linear(x, weight, bias)

    def grad_input(self, module: nn.Linear, call: Call, grad: Tensor) -> Tensor:
        _, weight = call.saved
        return grad.to(weight.dtype) @ weight

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        return linear_prepare([example_tokens(c.saved[0], ctx.batch) for c in calls],
                              [example_tokens(c.grad, ctx.batch) for c in calls], names, ctx, sums)
