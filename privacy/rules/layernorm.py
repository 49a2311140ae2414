"""nn.LayerNorm (and timm's LayerNorm, the same arithmetic): per-example gradients
materialised (they are only [b, n]). timm's LayerNorm2d, a layer norm over the
channels of NCHW, is this rule through ``ChannelsFirst``.

weight gradient of one example: ``sum_t g_t * xhat_t``; bias: ``sum_t g_t``.
They are formed in the layer's backward, so its input and output gradient are
freed there. Under autocast the layer runs in fp32, as CUDA autocast runs
layer_norm.
"""

import math

import torch
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, Prepared, Rule, cast
from privacy.rules.linear import rows_plan, total


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

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        n = math.prod(module.normalized_shape)  # not weight.numel(): a sharded weight may be a part
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        for call in calls:
            x, mean, rstd = call.saved[:3]
            b = x.shape[0] if ctx.batch is None else ctx.batch
            g = call.grad.reshape(b, -1, n)
            if "weight" in names:
                xhat = ((x.to(FP32) - mean) * rstd).reshape(b, -1, n)
                parts["weight"].append((g.to(FP32) * xhat).sum(1))
            if "bias" in names:
                parts["bias"].append(g.sum(1, dtype=FP32))
        rows = {name: total(values) for name, values in parts.items()}
        return Prepared(rows, plan=rows_plan(rows, ctx.device_type))
