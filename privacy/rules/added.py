"""privacy.layers.AddedParameter (``x + weight``): position embeddings, tokens.

The per-example gradient is the output gradient summed over the dimensions the
weight is broadcast along (every dimension but the batch where the weight has
size 1, and any leading dimensions it lacks).
"""

from torch import Tensor

from privacy.layers import AddedParameter
from privacy.rules.base import FP32, Call, Rule, zero_dropped


class AddedParameterRule(Rule):
    slots = ("weight",)

    def forward(self, module: AddedParameter, call: Call, x: Tensor, weight: Tensor) -> Tensor:
        call.saved = (x.shape, x.dtype, tuple(weight.shape))
        return x + weight

    def grad_input(self, module, call: Call, grad: Tensor) -> Tensor:
        x_shape, x_dtype, _ = call.saved
        return grad.sum_to_size(x_shape).to(x_dtype)

    def _per_example(self, calls, scratch) -> Tensor:
        """fp32 [b, numel]: per-example weight gradients, summed over calls."""
        if "per_example" not in scratch:
            total = None
            for call in calls:
                w_shape = call.saved[2]
                g = call.grad
                lead = g.dim() - len(w_shape)  # dims of g before the weight's own
                weight_dims = [lead + i for i in range(1, len(w_shape))]
                dims = [d for d in range(1, g.dim()) if d not in weight_dims or w_shape[d - lead] == 1]
                summed = g.sum(dims, dtype=FP32) if dims else g.to(FP32)
                summed = summed.reshape(g.shape[0], -1)
                total = summed if total is None else total + summed
            scratch["per_example"] = total
        return scratch["per_example"]

    def sq_norms(self, module, names, calls, scratch) -> Tensor:
        return self._per_example(calls, scratch).square().sum(1)

    def accumulate(self, module, names, calls, scratch, scale, dropped, buffer_for) -> None:
        per_example = zero_dropped(self._per_example(calls, scratch), scale)
        buffer_for("weight").add_((per_example.T @ scale).view_as(buffer_for("weight")))
