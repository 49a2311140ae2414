"""The engine's first stage: its hold on a model.

:func:`find_targets` looks up a rule for every layer that owns trainable
parameters (refusing what no rule can cover: BatchNorm, tied parameters, a
torch layer without a rule, a subclass that overrides its rule's forward);
every other module with trainable parameters of its own owns bare parameters
(``privacy/bare.py``). :class:`Installation` then swaps each layer's
``forward`` for its rule's, run through :class:`BookkeptCall` (the input
activation kept, the output gradient caught, no weight gradient formed),
shadows bare parameters while their owner runs (the engine as
``privacy.bare.Host``), and hands every gradient it catches to a
:class:`GradSink` (the clipping stage, ``privacy/clipping.py``). Before each
backward it refuses a parameter the backward would reach outside its rule
(:meth:`Installation.refuse_leaks`). :meth:`Installation.detach` undoes all of
it.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from privacy import graph
from privacy.bare import BareOwner, BareTensor, LinearByWeight, Use
from privacy.rules import Call, Rule, RuleKey, find_rule, qualified_name
from privacy.rules.linear import LinearRule

# a child of the engine's logger: one switch for the engine's log (the audit quiets privacy.engine)
logger = logging.getLogger("privacy.engine.install")


@dataclass(eq=False)
class Target:
    """A layer whose trainable parameters the engine clips."""

    qualname: str
    module: nn.Module
    rule: Rule
    names: tuple[str, ...]  # trainable parameter attributes, all covered by the rule
    calls: list[Call] = field(default_factory=list)
    done: bool = False  # prepared in this pass


class GradSink(Protocol):
    """Where the installed layers' gradients go, in the backward (the clipping stage)."""

    def on_grad(self, target: Target, call: Call, grad: Any) -> None:
        """A wrapped layer's output gradient(s), dim 0 the rows."""

    def on_use_grad(self, use: Use, grad: Tensor) -> None:
        """A bare parameter's per-example copy's gradient ``[rows, *shape]``."""


def refuse_batch_mixing(qualname: str, module: nn.Module) -> None:
    """ValueError for a layer that mixes the examples of a batch (BatchNorm)."""
    if isinstance(module, _BatchNorm):
        raise ValueError(
            f"{qualname or 'model'} ({type(module).__name__}) normalises over the examples of a batch, which "
            "breaks per-example privacy; use GroupNorm, which normalises each example alone and which the "
            "engine supports: privacy.convert.replace_batchnorm(model) converts every BatchNorm and lists "
            "what it changed"
        )
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        raise ValueError(
            f"{qualname or 'model'} ({type(module).__name__}) keeps running statistics over examples; "
            "use track_running_stats=False"
        )


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "torch"


def find_targets(model: nn.Module, rules: dict[RuleKey, Rule]) -> tuple[list[Target], list[BareOwner]]:
    """One target per layer with a rule; every other module with trainable
    parameters of its own owns bare parameters (privacy/bare.py), unless it is
    one of torch's layers (which has no rule); ValueError for anything not covered."""
    targets, owners, owner_of = [], [], {}
    for qualname, module in model.named_modules():
        refuse_batch_mixing(qualname, module)
        trainable = tuple(n for n, p in module.named_parameters(recurse=False) if p.requires_grad)
        if not trainable:
            continue
        label = f"{qualname or 'model'} ({type(module).__name__})"
        for name in trainable:
            param = getattr(module, name)
            if id(param) in owner_of:
                raise ValueError(
                    f"parameter {qualname}.{name} is shared with {owner_of[id(param)]}; the privacy engine does "
                    "not handle the cross term of tied parameters: untie them or freeze one use"
                )
            owner_of[id(param)] = f"{qualname}.{name}"
        found = find_rule(module, rules)
        if found is None:
            if _is_torch_layer(module):
                raise ValueError(
                    f"{label} has trainable parameters {list(trainable)} but the privacy engine has no rule for "
                    f"{type(module).__name__}; freeze them, or build the layer from supported ones "
                    f"({', '.join(k if isinstance(k, str) else k.__name__ for k in rules)})"
                )
            owners.append(BareOwner(qualname, module, trainable))
            continue
        cls, rule = found
        if type(module).forward is not cls.forward:
            raise ValueError(
                f"{label} subclasses {cls.__name__} but overrides forward, so the {cls.__name__} rule would not "
                f"compute what it does; register a rule for {qualified_name(type(module))}"
            )
        uncovered = [n for n in trainable if n not in rule.slots]
        if uncovered:
            raise ValueError(
                f"{label} has trainable parameters {uncovered} that the {cls.__name__} rule does not cover; "
                "freeze them or move them into an AddedParameter"
            )
        if "forward" in module.__dict__:
            raise ValueError(f"{label} already has an instance-level forward; the privacy engine cannot wrap it")
        rule.check(module, label)
        targets.append(Target(qualname, module, rule, trainable))
    return targets, owners


class BookkeptCall(torch.autograd.Function):
    """Runs a layer through its rule; the backward returns the input's gradient only.

    The parameters are read here, not passed in, so the graph has no edge to them:
    autograd runs no AccumulateGrad for a parameter, and a sharding backend's
    per-parameter gradient hooks (DeepSpeed ZeRO-2/3 reduce in them) never fire on
    a parameter that gets no gradient. ``anchor`` (a scalar that requires grad) makes
    the output require grad when the input does not (images, token ids).
    """

    row_kind = "rows"  # privacy.graph: each output row is made from the same input row

    @staticmethod
    def forward(ctx, installation: "Installation", target: Target, call: Call, x: Tensor, anchor: Tensor):
        ctx.installation, ctx.target, ctx.call = installation, target, call
        module = target.module
        return target.rule.forward(module, call, x, *(getattr(module, s, None) for s in target.rule.slots))

    @staticmethod
    def backward(ctx, grad: Tensor):
        target, call = ctx.target, ctx.call
        grad_x = target.rule.grad_input(target.module, call, grad) if ctx.needs_input_grad[3] else None
        ctx.installation.sink.on_grad(target, call, grad)
        return None, None, None, grad_x, None


def _new_call(target: Target) -> Call:
    call = Call()
    target.calls.append(call)
    return call


class _Layer:
    """The installation as privacy.rules.base.Layer, for one target's rule."""

    def __init__(self, installation: "Installation", target: Target):
        self.installation, self.target, self.module = installation, target, target.module
        self.anchor = installation.anchor

    def call(self, x: Tensor) -> Tensor:
        return self.installation.call(self.target, x)

    def new_call(self) -> Call:
        return _new_call(self.target)

    def on_grad(self, call: Call, grad) -> None:
        self.installation.sink.on_grad(self.target, call, grad)


class _BareHost:
    """The installation as privacy.bare.Host: what bare parameters' copies need from it."""

    def __init__(self, installation: "Installation"):
        self.installation = installation
        self.anchor = installation.anchor

    def linear_target(self, weight: Tensor) -> Target | None:
        return next((t for t in self.installation.targets if isinstance(t.rule, LinearRule)
                     and t.module._parameters.get("weight") is weight), None)

    def call_target(self, target: Target, x: Tensor) -> Tensor:
        return self.installation.call(target, x)

    def bias_value(self, target: Target) -> BareTensor:
        return self.installation.bias_value(target)

    def record_use(self, use: Use) -> None:
        self.installation.uses.append(use)

    def on_use_grad(self, use: Use, grad: Tensor) -> None:
        self.installation.sink.on_use_grad(use, grad)


def _qualified(qualname: str, name: str) -> str:
    return f"{qualname}.{name}" if qualname else name


class Installation:
    """The engine's wrapped layers and watched bare owners of one model.

    ``clipped``: every clipped parameter as (module, attribute name, qualified
    name); ``shapes``: each one's full shape, read once here (a sharding backend
    may later swap a parameter's storage for a part of it: a ZeRO-3 parameter
    released after use is empty). Nothing is wrapped until :meth:`attach`.
    """

    def __init__(self, model: nn.Module, rules: dict[RuleKey, Rule]):
        self.targets, self.owners = find_targets(model, rules)
        self.clipped = [(t.module, name, _qualified(t.qualname, name)) for t in self.targets for name in t.names]
        self.clipped += [(o.module, name, o.label(name)) for o in self.owners for name in o.names]
        self.shapes = {(module, name): tuple(getattr(module, name).shape) for module, name, _ in self.clipped}
        self.anchor = torch.zeros((), requires_grad=True)  # see BookkeptCall
        self.sink: GradSink | None = None
        self.uses: list[Use] = []  # bare parameters' per-example copies made in this forward
        self.constant_owners: dict[Target, BareOwner] = {}  # layers called on a constant input (is_constant)
        self.bias_owners: dict[Target, BareOwner] = {}  # Linear biases used in their parents' code (bias_value)
        self.attached = False
        self._model_buffers = model.buffers
        self._host = _BareHost(self)

    def attach(self, sink: GradSink) -> None:
        """Wrap every layer's forward and watch every bare owner; gradients go to ``sink``."""
        self.sink = sink
        self.attached = True
        for target in self.targets:
            target.module.forward = self._wrapped_forward(target)
        for owner in self.owners:
            self._watch(owner)

    def _wrapped_forward(self, target: Target):
        original = type(target.module).forward
        layer = _Layer(self, target)

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(target.module, *args, **kwargs)
            # a deferred bare value meets the batch here, not inside the rule's no-grad forward
            args = [a.materialise()[0] if isinstance(a, BareTensor) and a._bare_pending is not None else a
                    for a in args]
            return target.rule.run(layer, *args, **kwargs)

        return forward

    def call(self, target: Target, x: Tensor) -> Tensor:
        """One call of a layer, through its rule."""
        if self._is_constant(x):
            return self._constant_output(target, x)
        call = _new_call(target)
        out = BookkeptCall.apply(self, target, call, x, self.anchor)
        call.node = out.grad_fn
        return out

    def _is_constant(self, x: Tensor) -> bool:
        """``x`` is (a view of) one row of a buffer of the model, or a value derived
        from bare parameters and constants alone (the output of a layer called on
        such a row, as the second layer of Swin V2's position bias MLP is called):
        an input that the layer's output is broadcast from over the batch, made of
        parameters alone."""
        if isinstance(x, BareTensor):
            return x._bare_pending is None
        if x.requires_grad or x.dim() == 0 or x.shape[0] != 1:
            return False
        storage = x.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == storage for b in self._model_buffers())

    def _constant_output(self, target: Target, x: Tensor) -> BareTensor:
        """The layer on a constant input (:meth:`_is_constant`), as a derived bare value (privacy/bare.py):
        its rule's forward on leaf copies of the parameters, with the graph kept,
        so that where it meets the batch each example's gradient is its copy's row."""
        owner = self.constant_owners.setdefault(
            target, BareOwner(target.qualname, target.module, target.names, buffers=self._model_buffers))
        owner._constants = None  # read again in each forward
        params, leaves = [], []
        if isinstance(x, BareTensor):  # its recipe goes on to this layer's
            x, before = x.resolve()
            leaves += before
        for slot in target.rule.slots:
            param = getattr(target.module, slot, None)
            if slot in target.names:
                param = param.detach().requires_grad_(True)
                setattr(param, graph.BARE_LEAF, owner.label(slot))
                leaves.append((owner, slot, param))
            params.append(param)
        with torch.enable_grad():
            value = target.rule.forward(target.module, Call(), x, *params)
        return BareTensor.derived(self._host, owner, value, tuple(leaves))

    def bias_value(self, target: Target) -> BareTensor:
        """A clipped Linear's bias used in its parent's own code (privacy.bare.LinearByWeight):
        a leaf copy, as a derived bare value whose per-example gradients join its rule's
        (privacy.clipping.MicroBatch.add)."""
        owner = self.bias_owners.setdefault(target, BareOwner(target.qualname, target.module, ("bias",)))
        leaf = target.module._parameters["bias"].detach().requires_grad_(True)
        setattr(leaf, graph.BARE_LEAF, owner.label("bias"))
        return BareTensor.derived(self._host, owner, leaf, ((owner, "bias", leaf),))

    def _watch(self, owner: BareOwner) -> None:
        """Shadow the owner's bare parameters by BareTensors while it runs with grad
        enabled (in its instance ``__dict__``; its ``_parameters`` stay as they are)."""
        shadowing: list[bool] = []  # per nested call: whether it shadows
        children = {id(child) for child in owner.module.children()}
        linears = [t for t in self.targets if isinstance(t.rule, LinearRule) and id(t.module) in children]
        by_weight = LinearByWeight(self._host, linears) if linears else None

        def before(module: nn.Module, args) -> None:
            shadow = torch.is_grad_enabled() and self.attached
            shadowing.append(shadow)
            if shadow:
                owner.depth += 1
                if owner.depth == 1:
                    owner._constants = None
                    for name in owner.names:
                        module.__dict__[name] = BareTensor.root(self._host, owner, name,
                                                                self.shapes[(module, name)])
                    if by_weight is not None:
                        by_weight.__enter__()

        def after(module: nn.Module, args, output) -> None:
            if shadowing and shadowing.pop():
                owner.depth -= 1
                if owner.depth == 0:
                    for name in owner.names:
                        module.__dict__.pop(name, None)
                    if by_weight is not None:
                        by_weight.__exit__(None, None, None)

        owner.handles = [owner.module.register_forward_pre_hook(before),
                         owner.module.register_forward_hook(after, always_call=True)]

    def refuse_leaks(self, loss: Tensor) -> None:
        """ValueError if the backward would give a parameter a gradient outside the
        engine (privacy.graph.reached_leaves): it would be neither clipped nor in the norms."""
        leaked = graph.reached_leaves(loss.grad_fn)
        if not leaked:
            return
        names = {id(getattr(module, name)): qualified for module, name, qualified in self.clipped}
        described = []
        for leaf in leaked:
            if hasattr(leaf, graph.BARE_LEAF):
                described.append(f"{getattr(leaf, graph.BARE_LEAF)} (a bare parameter) reaches the loss without "
                                 "meeting the batch")
            elif id(leaf) in names:
                described.append(f"{names[id(leaf)]} is used outside its layer's forward (as in "
                                 "F.linear(x, layer.weight) instead of layer(x)), or outside its module's call")
            else:
                described.append(f"a parameter of shape {list(leaf.shape)} that the engine does not clip (not in "
                                 "the model given to it?) gets a gradient")
        raise ValueError(
            "the privacy engine would miss part of a per-example gradient: " + "; ".join(described)
            + ". Call the layers themselves (their forward is where the engine sees each use), or freeze what "
            "is not to be trained")

    def drop_stale_calls(self) -> None:
        """Forget layer calls that a backward outside the engine already reached,
        so a stray ``loss.backward()`` never leaks into the clipped sum."""
        stale = 0
        for target in self.targets:
            kept = [call for call in target.calls if call.grad is None]
            stale += len(target.calls) - len(kept)
            target.calls[:] = kept
        if stale:
            logger.warning("%d layer calls had a gradient from a backward outside engine.backward "
                           "(e.g. loss.backward()); it was discarded, use engine.backward(per_example_loss)", stale)

    def forget_forward(self) -> None:
        """Drop what the last forward recorded (its calls and its bare copies)."""
        self.uses.clear()
        for target in self.targets:
            target.calls.clear()

    def detach(self) -> None:
        """Restore every layer's own forward and every bare owner's parameters."""
        for target in self.targets:
            target.module.__dict__.pop("forward", None)
            target.calls.clear()
        for owner in self.owners:
            for handle in owner.handles:
                handle.remove()
            for name in owner.names:
                owner.module.__dict__.pop(name, None)
            owner.depth = 0
        self.uses.clear()
        self.attached = False
