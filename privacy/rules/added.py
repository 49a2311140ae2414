"""privacy.layers.AddedParameter (``x + weight``): position embeddings, tokens.

The per-example gradient is the output gradient summed over the dimensions the
weight is broadcast along (every dimension but the batch where the weight has
size 1, and any leading dimensions it lacks).
"""

from torch import Tensor

from privacy.layers import AddedParameter
from privacy.rules.base import FP32, Call, Prepared, Rule, sum_rows
from privacy.rules.linear import rows_plan, total


class AddedParameterRule(Rule):
    slots = ("weight",)

    def forward(self, module: AddedParameter, call: Call, x: Tensor, weight: Tensor) -> Tensor:
        call.saved = (x.shape, x.dtype, tuple(weight.shape))
        return x + weight

    def grad_input(self, module, call: Call, grad: Tensor) -> Tensor:
        x_shape, x_dtype, _ = call.saved
        return grad.sum_to_size(x_shape).to(x_dtype)

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        parts = []
        for call in calls:
            w_shape = call.saved[2]
            g = call.grad
            lead = g.dim() - len(w_shape)  # dims of g before the weight's own
            weight_dims = [lead + i for i in range(1, len(w_shape))]
            dims = [d for d in range(1, g.dim()) if d not in weight_dims or w_shape[d - lead] == 1]
            summed = g.sum(dims, dtype=FP32) if dims else g.to(FP32, copy=True)
            parts.append(sum_rows(summed.reshape(g.shape[0], -1), ctx.batch))
        rows = {"weight": total(parts)}
        return Prepared(rows, plan=rows_plan(rows, ctx.device_type))
