"""Elementwise scales (timm's LayerScale and LayerScale2d: ``x * gamma``, gamma [C]
over the last dim or over dim 1).

The per-example gradient of gamma is ``sum g * x`` over the example's positions
other than the channel: the input is kept until the backward, as autograd's own
``mul`` keeps it. Out of place, also where timm's ``inplace=True`` scales its
input in place (the same values).
"""

from torch import Tensor, nn

from privacy.rules.base import FP32, Call, Prepared, Rule
from privacy.rules.linear import rows_plan, total


class ScaleRule(Rule):
    slots = ("gamma",)

    def __init__(self, channel_dim: int):
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (NCHW) or -1 (channels last), got {channel_dim}")
        self.channel_dim = channel_dim

    def _broadcast(self, gamma: Tensor, x: Tensor) -> Tensor:
        return gamma if self.channel_dim == -1 else gamma.view(1, -1, *[1] * (x.dim() - 2))

    def forward(self, module: nn.Module, call: Call, x: Tensor, gamma: Tensor) -> Tensor:
        call.saved = (x, gamma)
        return x * self._broadcast(gamma, x)

    def grad_input(self, module: nn.Module, call: Call, grad: Tensor) -> Tensor:
        x, gamma = call.saved
        return (grad * self._broadcast(gamma, x)).to(x.dtype)

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        parts = []
        for call in calls:
            x = call.saved[0]
            product = call.grad.to(FP32) * x.to(FP32)
            channels_last = product if self.channel_dim == -1 else product.movedim(1, -1)
            b = x.shape[0] if ctx.batch is None else ctx.batch
            parts.append(channels_last.reshape(b, -1, channels_last.shape[-1]).sum(1))
        rows = {"gamma": total(parts)}
        return Prepared(rows, plan=rows_plan(rows, ctx.device_type))
