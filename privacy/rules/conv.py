"""nn.Conv2d (groups 1, zero padding): a Linear on the unfolded patches.

``F.unfold`` turns the input into per-position patches [b, L, C k k], ordered
like ``weight.view(out, -1)``, so the Linear arithmetic applies unchanged. For
a patch embedding (kernel == stride) the patches are just a permuted copy of
the image.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from privacy.rules.base import FP32, Call, Rule, cast, compute_dtype, zero_dropped
from privacy.rules.linear import bias_per_example, clipped_weight_sum, stacked, weight_sq_norms


def _is_patch_embedding(module: nn.Conv2d) -> bool:
    """Non-overlapping patches (kernel == stride, no padding or dilation)."""
    return (tuple(module.kernel_size) == tuple(module.stride) and tuple(module.dilation) == (1, 1)
            and module.padding in ("valid", (0, 0)))


def _patches(x: Tensor, kernel: tuple[int, int]) -> Tensor:
    """[b, L, C kh kw] non-overlapping patches in F.unfold's order, by reshaping
    (unfold's im2col is many times slower, on CPU above all)."""
    b, c, h, w = x.shape
    kh, kw = kernel
    x = x[:, :, : h - h % kh, : w - w % kw]  # the conv drops the remainder too
    x = x.reshape(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)  # [b, H', W', C, kh, kw]
    return x.reshape(b, (h // kh) * (w // kw), c * kh * kw)


class Conv2dRule(Rule):
    def check(self, module: nn.Conv2d, name: str) -> None:
        if module.groups != 1:
            raise ValueError(f"{name}: Conv2d with groups={module.groups} is not supported by the privacy engine; "
                             "use groups=1")
        if module.padding_mode != "zeros":
            raise ValueError(f"{name}: Conv2d padding_mode={module.padding_mode!r} is not supported; use 'zeros'")
        if isinstance(module.padding, str) and module.padding != "valid":
            raise ValueError(f"{name}: Conv2d padding={module.padding!r} is not supported; "
                             "give explicit integer padding")

    def _padding(self, module: nn.Conv2d):
        return 0 if module.padding == "valid" else module.padding

    def forward(self, module: nn.Conv2d, call: Call, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = compute_dtype(x)
        x, weight, bias = x.to(dtype), weight.to(dtype), cast(bias, dtype)
        call.saved = (x, weight)
        return F.conv2d(x, weight, bias, module.stride, self._padding(module), module.dilation)

    def grad_input(self, module: nn.Conv2d, call: Call, grad: Tensor) -> Tensor:
        x, weight = call.saved
        return nn.grad.conv2d_input(
            x.shape, weight, grad.to(weight.dtype), module.stride, self._padding(module), module.dilation
        )

    def _pairs(self, module: nn.Conv2d, calls, scratch) -> tuple[Tensor, Tensor]:
        if "pairs" not in scratch:
            def patches(call: Call) -> Tensor:
                x = call.saved[0]
                if _is_patch_embedding(module):
                    return _patches(x, module.kernel_size)
                cols = F.unfold(x, module.kernel_size, module.dilation, self._padding(module), module.stride)
                return cols.transpose(1, 2)  # [b, L, C k k]

            def grads(call: Call) -> Tensor:
                g = call.grad.to(call.saved[0].dtype)
                return g.flatten(2).transpose(1, 2)  # [b, L, out]

            scratch["pairs"] = (stacked(calls, patches), stacked(calls, grads))
        return scratch["pairs"]

    def sq_norms(self, module, names, calls, scratch) -> Tensor:
        a, g = self._pairs(module, calls, scratch)
        total = weight_sq_norms(a, g) if "weight" in names else a.new_zeros(a.shape[0], dtype=FP32)
        if "bias" in names:
            scratch["bias"] = bias_per_example(g)
            total = total + scratch["bias"].square().sum(1)
        return total

    def accumulate(self, module, names, calls, scratch, scale, dropped, buffer_for) -> None:
        a, g = self._pairs(module, calls, scratch)
        if "weight" in names:
            buffer_for("weight").add_(clipped_weight_sum(a, g, scale, dropped).view_as(buffer_for("weight")))
        if "bias" in names:
            buffer_for("bias").add_(zero_dropped(scratch["bias"], scale).T @ scale)
