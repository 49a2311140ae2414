"""nn.Conv2d (groups 1, zero padding): a Linear on the unfolded patches.

``F.unfold`` turns the input into per-position patches [b, L, C k k], ordered
like ``weight.view(out, -1)``, so the Linear arithmetic applies unchanged. For
a patch embedding (kernel == stride) the patches are just a permuted copy of
the image. The weight's buffer [out, C, k, k] is added to as a [out, C k k] view.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from privacy.rules.base import Call, Prepared, Rule, cast, compute_dtype
from privacy.rules.linear import linear_prepare


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

    def prepare(self, module, names, calls, ctx, sums) -> Prepared:
        def patches(call: Call) -> Tensor:
            x = call.saved[0]
            if _is_patch_embedding(module):
                return _patches(x, module.kernel_size)
            cols = F.unfold(x, module.kernel_size, module.dilation, self._padding(module), module.stride)
            return cols.transpose(1, 2)  # [b, L, C k k]

        grads = [call.grad.flatten(2).transpose(1, 2) for call in calls]  # [b, L, out]
        cols = [patches(call) for call in calls]
        # the patches are a copy of the input unless one patch covers the whole image
        owned = all(c.untyped_storage().data_ptr() != call.saved[0].untyped_storage().data_ptr()
                    for c, call in zip(cols, calls))
        return linear_prepare(cols, grads, names, ctx, sums, owned_inputs=owned)
