"""nn.Conv1d and nn.Conv2d (zero padding; any stride, dilation and groups).

groups == 1: a Linear on the unfolded patches. ``F.unfold`` turns the input
into per-position patches [b, L, C k k], ordered like ``weight.view(out, -1)``,
so the Linear arithmetic (ghost or per-example, by its cost model) applies
unchanged. For a patch embedding (kernel == stride) the patches are just a
permuted copy of the image. A Conv1d is the Conv2d of height 1. The weight's
buffer [out, C, k...] is added to as a [out, C k...] view.

groups > 1 (grouped and depthwise convolutions, such as ConvNeXt's 7x7): each
example's weight gradient [out, C / groups, k...] is formed by ONE convolution
backward in which the examples are folded into the groups (an input of
[1, n C, ...] with n x groups groups): the weight gradient's own FLOPs, split by
example. It is the weight's size per example (small where groups are used),
and is kept for the clipped sum. Unfolding instead would copy a depthwise 7x7
conv's input 49 times.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privacy.rules.base import (
    FP32,
    Call,
    LayerPlan,
    Prepared,
    Rule,
    cast,
    compute_dtype,
    example_tokens,
    predicted_seconds,
    sq_norms,
    sum_rows,
    weighted_rows,
)
from privacy.rules.linear import linear_prepare, rows_plan


def _pair(values, dims: int, fill: int) -> tuple[int, int]:
    """A Conv1d's (k,) as the (fill, k) of its height-1 Conv2d; a Conv2d's as is."""
    return (fill, *values) if dims == 1 else tuple(values)


def _is_patch_embedding(kernel, stride, padding, dilation) -> bool:
    """Non-overlapping patches (kernel == stride, no padding or dilation)."""
    return kernel == stride and dilation == (1, 1) and padding == (0, 0)


def _patches(x: Tensor, kernel: tuple[int, int]) -> Tensor:
    """[b, L, C kh kw] non-overlapping patches in F.unfold's order, by reshaping
    (unfold's im2col is many times slower, on CPU above all)."""
    b, c, h, w = x.shape
    kh, kw = kernel
    x = x[:, :, : h - h % kh, : w - w % kw]  # the conv drops the remainder too
    x = x.reshape(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)  # [b, H', W', C, kh, kw]
    return x.reshape(b, (h // kh) * (w // kw), c * kh * kw)


class ConvRule(Rule):
    """nn.Conv1d and nn.Conv2d."""

    def check(self, module: nn.Module, name: str) -> None:
        kind = type(module).__name__
        if module.padding_mode != "zeros":
            raise ValueError(f"{name}: {kind} padding_mode={module.padding_mode!r} is not supported by the privacy "
                             "engine; use 'zeros'")
        if isinstance(module.padding, str) and module.padding != "valid":
            raise ValueError(f"{name}: {kind} padding={module.padding!r} is not supported by the privacy engine; "
                             "give explicit integer padding")

    @staticmethod
    def _padding(module: nn.Module) -> tuple[int, ...]:
        return (0,) * len(module.kernel_size) if module.padding == "valid" else tuple(module.padding)

    def forward(self, module: nn.Module, call: Call, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = compute_dtype(x)
        x, weight, bias = x.to(dtype), weight.to(dtype), cast(bias, dtype)
        call.saved = (x, weight)
        conv = F.conv1d if len(module.kernel_size) == 1 else F.conv2d
        return conv(x, weight, bias, module.stride, self._padding(module), module.dilation, module.groups)

    def grad_input(self, module: nn.Module, call: Call, grad: Tensor) -> Tensor:
        x, weight = call.saved
        grad_of = nn.grad.conv1d_input if len(module.kernel_size) == 1 else nn.grad.conv2d_input
        return grad_of(x.shape, weight, grad.to(weight.dtype), module.stride, self._padding(module), module.dilation,
                       module.groups)

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        if module.groups > 1:
            return self._prepare_grouped(module, names, calls, ctx, sums)
        dims = len(module.kernel_size)
        kernel, stride = _pair(module.kernel_size, dims, 1), _pair(module.stride, dims, 1)
        padding, dilation = _pair(self._padding(module), dims, 0), _pair(module.dilation, dims, 1)

        def patches(x: Tensor) -> Tensor:
            x = x if dims == 2 else x.unsqueeze(2)
            if _is_patch_embedding(kernel, stride, padding, dilation):
                return _patches(x, kernel)
            return F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)  # [b, L, C k k]

        grads = [example_tokens(call.grad.flatten(2).transpose(1, 2), ctx.batch) for call in calls]  # [b, L, out]
        cols = [example_tokens(patches(call.saved[0]), ctx.batch) for call in calls]
        # the patches are a copy of the input unless one patch covers the whole image
        owned = all(c.untyped_storage().data_ptr() != call.saved[0].untyped_storage().data_ptr()
                    for c, call in zip(cols, calls))
        return linear_prepare(cols, grads, names, ctx, sums, owned_inputs=owned)

    def _prepare_grouped(self, module, names, calls, ctx, sums) -> Prepared:
        rows = {}
        if "bias" in names:
            rows["bias"] = sum_rows(sum(call.grad.flatten(2).sum(2, dtype=FP32) for call in calls), ctx.batch)
        if "weight" not in names:
            return Prepared(rows, plan=rows_plan(rows, ctx.device_type))
        per_example = None
        for call in calls:
            part = sum_rows(self._per_row_weight(module, call), ctx.batch)
            per_example = part if per_example is None else per_example + part
        if not ctx.norms:  # two-pass, second pass: the plain sum of already scaled gradients
            sums.add("weight", per_example.sum(0, dtype=FP32))
            return Prepared(rows, plan=LayerPlan("sum", 0, per_example.numel() * per_example.element_size(), 0, 0.0))
        b, kept = per_example.shape[0], per_example.numel() * per_example.element_size()
        numel = per_example[0].numel() + sum(r.shape[1:].numel() for r in rows.values())
        flops, nbytes = 2 * b * numel, 2 * kept + 12 * b * (numel - per_example[0].numel())
        plan = LayerPlan("per_example", flops, nbytes, kept, predicted_seconds(ctx.device_type, flops, nbytes))
        return Prepared(rows, sq_norms(per_example),
                        lambda factors: sums.add("weight", weighted_rows(per_example, factors)), plan=plan)

    def _per_row_weight(self, module: nn.Module, call: Call) -> Tensor:
        """[n, out, C / groups x k...]: the weight gradient of each row of dim 0."""
        x, weight = call.saved
        n = x.shape[0]
        shape = [n * module.out_channels, module.in_channels // module.groups, *module.kernel_size]
        _, per_row, _ = torch.ops.aten.convolution_backward(
            call.grad.to(x.dtype).reshape(1, -1, *call.grad.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
            x.new_zeros(()).expand(shape), None, list(module.stride), list(self._padding(module)),
            list(module.dilation), False, [0] * len(module.kernel_size), n * module.groups, [False, True, False])
        return per_row.view(n, module.out_channels, math.prod(shape[1:]))

