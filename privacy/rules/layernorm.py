"""nn.LayerNorm (and timm's LayerNorm, the same arithmetic): per-example gradients
materialised (they are only [b, n]). timm's and torchvision's LayerNorm2d, a layer
norm over the channels of NCHW, are this rule through ``ChannelsFirst``; Hugging
Face's ConvNeXt norms choose by their ``data_format`` (:class:`DataFormatLayerNormRule`).

weight gradient of one example: ``sum_t g_t * xhat_t``; bias: ``sum_t g_t``.
They are formed in the layer's backward, so its input and output gradient are
freed there. Under autocast the layer runs in fp32, as CUDA autocast runs
layer_norm.
"""

import math

import torch
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, ChannelsFirst, Prepared, Rule, cast
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


class DataFormatLayerNormRule(Rule):
    """A LayerNorm with ``data_format`` "channels_last" (nn.LayerNorm's arithmetic)
    or "channels_first" (permuted to channels last and back), as transformers'
    ConvNeXt, ConvNeXt V2 and DINOv3 ConvNeXt norms."""

    def __init__(self):
        self.channels_last = LayerNormRule()
        self.channels_first = ChannelsFirst(self.channels_last)

    def _rule(self, module: nn.Module) -> Rule:
        return self.channels_first if module.data_format == "channels_first" else self.channels_last

    def check(self, module: nn.Module, name: str) -> None:
        if getattr(module, "data_format", None) not in ("channels_last", "channels_first"):
            raise ValueError(f"{name}: data_format {getattr(module, 'data_format', None)!r} is neither "
                             "'channels_last' nor 'channels_first'")

    def forward(self, module, call, x, *params):
        return self._rule(module).forward(module, call, x, *params)

    def grad_input(self, module, call, grad):
        return self._rule(module).grad_input(module, call, grad)

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        return self._rule(module).prepare(module, names, calls, ctx, sums)
