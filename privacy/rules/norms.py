"""nn.GroupNorm and nn.RMSNorm: per-example gradients materialised (they are only [b, C]).

GroupNorm normalises each example over groups of channels and its positions, so
examples never mix; the weight gradient of one example is ``sum_s g_cs xhat_cs``
over its positions s, the bias gradient ``sum_s g_cs``. RMSNorm (``x / rms(x) *
weight`` over the trailing ``normalized_shape``): weight gradient ``sum_t g_t
xhat_t`` over the example's other positions. As LayerNorm, both run in fp32
under autocast (CUDA autocast runs group_norm and rms_norm in fp32).
"""

import math

import torch
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, Prepared, Rule, cast
from privacy.rules.linear import rows_plan, total


def _fp32_under_autocast(x: Tensor, *params: Tensor | None) -> tuple:
    if torch.is_autocast_enabled(x.device.type):
        return (x.to(FP32), *(cast(p, FP32) for p in params))
    return (x, *params)


class GroupNormRule(Rule):
    def forward(self, module: nn.GroupNorm, call: Call, x: Tensor, weight, bias) -> Tensor:
        in_dtype = x.dtype
        x, weight, bias = _fp32_under_autocast(x, weight, bias)
        n, c = x.shape[:2]
        out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), module.num_groups,
                                                  module.eps)
        call.saved = (x, mean, rstd, weight, in_dtype)
        return out

    def grad_input(self, module: nn.GroupNorm, call: Call, grad: Tensor) -> Tensor:
        x, mean, rstd, weight, in_dtype = call.saved
        n, c = x.shape[:2]
        grad_x, _, _ = torch.ops.aten.native_group_norm_backward(
            grad.to(x.dtype).contiguous(), x.contiguous(), mean, rstd, weight, n, c, x[0, 0].numel(),
            module.num_groups, [True, False, False])
        return grad_x.to(in_dtype)

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        for call in calls:
            x, mean, rstd = call.saved[:3]
            n, c = x.shape[:2]
            b = n if ctx.batch is None else ctx.batch
            g = call.grad.reshape(b, -1, c, x[0, 0].numel())  # [b, rows of the example, C, positions]
            if "weight" in names:
                groups = module.num_groups
                xhat = (x.to(FP32).reshape(n, groups, -1) - mean.view(n, groups, 1)) * rstd.view(n, groups, 1)
                parts["weight"].append((g.to(FP32) * xhat.view(b, -1, c, x[0, 0].numel())).sum((1, 3)))
            if "bias" in names:
                parts["bias"].append(g.sum((1, 3), dtype=FP32))
        rows = {name: total(values) for name, values in parts.items()}
        return Prepared(rows, plan=rows_plan(rows, ctx.device_type))


class RMSNormRule(Rule):
    """nn.RMSNorm, and timm's RmsNorm (the same attributes and arithmetic)."""

    slots = ("weight",)

    @staticmethod
    def _eps(module: nn.Module, x: Tensor) -> float:
        return torch.finfo(x.dtype).eps if module.eps is None else module.eps

    def forward(self, module: nn.Module, call: Call, x: Tensor, weight) -> Tensor:
        in_dtype = x.dtype
        x, weight = _fp32_under_autocast(x, weight)
        dims = tuple(range(-len(module.normalized_shape), 0))
        rstd = torch.rsqrt(x.square().mean(dims, keepdim=True) + self._eps(module, x))
        call.saved = (x, rstd, weight, in_dtype)
        xhat = x * rstd
        return xhat if weight is None else xhat * weight

    def grad_input(self, module: nn.Module, call: Call, grad: Tensor) -> Tensor:
        """d/dx of ``x r w`` with ``r = mean(x^2)^-1/2``: ``r (gw - xhat mean(gw xhat))``."""
        x, rstd, weight, in_dtype = call.saved
        dims = tuple(range(-len(module.normalized_shape), 0))
        gw = grad.to(x.dtype) if weight is None else grad.to(x.dtype) * weight
        xhat = x * rstd
        return (rstd * (gw - xhat * (gw * xhat).mean(dims, keepdim=True))).to(in_dtype)

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        n = math.prod(module.normalized_shape)
        parts = []
        for call in calls:
            x, rstd = call.saved[:2]
            b = x.shape[0] if ctx.batch is None else ctx.batch
            xhat = (x.to(FP32) * rstd).reshape(b, -1, n)
            parts.append((call.grad.reshape(b, -1, n).to(FP32) * xhat).sum(1))
        rows = {"weight": total(parts)}
        return Prepared(rows, plan=rows_plan(rows, ctx.device_type))
