"""What the engine reads off a micro-batch's autograd graph.

1. :func:`reached_leaves`, before the backward: every leaf requiring grad that
   the backward would give a gradient to. The engine's own autograd Functions
   read parameters without an edge to them, so a parameter found here was used
   outside any rule (``F.linear(x, layer.weight)``, a parameter not in the
   model given to the engine, a bare parameter read outside its module's
   call): its gradient would be unclipped. The engine refuses it.

2. :func:`rows_per_example`, in the backward: a layer (or a bare parameter's
   per-example copy) whose tensors have ``k x b`` rows in dim 0 for ``b``
   examples, as Swin's window attention has (``B x windows``), is handled as k
   consecutive rows per example only where that grouping is PROVED from the
   operators that made the layer's input, down to tensors the engine already
   holds as one row per example (the outputs of layers with ``b`` rows: it
   holds every layer's rows). The proof tracks, for each tensor,
   one dimension along which index ``r`` belongs to example ``r // k`` and
   nothing else varies by example; each operator below maps that through
   (views and reshapes by their shapes, permutes, pads, rolls and slices off
   that dimension, elementwise operators whose data operands agree, batched
   matmuls over it, softmax, sums and vector norms along other dimensions).
   Any other operator, or one that moves data across that dimension, ends the
   proof and the engine refuses the layer, naming the operator.

   Shapes and operator arguments are read from autograd's nodes
   (``_input_metadata``, ``_saved_*``: not public API); a torch version that
   renames them makes the proof fail, never pass.

That one row belongs to one example is what every book-keeping engine assumes
of its layers (nothing checks that a model never mixes examples, such as
BatchNorm does); what this module adds is that no grouping of rows is ever
assumed without this proof.
"""

import math
from typing import Callable

import torch
from torch import Tensor, nn

ACCUMULATE = "torch::autograd::AccumulateGrad"
BARE_LEAF = "_privacy_bare_leaf"  # marks a bare parameter's leaf copy of one forward (privacy/bare.py)

# a tensor's example layout: (dim, k) - index r along dim belongs to example r // k -, or
# CONSTANT: no example data (a parameter's copy, a mask computed from buffers)
Layout = tuple[int, int] | None
CONSTANT = None


def reached_leaves(root: torch.autograd.graph.Node | None) -> list[Tensor]:
    """Leaves a backward from ``root`` reaches that are parameters (nn.Parameter,
    or a bare parameter's leaf copy): one visit per node."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == ACCUMULATE:
            leaf = node.variable
            if isinstance(leaf, nn.Parameter) or hasattr(leaf, BARE_LEAF):
                found.append(leaf)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return found


class Unproven(Exception):
    """The grouping of rows could not be proved; the message names the operator."""


def rows_per_example(node, output_nr: int, batch: int) -> int:
    """k, where the tensor made by ``(node, output_nr)`` has its ``k x batch``
    rows of dim 0 grouped k consecutive rows per example; :class:`Unproven`
    if that cannot be proved."""
    layout = _Proof(batch).layout(node, output_nr)
    rows = _shape(node, output_nr)[0]
    if layout != (0, rows // batch) or rows % batch:
        where = "no example data" if layout is CONSTANT else f"examples along dim {layout[0]}"
        raise Unproven(f"its rows are not grouped by example in dim 0 ({where})")
    return rows // batch


def _shape(node, output_nr: int) -> tuple[int, ...]:
    if node.name() == ACCUMULATE:
        return tuple(node.variable.shape)
    return tuple(node._input_metadata[output_nr].shape)


class _Proof:
    def __init__(self, batch: int):
        self.batch = batch
        self.memo: dict[tuple, Layout] = {}

    def layout(self, node, output_nr: int) -> Layout:
        if node is None:  # a tensor that needs no gradient: treated as every engine treats inputs
            return CONSTANT
        key = (node, output_nr)
        if key not in self.memo:
            self.memo[key] = self._layout(node, output_nr)
        return self.memo[key]

    def inputs(self, node) -> list[tuple[Layout, tuple[int, ...] | None]]:
        return [(self.layout(child, nr), None if child is None else _shape(child, nr))
                for child, nr in node.next_functions]

    def _layout(self, node, output_nr: int) -> Layout:
        out = _shape(node, output_nr)
        kind = getattr(getattr(node, "_forward_cls", None), "row_kind", None)
        if kind == "constant":  # a bare parameter's per-example copy: no example data in itself
            return CONSTANT
        if kind == "rows":  # an engine layer: each row of its output is made from the same row of its input
            if out[0] == self.batch:
                return (0, 1)
            inner = self.layout(*node.next_functions[0])
            if inner is CONSTANT:
                raise Unproven(f"{_label(node)}'s input has no autograd history (it is made from the model's inputs "
                               "alone), so the operators that grouped its rows cannot be read; let the input "
                               "require grad (images.requires_grad_()) to have them recorded")
            if inner != (0, out[0] // self.batch):
                raise Unproven(f"{_label(node)}'s input is not grouped by example in dim 0")
            return inner
        name = node.name()
        if name == ACCUMULATE:
            if node.variable.dim() == 0:  # the engine's anchor
                return CONSTANT
            if out[0] == self.batch:  # a model input that requires grad
                return (0, 1)
            raise Unproven(f"a leaf tensor of shape {list(out)}")
        rule = _RULES.get(name)
        if rule is None:
            raise Unproven(f"{name} (the proof does not know this operator)")
        return rule(self, node, output_nr, out)


def _label(node) -> str:
    return getattr(getattr(node, "target", None), "qualname", None) or "a layer"


def _agree(layouts: list[Layout], name: str) -> Layout:
    data = {layout for layout in layouts if layout is not CONSTANT}
    if len(data) > 1:
        raise Unproven(f"{name} combines tensors whose examples lie along different dimensions")
    return data.pop() if data else CONSTANT


def _elementwise(proof: _Proof, node, output_nr: int, out: tuple) -> Layout:
    """Operands broadcast against each other: a data operand's example dim must
    land on the same output dim, not broadcast."""
    found = []
    for layout, shape in proof.inputs(node):
        if layout is CONSTANT:
            continue
        dim, k = layout
        at = dim + len(out) - len(shape)
        if shape[dim] != out[at]:
            raise Unproven(f"{node.name()} broadcasts a tensor along its example dimension")
        found.append((at, k))
    return _agree(found, node.name())


def _single(proof: _Proof, node) -> tuple[Layout, tuple]:
    data = [(layout, shape) for layout, shape in proof.inputs(node) if layout is not CONSTANT]
    if len(data) > 1:
        raise Unproven(f"{node.name()} with several data inputs")
    return data[0] if data else (CONSTANT, ())


def _view(proof: _Proof, node, output_nr: int, out: tuple) -> Layout:
    """A reshape keeps the flat order: find the output dim whose index says the example."""
    layout, s_in = _single(proof, node)
    if layout is CONSTANT:
        return CONSTANT
    dim, k = layout
    outer, inner = math.prod(s_in[:dim]), math.prod(s_in[dim + 1:])
    chunk = k * inner  # one example's elements in one block of the outer dims
    for at in range(len(out)):
        inner_out = math.prod(out[at + 1:])
        if math.prod(out[:at]) == outer and inner_out and chunk % inner_out == 0 \
                and out[at] == proof.batch * (chunk // inner_out):
            return (at, chunk // inner_out)
    raise Unproven(f"{node.name()} from {list(s_in)} to {list(out)} splits an example's rows")


def _dim(value: int, rank: int) -> int:
    """A saved dim as an index: autograd's nodes give a negative dim as its
    unsigned 64-bit wrap (-1 as 2**64 - 1), whose remainder by the rank is not
    the dim it stands for (-3 of rank 3 would read as 1)."""
    return (value - 2**64 if value >= 2**63 else value) % rank


def _dims(values, rank: int) -> list[int]:
    return [_dim(v, rank) for v in (values if isinstance(values, (list, tuple)) else [values])]


def _permute(proof, node, output_nr, out) -> Layout:
    layout, _ = _single(proof, node)
    if layout is CONSTANT:
        return CONSTANT
    order = _dims(node._saved_dims, len(out))
    return (order.index(layout[0]), layout[1])


def _transpose(proof, node, output_nr, out) -> Layout:
    layout, _ = _single(proof, node)
    if layout is CONSTANT:
        return CONSTANT
    if node.name() == "TBackward0":
        a, b = 0, 1
    else:
        a, b = _dims([node._saved_dim0, node._saved_dim1], len(out))
    swap = {a: b, b: a}
    return (swap.get(layout[0], layout[0]), layout[1])


def _expand(proof, node, output_nr, out) -> Layout:
    layout, s_in = _single(proof, node)
    if layout is CONSTANT:
        return CONSTANT
    at = layout[0] + len(out) - len(s_in)
    if s_in[layout[0]] != out[at]:
        raise Unproven("an expand along the example dimension")
    return (at, layout[1])


def _off_dims(dims_of: Callable) -> Callable:
    """Operators that act along some dims only (roll, pad, softmax, slices): fine
    unless the example dim is one of them."""

    def rule(proof, node, output_nr, out) -> Layout:
        layout, _ = _single(proof, node)
        if layout is CONSTANT:
            return CONSTANT
        if layout[0] in dims_of(node, len(out)):
            raise Unproven(f"{node.name()} along the example dimension")
        return layout

    return rule


def _full_slice(node, rank) -> list[int]:
    """The sliced dim, unless the slice keeps all of it (read off the sizes: a
    negative end, saved as its unsigned wrap, would look past the end)."""
    dim = _dim(node._saved_dim, rank)
    whole = node._input_metadata[0].shape[dim] == node._saved_self_sym_sizes[dim]
    return [] if whole else [dim]


def _padded(node, rank) -> list[int]:
    pad = list(node._saved_pad)  # (last_lo, last_hi, second_last_lo, ...)
    return [rank - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]]


def _removes_dim(proof, node, output_nr, out) -> Layout:
    """select and unbind: one index of a dim other than the example's."""
    layout, s_in = _single(proof, node)
    if layout is CONSTANT:
        return CONSTANT
    dim = _dim(node._saved_dim, len(s_in))
    if dim == layout[0]:
        raise Unproven(f"{node.name()} of one index of the example dimension")
    return (layout[0] - (dim < layout[0]), layout[1])


def _cat(proof, node, output_nr, out) -> Layout:
    found = [layout for layout, _ in proof.inputs(node)]
    layout = _agree(found, node.name())
    if layout is not CONSTANT and _dim(node._saved_dim, len(out)) == layout[0]:
        raise Unproven("a cat along the example dimension")
    return layout


def _reduce(proof, node, output_nr, out) -> Layout:
    layout, s_in = _single(proof, node)
    if layout is CONSTANT:
        return CONSTANT
    dims = list(range(len(s_in))) if node._saved_dim is None else _dims(node._saved_dim, len(s_in))
    if layout[0] in dims:
        raise Unproven(f"{node.name()} over the example dimension")
    return layout if node._saved_keepdim else (layout[0] - sum(d < layout[0] for d in dims), layout[1])


def _matmul(maps: tuple[dict[int, int], ...]) -> Callable:
    """A matrix product: for each operand, where its example dim lands in the
    output (a contracted dim is absent: it mixes)."""

    def rule(proof, node, output_nr, out) -> Layout:
        found = []
        for (layout, _), where in zip(proof.inputs(node), maps):
            if layout is CONSTANT:
                continue
            if layout[0] not in where:
                raise Unproven(f"{node.name()} contracts the example dimension")
            found.append((where[layout[0]], layout[1]))
        return _agree(found, node.name())

    return rule


_ELEMENTWISE = (
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
    "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "NegBackward0", "CloneBackward0",
    "AliasBackward0", "ToCopyBackward0", "GeluBackward0", "SiluBackward0", "ReluBackward0", "SigmoidBackward0",
    "TanhBackward0", "NativeDropoutBackward0", "MaskedFillBackward0", "WhereBackward0", "ClampMinBackward0",
)
_RULES: dict[str, Callable] = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _view for name in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                                "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
                                "SqueezeBackward2")},
    "PermuteBackward0": _permute,
    "TransposeBackward0": _transpose,
    "TBackward0": _transpose,
    "ExpandBackward0": _expand,
    "RollBackward0": _off_dims(lambda node, rank: _dims(node._saved_dims, rank)),
    "ConstantPadNdBackward0": _off_dims(_padded),
    "SliceBackward0": _off_dims(_full_slice),
    "SoftmaxBackward0": _off_dims(lambda node, rank: _dims(node._saved_dim, rank)),
    "SafeSoftmaxBackward0": _off_dims(lambda node, rank: _dims(node._saved_dim, rank)),  # softmax, 0 for all -inf
    "LogSoftmaxBackward0": _off_dims(lambda node, rank: _dims(node._saved_dim, rank)),
    "SelectBackward0": _removes_dim,
    "UnbindBackward0": _removes_dim,
    "CatBackward0": _cat,
    "SumBackward1": _reduce,
    "MeanBackward1": _reduce,
    "LinalgVectorNormBackward0": _reduce,
    "BmmBackward0": _matmul(({0: 0, 1: 1}, {0: 0, 2: 2})),
    "MmBackward0": _matmul(({0: 0}, {1: 1})),
}
