"""nn.MultiheadAttention (torch's own attention; nn.TransformerEncoderLayer and
torchvision's ViT use it), as torch computes it, without swapping the module.

Its parameters are the input projection (``in_proj_weight`` [3E, E] packed, or
``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when key or value have
another width) with ``in_proj_bias`` [3E], and ``out_proj``, an nn.Linear that
torch uses through ``F.linear`` but that this rule calls as a layer, so the
Linear rule clips it. The input projection is three Linears on (query, key,
value): each example's gradient of the packed weight stacks the three blocks
``g_q^T a_q``, ``g_k^T a_k``, ``g_v^T a_v`` (disjoint rows: squared norms add),
each block ghost or materialised as the Linear rule's cost model chooses. In
self-attention (query, key and value one tensor) it is one Linear [3E, E] on
that input. Between the projections, the attention itself has no parameters;
:func:`attend` repeats ``F.multi_head_attention_forward`` (masks merged as
torch merges them, the explicit softmax when the weights are returned,
scaled_dot_product_attention otherwise), and tests/test_privacy_mha.py checks
it against the module's own forward. ``add_bias_kv`` and ``add_zero_attn``
are refused.
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, ClipFactors, Layer, LayerPlan, Prepared, Rule, Sums, cast, \
    compute_dtype, example_tokens
from privacy.rules.linear import linear_prepare, rows_plan, total

BLOCKS = ("q", "k", "v")


class _Renamed:
    """A Linear's sums ("weight", "bias") as one block of an attention's parameters:
    a parameter of its own, or rows ``[start, stop)`` of the packed one."""

    def __init__(self, sums: Sums, name: str, rows: slice | None = None):
        self.sums, self.name, self.rows = sums, name, rows

    def add(self, name: str, value: Tensor) -> None:
        if self.rows is None:
            self.sums.add(self.name, value)
        else:
            block = self.buffer(name)
            block.add_(value.view_as(block))

    def buffer(self, name: str) -> Tensor:
        full = self.sums.buffer(self.name)
        return full if self.rows is None else full[self.rows]


def _projections(module: nn.MultiheadAttention, dtype: torch.dtype) -> tuple[list[Tensor], list]:
    """The q, k, v weights and biases (views of the packed ones), in ``dtype``."""
    if module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.to(dtype).chunk(3))
    else:
        weights = [getattr(module, f"{j}_proj_weight").to(dtype) for j in BLOCKS]
    bias = cast(module.in_proj_bias, dtype)
    return weights, [None] * 3 if bias is None else list(bias.chunk(3))


class _InProjection(torch.autograd.Function):
    """(query, key, value) -> (q, k, v) through the input projection; the
    backward returns the inputs' gradients only (see privacy/install.py's
    BookkeptCall) and hands the three output gradients to the engine."""

    row_kind = "rows"  # privacy.graph: each output row is made from the same input row

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, layer: Layer, call: Call, anchor: Tensor):
        ctx.layer, ctx.call = layer, call
        dtype = compute_dtype(query)
        weights, biases = _projections(layer.module, dtype)
        same = query is key and key is value
        inputs = (query.to(dtype),) * 3 if same else tuple(x.to(dtype) for x in (query, key, value))
        call.saved = (inputs, weights, same)
        if same and layer.module._qkv_same_embed_dim:
            return F.linear(inputs[0], torch.cat(weights), None if biases[0] is None else torch.cat(biases)).chunk(3, -1)
        return tuple(F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        inputs, weights, _ = ctx.call.saved
        grad_inputs = [(g.to(w.dtype) @ w).to(x.dtype) if needed else None
                       for g, w, x, needed in zip(grads, weights, inputs, ctx.needs_input_grad)]
        ctx.layer.on_grad(ctx.call, grads)
        return (*grad_inputs, None, None, None)


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int, key_padding_mask, attn_mask, need_weights: bool,
           average_attn_weights: bool, is_causal: bool, dropout: float) -> tuple[Tensor, Tensor | None]:
    """F.multi_head_attention_forward between its projections, batch first:
    q [N, L, E], k and v [N, S, E] -> [N, L, E] and the weights if asked for."""
    n, length, embed = q.shape
    source = k.shape[1]
    head_dim = embed // heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=q.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=q.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    mask = None if attn_mask is None else attn_mask.view(-1, heads if attn_mask.dim() == 3 else 1, length, source)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    q, k, v = (t.view(n, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # [N, H, tokens, head_dim]
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / float(head_dim))) @ k.transpose(-2, -1)
        weights = (scores if mask is None else mask + scores).softmax(-1)
        if dropout > 0:
            weights = F.dropout(weights, p=dropout)
        out = weights @ v
        weights = weights.mean(1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal)
    return out.transpose(1, 2).reshape(n, length, embed), weights


class MultiheadAttentionRule(Rule):
    slots = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    def check(self, module: nn.MultiheadAttention, name: str) -> None:
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"{name}: MultiheadAttention(add_bias_kv=True or add_zero_attn=True) is not supported "
                             "by the privacy engine; build it without them")

    def run(self, layer: Layer, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
            need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
            is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        module = layer.module
        if query.dim() != 3:
            raise ValueError(f"the privacy engine needs batched inputs to MultiheadAttention, got a query of shape "
                             f"{list(query.shape)}")
        if not module.batch_first:  # examples along dim 0, keeping which inputs are one tensor
            moved = {id(t): t.transpose(0, 1) for t in (query, key, value)}
            query, key, value = moved[id(query)], moved[id(key)], moved[id(value)]
        call = layer.new_call()
        q, k, v = _InProjection.apply(query, key, value, layer, call, layer.anchor)
        call.node = q.grad_fn
        out, weights = attend(q, k, v, module.num_heads, key_padding_mask, attn_mask, need_weights,
                              average_attn_weights, is_causal, module.dropout if module.training else 0.0)
        out = module.out_proj(out)
        return (out if module.batch_first else out.transpose(0, 1)), weights

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        packed = module._qkv_same_embed_dim
        embed = module.embed_dim
        a = [[example_tokens(x, ctx.batch) for x in call.saved[0]] for call in calls]
        g = [[example_tokens(grad, ctx.batch) for grad in call.grad] for call in calls]
        if packed and "in_proj_weight" in names and all(call.saved[2] for call in calls):
            # self-attention: one Linear [3E, E] on the input
            parts = [linear_prepare([x[0] for x in a], [torch.cat(grads, -1) for grads in g], ("weight",), ctx,
                                    _Renamed(sums, "in_proj_weight"))]
        else:
            parts = []
            for j, block in enumerate(BLOCKS):
                name = "in_proj_weight" if packed else f"{block}_proj_weight"
                if name in names:
                    rows = slice(j * embed, (j + 1) * embed) if packed else None
                    parts.append(linear_prepare([x[j] for x in a], [grads[j] for grads in g], ("weight",), ctx,
                                                _Renamed(sums, name, rows)))
        rows = {}
        if "in_proj_bias" in names:
            rows["in_proj_bias"] = total([torch.cat([grad.sum(1, dtype=FP32) for grad in grads], 1) for grads in g])
        return _combined(parts, rows, ctx.device_type)


def _combined(parts: Sequence[Prepared], rows: dict[str, Tensor], device_type: str) -> Prepared:
    """One Prepared for several Linears on disjoint blocks of parameters: squared
    norms add, and so do the squares of their rounding bounds (Minkowski)."""
    sq = [p.sq_norm for p in parts if p.sq_norm is not None]
    bounds = [p.ghost_bound for p in parts if p.ghost_bound is not None]
    accumulates = [p.accumulate for p in parts if p.accumulate is not None]
    plans = [p.plan for p in parts if p.plan is not None] + ([rows_plan(rows, device_type)] if rows else [])

    def accumulate(factors: ClipFactors) -> None:
        for add in accumulates:
            add(factors)

    kinds = {p.plan.kind for p in parts if p.plan is not None} or {plan.kind for plan in plans}  # the weights'
    plan = LayerPlan(kinds.pop() if len(kinds) == 1 else "mixed", sum(p.extra_flops for p in plans),
                     sum(p.extra_bytes for p in plans), sum(p.held_bytes for p in plans),
                     sum(p.seconds for p in plans)) if plans else None
    return Prepared(rows, total(sq) if sq else None, accumulate if accumulates else None,
                    torch.stack(bounds).square().sum(0).sqrt() if bounds else None,
                    parts[0].operand_dtype if parts else FP32, max((p.tokens for p in parts), default=1), plan)
