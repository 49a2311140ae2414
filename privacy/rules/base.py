"""What a per-layer rule is, and the arithmetic the rules share.

A rule knows, for one kind of layer, how to run its forward without letting
autograd form the weight gradient, how to pass the gradient to the layer's
input, and how to turn the saved (activation, output gradient) pairs of a
micro-batch into per-example squared gradient norms and into the clipped sum
``sum_i c_i g_i``. Rules hold no state: per-call state lives in :class:`Call`
objects owned by the engine.
"""

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

FP32 = torch.float32
LOW_PRECISION = (torch.bfloat16, torch.float16)

# name -> the fp32 full-shape buffer the clipped sum of that parameter goes into
BufferFor = Callable[[str], Tensor]


@dataclass(eq=False)
class Call:
    """One call of a layer in one forward: what it saved and its output grad."""

    saved: Any = None
    grad: Tensor | None = None


class Rule:
    """Per-example gradient arithmetic for one layer kind.

    ``slots`` are the parameter attributes the layer may own; the engine passes
    them (possibly ``None``) to :meth:`forward` in this order and refuses a
    layer with any other trainable parameter.
    """

    slots: tuple[str, ...] = ("weight", "bias")

    def check(self, module: nn.Module, name: str) -> None:
        """Raise ``ValueError`` if this layer's configuration is unsupported."""

    def forward(self, module: nn.Module, call: Call, x: Tensor, *params: Tensor | None) -> Tensor:
        """Compute the output (autograd is off here) and fill ``call.saved``."""
        raise NotImplementedError

    def grad_input(self, module: nn.Module, call: Call, grad: Tensor) -> Tensor:
        """The gradient with respect to the layer's input only."""
        raise NotImplementedError

    def sq_norms(self, module: nn.Module, names: Sequence[str], calls: Sequence[Call], scratch: dict) -> Tensor:
        """fp32 [b]: per-example squared gradient norm of the parameters ``names``."""
        raise NotImplementedError

    def accumulate(
        self,
        module: nn.Module,
        names: Sequence[str],
        calls: Sequence[Call],
        scratch: dict,
        scale: Tensor,
        dropped: bool,
        buffer_for: BufferFor,
    ) -> None:
        """Add ``sum_i scale_i g_i`` to ``buffer_for(name)`` for each name.

        ``scale`` is fp32 [b]. When ``dropped``, some examples have
        ``scale == 0`` because their norm is not finite: they may hold inf/nan
        and must contribute exactly zero (see :func:`zero_dropped`).
        """
        raise NotImplementedError


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's if it is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def bmm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul with an fp32 result, without fp32 copies of the inputs on CUDA."""
    if a.dtype in LOW_PRECISION and a.is_cuda:
        return torch.bmm(a, b, out_dtype=FP32)
    return torch.bmm(a, b).to(FP32)


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype in LOW_PRECISION and a.is_cuda:
        return torch.mm(a, b, out_dtype=FP32)
    return torch.mm(a, b).to(FP32)


def gram(x: Tensor) -> Tensor:
    """fp32 [b, T, T] inner products of the token rows of ``x`` [b, T, k]."""
    return bmm_fp32(x, x.transpose(1, 2))


# cuBLAS runs a [T, T] product whose T is not a multiple of 8 on an old, slow kernel:
# on an H100 the Gram bmm of ViT-B's 197 tokens took ~23 ms per step for ~1.2 ms of work,
# and padding to 208 tokens lifted a book-keeping probe from 0.62x to 0.68x (SPEC section 4)
TOKEN_MULTIPLE = 16


def pad_tokens(x: Tensor, multiple: int = TOKEN_MULTIPLE) -> Tensor:
    """``x`` [b, T, k] with zero tokens appended up to a multiple of ``multiple``.

    Zero tokens add zero rows and columns to a Gram matrix, so ghost norms are
    unchanged; the copy is transient (one layer at a time).
    """
    extra = -x.shape[1] % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x


def scale_in(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` in ``dtype``, rounded towards zero, never above C / ||g_i||.

    Rounding a clip factor up in bf16 would scale every example by up to 2^-8
    too much. The scaled bf16 products still round (at most 2^-9 relative per
    element, like every bf16 product of the model); only fp32 layers are free
    of that.
    """
    low = scale.to(dtype)
    too_big = low.to(FP32) > scale
    if dtype == FP32:
        return low
    return torch.where(too_big, torch.nextafter(low, torch.zeros_like(low)), low)


def zero_dropped(t: Tensor, scale: Tensor) -> Tensor:
    """``t`` with the rows of examples whose ``scale`` is 0 set to exactly 0.

    A dropped example may carry inf/nan; ``0 * inf`` is nan, so multiplying by
    the scale is not enough.
    """
    keep = (scale > 0).view(-1, *([1] * (t.dim() - 1)))
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
