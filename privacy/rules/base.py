"""What a per-layer rule is, and the arithmetic the rules share.

A rule knows, for one kind of layer, how to run its forward without letting
autograd form the weight gradient, how to pass the gradient to the layer's
input, and how to turn the saved (activation, output gradient) pairs of a
micro-batch into per-example squared gradient norms and a way to add the
clipped sum ``sum_i c_i g_i`` once the clip factors are known
(:meth:`Rule.prepare`). The engine calls ``prepare`` inside the backward, as
soon as the layer's last call has its output gradient, so that whatever the
sum does not need (Gram matrices, layer-norm inputs, the pair itself when the
per-example gradient is kept instead) is freed before the backward goes on.
Rules hold no state: per-call state lives in :class:`Call` objects and
per-micro-batch state in the :class:`Prepared` a rule returns, both owned by
the engine.

Rows and examples: a call's tensors have ``k x ctx.batch`` rows in dim 0, k
consecutive rows per example (k = 1 but for layers on windows, such as Swin's
attention, whose grouping the engine has verified: see ``privacy/graph.py``).
A rule forms per-example quantities over ``ctx.batch`` examples, through
:func:`example_tokens` and :func:`sum_rows`.

Dropped examples (non-finite norm) without a host sync: the engine gives them
clip factor 0, and a rule must make their contribution exactly 0 even where
their operands hold inf/nan (``0 * inf`` is nan). Per-example gradients kept
by a rule are finite for every example whose norm is finite, so replacing
their non-finite entries by 0 (:func:`finite_or_zero`) touches dropped
examples only. Operands kept for a clipped-sum matmul get their non-finite
entries replaced by the dtype's largest finite value in the copy that stacks
and pads them (:func:`operand`), which overflows the example's fp32 norm to
inf, so it is still dropped, and multiplies by its clip factor 0 to exactly 0.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

FP32 = torch.float32
LOW_PRECISION = (torch.bfloat16, torch.float16)

class Sums(Protocol):
    """Where one layer's clipped sums go: one fp32 tensor per parameter, kept by the engine."""

    def add(self, name: str, value: Tensor) -> None:
        """Add ``value`` (fp32, the parameter's numel; the engine may keep it as is) to its sum."""

    def buffer(self, name: str) -> Tensor:
        """The parameter's fp32 full-shape sum, to add into in place (zeros at first)."""


@dataclass(eq=False)
class Call:
    """One call of a layer in one forward: what it saved and its output grad."""

    saved: Any = None
    grad: Tensor | None = None
    node: Any = None  # the autograd node of its output: where privacy.graph starts a grouping proof


@dataclass(frozen=True)
class LayerPlan:
    """What the cost model chose for one layer of one micro-batch, and why.

    ``extra_flops``: matrix FLOPs beyond a non-private step's (the clipped
    sum's matmul takes the place of autograd's weight gradient);
    ``extra_bytes``: bytes written by non-matmul work beyond it;
    ``held_bytes``: what the layer keeps from its backward to the clipped sum;
    ``seconds``: the model's predicted extra time (see :data:`DEVICE_RATES`).
    """

    kind: str  # "ghost" | "per_example" (materialised, reused for the sum) | "sum" (two-pass, 2nd pass)
    extra_flops: int
    extra_bytes: int
    held_bytes: int
    seconds: float
    alternatives: tuple[tuple[str, float], ...] = ()  # (kind, predicted seconds) of the options weighed

    def as_dict(self) -> dict:
        return {"kind": self.kind, "extra_flops": self.extra_flops, "extra_bytes": self.extra_bytes,
                "held_bytes": self.held_bytes, "seconds": self.seconds, "alternatives": dict(self.alternatives)}


# rough matrix FLOP/s and memory bytes/s of one device, for the cost model's time
# estimate only: an H100-class GPU in bf16 (about half its peak, as real kernels
# reach), and one core of a recent x86 CPU in fp32
DEVICE_RATES = {"cuda": (4e14, 2.5e12), "cpu": (5e10, 1e10)}


def predicted_seconds(device_type: str, flops: float, nbytes: float) -> float:
    flop_rate, byte_rate = DEVICE_RATES.get(device_type, DEVICE_RATES["cpu"])
    return flops / flop_rate + nbytes / byte_rate


@dataclass
class Context:
    """How the engine wants this micro-batch handled, and where to add sums."""

    device_type: str
    batch: int | None = None  # examples in the micro-batch (None: one row of dim 0 per example)
    norms: bool = True  # False: the two-pass mode's second pass (gradients already scaled)
    keep_sum: bool = True  # False: the two-pass mode's first pass (norms only)
    reuse_memory: float = 1.0  # per-example gradient kept for the sum if <= this x the pair it replaces


class ClipFactors:
    """A micro-batch's clip factors: fp32 [b], 0 for dropped examples, and
    their round-down to other dtypes, each computed once."""

    def __init__(self, fp32: Tensor):
        self.fp32 = fp32
        self._in = {FP32: fp32}

    def in_dtype(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._in:
            self._in[dtype] = scale_in(self.fp32, dtype)
        return self._in[dtype]


@dataclass
class Prepared:
    """One layer's share of a micro-batch, returned by :meth:`Rule.prepare`.

    ``rows``: name -> fp32 [b, *param shape] per-example gradients small
    enough to keep (biases, norms, added tokens); the engine takes their norms
    and their clipped sum for all layers at once (one matmul). The rest of the
    layer's parameters: ``sq_norm`` fp32 [b] squared per-example norms (None in
    the two-pass mode's second pass) and ``accumulate(factors)``, which adds
    ``sum_i c_i g_i`` to their buffers. ``ghost_bound``: for a clipped sum
    formed by a matmul over tokens whose smaller operand is scaled in
    ``operand_dtype``, fp32 [b] ``B_i = sum_t ||g_it|| ||a_it||`` over the
    ``tokens`` rows of each example (the engine's margin for the rounding of
    those products and of the fp32 norm arithmetic; see ``privacy/clipping.py``).
    """

    rows: dict[str, Tensor] = field(default_factory=dict)
    sq_norm: Tensor | None = None
    accumulate: Callable[["ClipFactors"], None] | None = None
    ghost_bound: Tensor | None = None
    operand_dtype: torch.dtype = FP32
    tokens: int = 1
    plan: LayerPlan | None = None


class Layer(Protocol):
    """What the engine gives a rule's :meth:`Rule.run`: one layer it clips."""

    module: nn.Module
    anchor: Tensor  # a scalar that requires grad: makes a Function's output part of the graph

    def call(self, x: Tensor) -> Tensor:
        """The layer on ``x`` through the rule's forward and backward (one input, one output)."""

    def new_call(self) -> Call:
        """A call recorded for this forward, for a rule that runs its own autograd Function."""

    def on_grad(self, call: Call, grad: Any) -> None:
        """In that Function's backward: the call's output gradient(s), dim 0 the rows."""


class Rule:
    """Per-example gradient arithmetic for one layer kind.

    ``slots`` are the parameter attributes the layer may own; the engine passes
    them (possibly ``None``) to :meth:`forward` in this order and refuses a
    layer with any other trainable parameter.
    """

    slots: tuple[str, ...] = ("weight", "bias")

    def run(self, layer: Layer, x: Tensor) -> Tensor:
        """The layer's forward while the engine clips it (grad enabled): by default
        one input through :meth:`forward` and :meth:`grad_input`. A layer with several
        inputs or outputs (attention) overrides this with its own autograd Function."""
        return layer.call(x)

    def check(self, module: nn.Module, name: str) -> None:
        """Raise ``ValueError`` if this layer's configuration is unsupported."""

    def forward(self, module: nn.Module, call: Call, x: Tensor, *params: Tensor | None) -> Tensor:
        """Compute the output (autograd is off here) and fill ``call.saved``."""
        raise NotImplementedError

    def grad_input(self, module: nn.Module, call: Call, grad: Tensor) -> Tensor:
        """The gradient with respect to the layer's input only."""
        raise NotImplementedError

    def prepare(self, module: nn.Module, names: Sequence[str], calls: Sequence[Call], ctx: Context,
                sums: Sums) -> Prepared:
        """Per-example norms of the parameters ``names`` over ``calls`` (which
        all have their output gradient), and what adding the clipped sum needs;
        the calls' tensors are released by the engine afterwards.

        ``accumulate(factors)`` (a :class:`ClipFactors`; 0 for dropped
        examples) must add ``sum_i c_i g_i`` to ``sums`` for each name not in
        ``rows``, with exactly nothing from dropped examples (see
        the module docstring). In the two-pass mode's second pass
        (``ctx.norms`` False) the output gradients already carry the clip
        factors and the factors are 1 or 0."""
        raise NotImplementedError


def example_tokens(t: Tensor, batch: int | None) -> Tensor:
    """[n, *, k] -> [b, T, k]: each example's rows of dim 0 and the dims between
    as one sequence of T token rows (n = b for most layers; b = ``batch``)."""
    return t.reshape(t.shape[0] if batch is None else batch, -1, t.shape[-1])


def sum_rows(t: Tensor, batch: int | None) -> Tensor:
    """[n, ...] per-row gradients -> [b, ...] per example: the fp32 sum of each
    example's consecutive rows (``t`` itself when there is one row each)."""
    if batch is None or batch == t.shape[0]:
        return t
    return t.reshape(batch, -1, *t.shape[1:]).sum(1, dtype=FP32)


def sq_norms(per_example: Tensor) -> Tensor:
    """fp32 [b] squared norms of [b, p, d] per-example gradients: norms along the
    shorter of p, d, then a blocked sum of their squares. CPU's vector_norm
    accumulates serially (over all of [p, d]: 1.6e-6 relative at 1e5 entries,
    6e-5 at 2e6; over <= 4096: <= 4e-7, inside the engine's 2^-20 norm margin)."""
    shorter = 1 if per_example.shape[1] <= per_example.shape[2] else 2
    return torch.linalg.vector_norm(per_example, dim=shorter, dtype=FP32).square().sum(1)


class ChannelsFirst(Rule):
    """A rule for a layer over the last dim, applied to a layer over dim 1 (NCHW,
    as timm's LayerNorm2d and RmsNorm2d): the input moved to channels-last and
    back, the output gradients moved likewise for the inner rule's ``prepare``."""

    def __init__(self, inner: "Rule"):
        self.inner = inner
        self.slots = inner.slots

    def check(self, module: nn.Module, name: str) -> None:
        self.inner.check(module, name)

    def forward(self, module: nn.Module, call: Call, x: Tensor, *params: Tensor | None) -> Tensor:
        return self.inner.forward(module, call, x.movedim(1, -1), *params).movedim(-1, 1)

    def grad_input(self, module: nn.Module, call: Call, grad: Tensor) -> Tensor:
        return self.inner.grad_input(module, call, grad.movedim(1, -1)).movedim(-1, 1)

    def prepare(self, module, names, calls, ctx, sums) -> "Prepared":
        moved = [Call(call.saved, call.grad.movedim(1, -1)) for call in calls]
        return self.inner.prepare(module, names, moved, ctx, sums)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's if it is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of rounding a real number to nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def bmm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul with an fp32 result accumulated in fp32 (on CUDA without
    fp32 copies of low-precision inputs; CPU has no mixed-dtype bmm)."""
    if a.dtype in LOW_PRECISION:
        if a.is_cuda:
            return torch.bmm(a, b, out_dtype=FP32)
        a, b = a.float(), b.float()
    return torch.bmm(a, b)


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Matmul with an fp32 result accumulated in fp32 (see :func:`bmm_fp32`)."""
    if a.dtype in LOW_PRECISION:
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=FP32)
        a, b = a.float(), b.float()
    return torch.mm(a, b)


def gram(x: Tensor) -> Tensor:
    """fp32 [b, T, T] inner products of the token rows of ``x`` [b, T, k]."""
    return bmm_fp32(x, x.transpose(1, 2))


def ghost_sq_norm(gram_a: Tensor, gram_g: Tensor) -> Tensor:
    """fp32 [b]: ``sum_{t,s} A_ts G_ts``. An elementwise product and a blocked
    sum: as a [1, T^2] x [T^2, 1] matmul it would be summed serially on CPU,
    with 50x the rounding error (5e-6 relative at 197 tokens)."""
    return torch.linalg.vecdot(gram_a.flatten(1), gram_g.flatten(1))


def row_norm_products(gram_a: Tensor, gram_g: Tensor) -> Tensor:
    """fp32 [b]: ``sum_t ||a_t|| ||g_t||`` from the Grams' diagonals."""
    return (gram_a.diagonal(dim1=1, dim2=2) * gram_g.diagonal(dim1=1, dim2=2)).sqrt().sum(1)


# cuBLAS runs a [T, T] product whose T is not a multiple of 8 on an old, slow kernel:
# on an H100 the Gram bmm of ViT-B's 197 tokens took ~23 ms per step for ~1.2 ms of work,
# and padding to 208 tokens lifted a book-keeping probe from 0.62x to 0.68x of the
# non-private step's throughput
TOKEN_MULTIPLE = 16


def padded_tokens(tokens: int, device_type: str) -> int:
    """Tokens after padding (on CUDA only: CPU kernels have no such cliff)."""
    return tokens + (-tokens % TOKEN_MULTIPLE if device_type == "cuda" else 0)


def sanitising_value(dtype: torch.dtype) -> float | None:
    """What :func:`operand` writes for a non-finite entry: the largest finite
    value, whose square overflows an fp32 Gram entry to inf, so the example
    still has an infinite norm. fp16's largest value squares to a finite fp32
    number, so fp16 operands are copied as they are and cleaned after the norm."""
    return None if dtype == torch.float16 else torch.finfo(dtype).max


def operand(parts: Sequence[Tensor], dtype: torch.dtype, tokens: int, fill: float | None,
            owned: bool = False) -> Tensor:
    """The calls' [b, T_k, k] tensors as one new [b, tokens, k] tensor in
    ``dtype``, zero tokens appended up to ``tokens``, non-finite entries
    replaced by +-``fill`` (None: kept): ONE pass over the data, fusing the
    stacking, padding, cast and sanitising copies. ``owned``: the parts are the
    caller's own copies, so a single contiguous one is sanitised in place.

    Zero tokens add zero rows to Gram matrices and to the clipped sum, so norms
    and sums are unchanged by the padding; several calls of one layer give the
    same per-example gradient as one call on all their tokens.
    """
    first = parts[0]
    if owned and len(parts) == 1 and first.shape[1] == tokens and first.dtype == dtype and first.is_contiguous():
        return first if fill is None else first.nan_to_num_(nan=fill, posinf=fill, neginf=-fill)
    out = torch.empty(first.shape[0], tokens, first.shape[-1], dtype=dtype, device=first.device)
    start = 0
    for part in parts:
        view = out if part.shape[1] == tokens else out[:, start:start + part.shape[1]]
        if fill is not None and part.dtype == dtype:
            torch.nan_to_num(part, nan=fill, posinf=fill, neginf=-fill, out=view)
        else:
            view.copy_(part)
            if fill is not None:
                view.nan_to_num_(nan=fill, posinf=fill, neginf=-fill)
        start += part.shape[1]
    if start < tokens:
        out[:, start:].zero_()
    return out


def scale_in(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` in ``dtype``, rounded towards zero: never above the fp32 factor."""
    low = scale.to(dtype)
    if dtype == FP32:
        return low
    too_big = low.to(FP32) > scale
    return torch.where(too_big, torch.nextafter(low, torch.zeros_like(low)), low)


def finite_or_zero(t: Tensor) -> Tensor:
    """``t`` (owned by the caller) with non-finite entries set to 0, in place."""
    return t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def weighted_rows(per_example: Tensor, factors: ClipFactors) -> Tensor:
    """fp32 [numel]: ``sum_i c_i per_example[i]`` (``per_example`` [b, ...], owned
    by the caller and cleaned of dropped examples' inf/nan here)."""
    rows = finite_or_zero(per_example).reshape(per_example.shape[0], -1)
    return mm_fp32(factors.in_dtype(rows.dtype).view(1, -1), rows).view(-1)
