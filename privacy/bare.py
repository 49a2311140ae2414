"""Bare parameters: trainable tensors that a module uses in its own forward code.

timm's ViT, DeiT, EVA and BEiT keep ``cls_token``, ``pos_embed``, ``reg_token``
as parameters of the model itself; BEiT's and EVA's attention build their qkv
bias from ``q_bias``/``v_bias``; BEiT and Swin index a
``relative_position_bias_table``; BEiT and ConvNeXt scale by a ``gamma``. No
layer rule sees these uses. The engine handles them without a change to the
model and without re-running any of it:

- During the forward of a module that owns bare parameters, each of them is
  shadowed (in the module's instance ``__dict__``: its ``_parameters``, which
  FSDP2 and DeepSpeed manage, are untouched) by a :class:`BareTensor`, a
  tensor subclass that sees every operator it takes part in
  (``__torch_function__``) and reads the parameter only then (so FSDP2's
  unsharded and ZeRO-3's gathered parameter).
- Operators on bare parameters and constants alone (indexing a bias table by a
  buffer, views, permutes, concatenating q_bias with a zero buffer...) run on a
  leaf copy of the parameter and give a derived BareTensor, whose autograd
  graph back to the leaf is the *recipe*.
- At the first operator that meets the batch, where the (derived) tensor D is
  broadcast over dim 0 (``x + pos_embed``, ``cls_token.expand(B, ...)``,
  ``gamma * x``, an attention mask, a bias of ``F.linear``), D is replaced by
  its per-example copy E = D expanded to the batch's rows (a view: no memory)
  through :class:`PerExampleCopy`. The gradient autograd gives E has one row
  per example: the per-example gradient of D, exactly. The engine maps it
  through the recipe's vector-Jacobian product, batched over examples
  (``is_grads_batched``), to per-example gradients of the parameters, as soon
  as it arrives in the backward. Nothing is re-run; the copy's gradient is
  what autograd forms anyway for a broadcast operand, before summing it.

Accepted uses, with D broadcast along dim 0 (its dim 0 is 1 or absent) against
the batch: elementwise add, sub, mul, div, where (also in place on the data);
expand, expand_as, broadcast_to, and repeat where it is an expand; cat and
stack with data (D of one row); F.scaled_dot_product_attention's attn_mask;
F.linear's bias (with the weight of a Linear the engine clips, as BEiT and
EVA call ``F.linear(x, self.qkv.weight, qkv_bias)``: that call goes through
the Linear's rule, the bias through a copy; where the Linear has a bias of its
own, changed in its parent's code first, as torchvision's Swin V2 zeroes a third
of a clone of it, the call keeps the Linear's bias and the copy is of the
difference: see :class:`LinearByWeight`). In-place operators on a value
computed from bare parameters (not on a parameter) are part of its recipe.
Refused, naming the parameter: any other operator between a bare parameter and
the batch, in-place operators on a bare parameter, or on a value after it met
the batch, a D not broadcast along dim 0. A derived D may meet the batch
after its module's forward returned it (a module computing a bias from its table
for its parent). The output of a layer the engine clips, called on a one-row
buffer of the model (HF CLIP's and SigLIP's ``position_embedding(position_ids)``),
or on such a D (the second layer of Swin V2's position bias MLP), is such a D
too: the engine runs the layer's rule on leaf copies of its
parameters and gives back a derived BareTensor. The copy's rows are
examples as every layer's are; rows grouped several per example (Swin's
windows) only where :func:`privacy.graph.rows_per_example` proves it.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from privacy.graph import BARE_LEAF


@dataclass(eq=False)
class BareOwner:
    """A module that owns bare parameters (trainable, used in its own forward)."""

    qualname: str
    module: nn.Module
    names: tuple[str, ...]
    depth: int = 0  # nested calls of the module now running
    handles: list = field(default_factory=list)
    _constants: set[int] | None = None  # storages of the module's buffers, for this forward
    # whose buffers are constants: the module's (None), or the model's for a layer called on a
    # constant, whose output meets the parent's buffers (Swin V2's bias table indexed by a buffer)
    buffers: Callable[[], Iterable[Tensor]] | None = None

    def label(self, name: str) -> str:
        return f"{self.qualname}.{name}" if self.qualname else name

    def constants(self) -> set[int]:
        if self._constants is None:
            buffers = self.buffers() if self.buffers is not None else self.module.buffers()
            self._constants = {b.untyped_storage().data_ptr() for b in buffers}
        return self._constants


class Host(Protocol):
    """What the handling of bare parameters needs from the engine."""

    anchor: Tensor

    def linear_target(self, weight: Tensor) -> Any | None:
        """The engine's Linear layer whose weight ``weight`` is now, if any."""

    def call_target(self, target: Any, x: Tensor) -> Tensor:
        """``target``'s layer on ``x``, through its rule (as its own forward would)."""

    def bias_value(self, target: Any) -> "BareTensor":
        """A Linear layer's bias as a bare value (a leaf copy): for its uses in its parent's own code."""

    def record_use(self, use: "Use") -> None:
        """A per-example copy made in this forward."""

    def on_use_grad(self, use: "Use", grad: Tensor) -> None:
        """The gradient of a copy: ``[rows, *shape]``, one row per row of the batch."""


@dataclass(eq=False)
class Use:
    """One per-example copy of a (derived) bare tensor D, where it met the batch."""

    value: Tensor  # D: a leaf copy of one parameter, or computed from leaves (with its recipe graph)
    leaves: tuple[tuple[BareOwner, str, Tensor], ...]
    op: str
    output: tuple | None = None  # (grad_fn, output_nr) of the operator's result: its rows, for the grouping proof
    version: int = -1  # D's version when copied: changed in place afterwards, its recipe is no longer D's

    def __post_init__(self):
        self.version = self.value._version

    def label(self) -> str:
        return ", ".join(owner.label(name) for owner, name, _ in self.leaves)

    def per_example(self, rows: Tensor) -> list[tuple[BareOwner, str, Tensor]]:
        """Per-example gradients [b, *param shape] of the parameters from D's [b, *D shape]."""
        if self.value._version != self.version:
            raise ValueError(f"{self.label()}: a value computed from it was changed in place after it met the batch "
                             f"in {self.op}, so its recipe no longer says what that use computed; the privacy "
                             "engine cannot give its per-example gradient")
        if len(self.leaves) == 1 and self.value is self.leaves[0][2]:
            return [(self.leaves[0][0], self.leaves[0][1], rows)]
        grads = torch.autograd.grad(self.value, [leaf for _, _, leaf in self.leaves], rows.to(self.value.dtype),
                                    retain_graph=True, allow_unused=True, is_grads_batched=True)
        return [(owner, name, g) for (owner, name, _), g in zip(self.leaves, grads) if g is not None]


class PerExampleCopy(torch.autograd.Function):
    """D expanded along dim 0 to the batch's rows; its backward hands the
    per-row gradient to the engine and returns nothing (``anchor`` makes the
    output part of the graph)."""

    row_kind = "constant"  # privacy.graph: a parameter's copy holds no example data

    @staticmethod
    def forward(ctx, host: Host, use: Use, value: Tensor, rows: int, anchor: Tensor):
        ctx.host, ctx.use = host, use
        return value.expand(rows, *value.shape[1:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.host.on_use_grad(ctx.use, grad)
        return None, None, None, None, None


class BareTensor(torch.Tensor):
    """Stands in for a bare parameter (a root, read when an operator runs) or for
    a tensor computed from bare parameters and constants (derived: ``_bare_value``
    with its recipe graph)."""

    @staticmethod
    def __new__(cls, host: Host, owner: BareOwner, shape, dtype, device, name: str | None = None,
                value: Tensor | None = None, leaves: tuple = ()):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        t._bare_host, t._bare_owner, t._bare_name = host, owner, name
        t._bare_value, t._bare_leaves = value, leaves
        t._bare_pending = None  # (func, flat args, spec) of a deferred elementwise operator
        return t

    @classmethod
    def root(cls, host: Host, owner: BareOwner, name: str, shape) -> "BareTensor":
        param = owner.module._parameters[name]
        return cls(host, owner, shape, param.dtype, param.device, name=name)

    @classmethod
    def derived(cls, host: Host, owner: BareOwner, value: Tensor, leaves: tuple) -> "BareTensor":
        return cls(host, owner, value.shape, value.dtype, value.device, value=value, leaves=leaves)

    def materialise(self) -> tuple[Tensor, list["Use"]]:
        """A deferred value (see :meth:`_Operator.defer`) as a plain tensor: its
        operator run again with the per-example copies, and those copies' uses."""
        func, flat, spec = self._bare_pending
        op = _Operator(func, flat, spec, deferrable=False)
        return op.run(), op.uses

    def resolve(self) -> tuple[Tensor, tuple]:
        """(D, its leaves): a root's leaf copy is made at its first use in this forward."""
        if self._bare_value is None:
            leaf = self._bare_owner.module._parameters[self._bare_name].detach().requires_grad_(True)
            setattr(leaf, BARE_LEAF, self._bare_owner.label(self._bare_name))
            self._bare_value, self._bare_leaves = leaf, ((self._bare_owner, self._bare_name, leaf),)
        return self._bare_value, self._bare_leaves

    def label(self) -> str:
        if self._bare_name is not None:
            return self._bare_owner.label(self._bare_name)
        return "a tensor computed from " + ", ".join(owner.label(name) for owner, name, _ in self._bare_leaves)

    def parameter(self) -> Tensor:
        """Outside its owner's forward: the parameter itself (or the derived value)."""
        if self._bare_name is None:
            return self._bare_value
        return self._bare_owner.module._parameters[self._bare_name]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"{func} reached a BareTensor below __torch_function__")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        flat, spec = tree_flatten((args, kwargs or {}))
        return _Operator(func, flat, spec).run()


class LinearByWeight(TorchFunctionMode):
    """While a bare owner runs (privacy/install.py pushes it only for owners with a
    Linear child the engine clips): ``F.linear(x, child.weight, child.bias)`` is
    that child's call, run through its rule, as torchvision's Swin calls its qkv
    and proj layers from a function. Any other operator on such a child's bias
    takes it as a bare value (:meth:`Host.bias_value`), as torchvision's Swin V2
    zeroes the key third of a clone of its qkv bias before ``F.linear(x,
    qkv.weight, that_bias)``: that call is the child's (with its own bias)
    plus a copy of the difference (:meth:`_Operator.linear`). Any other
    ``F.linear`` on a clipped weight is left to the engine's refusal before the
    backward, by name."""

    def __init__(self, host: Host, children: list):
        super().__init__()
        self.host, self.children = host, children  # the owner's Linear children that the engine clips

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = dict(zip(("input", "weight", "bias"), args)) | kwargs
            target = self.host.linear_target(named["weight"])
            if target is not None and named.get("bias") is target.module._parameters.get("bias"):
                return self.host.call_target(target, named["input"])
        biases = {id(b): t for t in self.children if (b := t.module._parameters.get("bias")) is not None}
        flat, spec = tree_flatten((args, kwargs))
        if any(id(a) in biases for a in flat if isinstance(a, Tensor)):
            flat = [self.host.bias_value(biases[id(a)]) if isinstance(a, Tensor) and id(a) in biases else a
                    for a in flat]
            args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- operators

ELEMENTWISE = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "rsub", "sub_",
               "__isub__", "mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__",
               "__rtruediv__", "div_", "__itruediv__", "true_divide", "where"}
IN_PLACE = {"__iadd__", "__isub__", "__imul__", "__itruediv__"}
EXPANDS = {"expand", "expand_as", "broadcast_to", "repeat"}
CONCATS = {"cat", "concat", "concatenate", "stack"}


def refusal(label: str, op: str, why: str) -> ValueError:
    return ValueError(
        f"{label} (a bare parameter, used in its module's own forward) meets the batch in {op} {why}; the "
        "privacy engine takes exact per-example gradients of a bare parameter only where it is broadcast over "
        "the examples (added, multiplied, expanded, an attention mask, F.linear's bias). Move it into a layer "
        "the engine has a rule for (nn.Linear, privacy.layers.AddedParameter), or freeze it")


def _in_place(op: str) -> bool:
    return op in IN_PLACE or (op.endswith("_") and not op.startswith("__"))


def _aligned(shape, out_shape) -> tuple[int, ...]:
    """``shape`` with the leading 1s that broadcasting against ``out_shape`` adds."""
    return (1,) * (len(out_shape) - len(shape)) + tuple(shape)


class _Operator:
    """One operator call with BareTensors among its arguments (flattened)."""

    def __init__(self, func, flat: list, spec, deferrable: bool = True):
        self.deferrable = deferrable
        self.func, self.flat, self.spec = func, flat, spec
        self.op = getattr(func, "__name__", str(func))
        self.positions = [i for i, a in enumerate(flat) if isinstance(a, BareTensor)]
        self.uses: list[Use] = []  # the per-example copies this operator made
        first = flat[self.positions[0]]
        self.host, self.owner = first._bare_host, first._bare_owner

    def run(self) -> Any:
        bares = [self.flat[i] for i in self.positions]
        # a root kept past its module's forward is the parameter itself; a derived value keeps its
        # recipe while grad is on (returned by its module, as HF Swin's relative position bias is)
        if any(b._bare_owner.depth == 0 and (b._bare_name is not None or not torch.is_grad_enabled())
               for b in bares):
            return self.call([a.parameter() if isinstance(a, BareTensor) else a for a in self.flat])
        self.label = ", ".join(sorted({b.label() for b in bares}))
        self.resolved = {i: b.resolve() for i, b in zip(self.positions, bares)}
        # in place on a value computed from parameters is part of its recipe (Swin V2's zeroed bias third)
        if 0 in self.positions and _in_place(self.op) and self.resolved[0][0].is_leaf:
            raise refusal(self.label, self.op, "in place on the parameter")
        self.values = [self.resolved[i][0] if i in self.resolved else a for i, a in enumerate(self.flat)]
        self.leaves = tuple({id(leaf): (o, n, leaf) for i in self.positions
                             for o, n, leaf in self.resolved[i][1]}.values())
        constants = set().union(*(b._bare_owner.constants() for b in bares))
        # anything else is taken as the batch: a wrong guess ends in a refusal, never a wrong gradient
        has_data = any(isinstance(a, Tensor) and i not in self.resolved
                       and (a.requires_grad or (a.dim() > 0 and a.untyped_storage().data_ptr() not in constants))
                       for i, a in enumerate(self.flat))
        pending = [i for i in self.positions if self.flat[i]._bare_pending is not None]
        if pending and has_data:
            return self.meet_deferred(pending)
        if self.deferrable and has_data and self.op in ELEMENTWISE and not _in_place(self.op) and not any(
                isinstance(a, Tensor) and a.requires_grad for i, a in enumerate(self.flat) if i not in self.resolved):
            return self.defer()
        if self.op in EXPANDS and self.positions[0] == 0:
            expanded = self.expand()
            if expanded is not None:
                return expanded
        if not has_data:
            with torch.enable_grad():
                out = self.call(self.values)
            return tree_map(lambda t: BareTensor.derived(self.host, self.owner, t, self.leaves)
                            if isinstance(t, Tensor) else t, out)
        if self.op in ELEMENTWISE:
            return self.elementwise()
        if self.op == "linear":
            return self.linear()
        if self.op == "scaled_dot_product_attention":
            return self.attention()
        if self.op in CONCATS:
            return self.concat()
        raise refusal(self.label, self.op, "where it is not broadcast over the examples")

    def call(self, flat: list) -> Any:
        args, kwargs = tree_unflatten(flat, self.spec)
        return self.func(*args, **kwargs)

    def copy(self, i: int, rows: int, aligned: tuple, dtype: torch.dtype | None = None,
             bare: BareTensor | None = None) -> tuple[Tensor, Use]:
        """The per-example copy of argument ``i`` (or of ``bare``): its value viewed
        as ``aligned`` (dim 0 of size 1), expanded to ``rows``."""
        value, leaves = self.resolved[i] if bare is None else bare.resolve()
        use = Use(value, leaves, self.op)
        aligned_value = value.detach().reshape(aligned)
        if dtype is not None:
            aligned_value = aligned_value.to(dtype)
        self.host.record_use(use)
        return PerExampleCopy.apply(self.host, use, aligned_value, rows, self.host.anchor), use

    def finish(self, result: Tensor, uses: list[Use]) -> Tensor:
        """The operator's result is where the copies' rows meet the batch's."""
        for use in uses:
            use.output = (result.grad_fn, result.output_nr)
        self.uses = uses
        return result

    def defer(self) -> "BareTensor":
        """D broadcast against tensors that need no gradient (a mask made in the
        forward, as HF Swin adds its shifted windows' mask to its relative position
        bias): the copy is deferred to where the result meets data that does, so
        that the rows' grouping is proved there (its operand has example rows)."""
        with torch.enable_grad():
            out = BareTensor.derived(self.host, self.owner, self.call(self.values), self.leaves)
        out._bare_pending = (self.func, self.flat, self.spec)
        return out

    def meet_deferred(self, pending: list[int]) -> Tensor:
        """This operator on deferred values made plain (:meth:`BareTensor.materialise`)."""
        flat, uses = list(self.flat), []
        for i in pending:
            flat[i], made = self.flat[i].materialise()
            uses += made
        return self.finish(self.call(flat), uses)

    def expand(self) -> Tensor | None:
        """``cls_token.expand(B, -1, -1)``: a copy where dim 0 is the batch's, also of one row
        (SigLIP's ``probe.repeat(B, 1, 1)`` in a micro-batch of one); None otherwise."""
        out = self.call(self.values)
        aligned = _aligned(self.values[0].shape, out.shape)
        if not (out.dim() and aligned[0] == 1):
            return None
        if self.op == "repeat" and any(a not in (s, 1) for a, s in zip(aligned, out.shape)):
            raise refusal(self.label, self.op, "which tiles it (not an expand)")
        e, use = self.copy(0, out.shape[0], aligned)
        return self.finish(e.expand(out.shape), [use])

    def elementwise(self) -> Tensor:
        shapes = [t.shape for t in self.values if isinstance(t, Tensor)]
        out_shape = self.values[0].shape if _in_place(self.op) else torch.broadcast_shapes(*shapes)
        uses = []
        for i in self.positions:
            aligned = _aligned(self.resolved[i][0].shape, out_shape)
            if not out_shape or aligned[0] != 1:
                raise refusal(self.label, self.op, f"not broadcast over dim 0 (shape {list(aligned)} "
                                                   f"against {list(out_shape)})")
            self.values[i], use = self.copy(i, out_shape[0], aligned)
            uses.append(use)
        return self.finish(self.call(self.values), uses)

    def linear(self) -> Tensor:
        """``F.linear(x, weight, bias)`` with a bare bias (BEiT's, EVA's qkv): the
        weight's part through its Linear's rule, the bias through a copy."""
        args, kwargs = tree_unflatten(self.flat, self.spec)
        named = dict(zip(("input", "weight", "bias"), args)) | kwargs
        x, weight, bias = named["input"], named["weight"], named.get("bias")
        if isinstance(x, BareTensor) or isinstance(weight, BareTensor):
            raise refusal(self.label, "F.linear", "as its input or weight (only its bias is a broadcast)")
        target = self.host.linear_target(weight)
        if target is not None:
            y = self.host.call_target(target, x)
            if target.module._parameters.get("bias") is not None:  # y has the layer's own bias: copy the difference
                bias = bias - self.host.bias_value(target)
        else:  # not a clipped layer's weight: if it is a parameter, the engine refuses it before the backward
            y = F.linear(x, weight)
        if y.dim() < 2:
            raise refusal(self.label, "F.linear", "on an input with no batch dimension")
        e, use = self.copy(-1, y.shape[0], (1,) * (y.dim() - 1) + (y.shape[-1],), dtype=y.dtype, bare=bias)
        return self.finish(y + e, [use])

    def attention(self) -> Tensor:
        """F.scaled_dot_product_attention with a bare attention mask (BEiT's relative position bias)."""
        args, kwargs = tree_unflatten(self.values, self.spec)
        named = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
        mask = named.get("attn_mask")
        masks = [i for i in self.positions if self.values[i] is mask]
        if len(masks) != 1 or len(self.positions) > 1:
            raise refusal(self.label, "F.scaled_dot_product_attention", "as a query, key or value")
        query = named["query"]
        aligned = _aligned(mask.shape, query.shape)
        if aligned[0] != 1:
            raise refusal(self.label, "F.scaled_dot_product_attention", "as a mask not broadcast over dim 0")
        self.values[masks[0]], use = self.copy(masks[0], query.shape[0], aligned)
        return self.finish(self.call(self.values), [use])

    def concat(self) -> Tensor:
        """cat or stack with the batch: only a one-row D (a batch of one example)."""
        uses = []
        for i in self.positions:
            shape = tuple(self.resolved[i][0].shape)
            if not shape or shape[0] != 1:
                raise refusal(self.label, self.op, "as more than one row")
            self.values[i], use = self.copy(i, 1, shape)
            uses.append(use)
        args, kwargs = tree_unflatten(self.values, self.spec)
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if self.op != "stack" and dim % args[0][0].dim() == 0:
            raise refusal(self.label, self.op, "along dim 0")
        return self.finish(self.func(*args, **kwargs), uses)
