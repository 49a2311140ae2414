"""nn.LayerNorm: per-example gradients materialised (they are only [b, n]).

weight gradient of one example: ``sum_t g_t * xhat_t``; bias: ``sum_t g_t``.
Under autocast the layer runs in fp32, as CUDA autocast runs layer_norm.
"""

import math

import torch
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, Rule, cast, zero_dropped


class LayerNormRule(Rule):
    def forward(self, module: nn.LayerNorm, call: Call, x: Tensor, weight, bias) -> Tensor:
        in_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            x, weight, bias = x.to(FP32), cast(weight, FP32), cast(bias, FP32)
        out, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, weight, bias, module.eps)
        call.saved = (x, mean, rstd, weight, bias, in_dtype)
        return out

    def grad_input(self, module: nn.LayerNorm, call: Call, grad: Tensor) -> Tensor:
        x, mean, rstd, weight, bias, in_dtype = call.saved
        grad_x, _, _ = torch.ops.aten.native_layer_norm_backward(
            grad.to(x.dtype), x, module.normalized_shape, mean, rstd, weight, bias, [True, False, False]
        )
        return grad_x.to(in_dtype)

    def _per_example(self, module: nn.LayerNorm, names, calls, scratch) -> dict[str, Tensor]:
        """name -> fp32 [b, n] per-example gradients, summed over calls."""
        if "per_example" in scratch:
            return scratch["per_example"]
        n = math.prod(module.normalized_shape)  # not weight.numel(): a sharded weight may be a part
        sums: dict[str, Tensor] = {}
        for call in calls:
            x, mean, rstd = call.saved[:3]
            b = x.shape[0]
            g = call.grad.reshape(b, -1, n)
            parts = {}
            if "weight" in names:
                xhat = ((x.to(FP32) - mean) * rstd).reshape(b, -1, n)
                parts["weight"] = (g.to(FP32) * xhat).sum(1)
            if "bias" in names:
                parts["bias"] = g.sum(1, dtype=FP32)
            for name, value in parts.items():
                sums[name] = sums[name] + value if name in sums else value
        scratch["per_example"] = sums
        return sums

    def sq_norms(self, module, names, calls, scratch) -> Tensor:
        per_example = self._per_example(module, names, calls, scratch)
        return sum(value.square().sum(1) for value in per_example.values())

    def accumulate(self, module, names, calls, scratch, scale, dropped, buffer_for) -> None:
        for name, value in self._per_example(module, names, calls, scratch).items():
            buffer_for(name).add_((zero_dropped(value, scale).T @ scale).view_as(buffer_for(name)))
