"""PrivacyEngine: DP-SGD gradients with exact per-example clipping, one backward.

Book-keeping clipping (Bu et al. 2023, "Differentially private optimization on
large model at small cost"). At construction the
engine finds a rule for every layer that owns trainable parameters and swaps
that layer's ``forward`` for a custom autograd Function which keeps the input
activation, catches the output gradient, and returns a gradient for the input
only, so autograd never forms the (unclipped) weight gradient. As soon as a
layer's output gradient arrives, still inside the backward, its rule computes
the layer's per-example norms and keeps only what the clipped sum needs (the
pair (activation, output gradient) for a matmul, or the per-example gradient
itself where that is small: see ``privacy/rules/linear.py`` for the cost
model); Gram matrices and layer-norm inputs are freed at once. After the
backward the clip factors are known and each layer adds ``sum_i c_i g_i`` to
its own fp32 buffers. ``finish_step`` reduces, noises once, scales by 1/B and
assigns ``p.grad``. No step of a micro-batch waits for the device: dropped
(non-finite) examples are handled on the device (see ``privacy/rules/base.py``),
and the step statistics are read once per logical step.

The bound. The accountant assumes every example adds at most C. What is
proved, for every dtype the rules compute in: in exact arithmetic over the
operands the engine's matmuls consume, each example's contribution has norm
``<= c_i (||g_i|| + E_i) <= C``. The clip factor is rounded towards zero in
the dtype it is applied in (``scale_in``); the scaled products of a layer L
whose clipped sum is a matmul over tokens round once each, by at most the
dtype's unit roundoff u (2^-8 bf16, 2^-11 fp16, 2^-24 fp32) relative, and its
fp32 accumulation over the example's T tokens adds at most T 2^-24 relative to
``B_iL = sum_t ||g_t|| ||a_t||``: that is the error bound, not the norm, because
tokens can cancel. With ``e_iL = (u + T 2^-24) B_iL (1 + 2^-12)`` for such
layers and ``e_iL = 2^-24 ||g_iL||`` for per-example gradients scaled in fp32,
``E_i = sqrt(sum_L e_iL^2)`` bounds the rounding of the whole contribution by
Minkowski's inequality, and ``c_i = min(1, C / (N_i + E_i + 1e-6))``.
``N_i`` is the fp32 norm with a margin for its own arithmetic:
``N_i^2 = sum_L (n_iL + 2^-20 (n_iL + B_iL^2))``, which covers the realised
rounding of fp32 sums and of ghost norms (whose error is relative to
``B_iL^2``, not ``n_iL``, when tokens cancel) with room, measured in
tests/test_privacy_bound.py, but is not the worst case (``(p + d) 2^-24
B_iL^2``, which would shrink typical clip factors by 1e-4-1e-3 for nothing).
Not covered: the fp32 rounding of the final sums over examples (the rounding
of a sum of bounded terms, as in every floating-point DP implementation), and
the two-pass mode's second backward (see ``two_pass``). TF32 would round fp32
matmul operands to 11 bits: the engine refuses to run with it
(:func:`check_matmul_precision`).

Parameters are addressed as (module, attribute name) and read again when
needed, so FSDP2's swapping between sharded and unsharded parameters is
transparent. The noise seed is secret: whoever knows it can remove the noise.

Limits: activation checkpointing stays exact but saves no memory (the engine
keeps each layer's input from the first forward until the layer's backward);
torch.compile breaks the graph at every wrapped layer.
"""

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from privacy import graph
from privacy.bare import BareOwner, BareTensor, LinearByWeight, Use
from privacy.reducer import GradReducer, LocalReducer
from privacy.rules import DEFAULT_RULES, Call, Rule, RuleKey, find_rule, qualified_name
from privacy.rules.base import (
    ClipFactors,
    Context,
    LayerPlan,
    Prepared,
    finite_or_zero,
    mm_fp32,
    sum_rows,
    unit_roundoff,
)
from privacy.rules.linear import LinearRule, rows_plan

logger = logging.getLogger(__name__)

FP32 = torch.float32
STABILITY = 1e-6  # c_i = min(1, C / (||g_i|| + E_i + STABILITY))
U32 = 2.0**-24
NORM_SLACK = 2.0**-20  # margin on fp32 norm arithmetic, relative to n_iL + B_iL^2
BOUND_SLACK = 1 + 2.0**-12  # B_iL is itself computed in fp32 from Gram diagonals


def check_matmul_precision(device_type: str) -> None:
    """Refuse fp32 matmuls of reduced precision (TF32 on CUDA, bf16/TF32 through
    oneDNN on CPU): they round the engine's fp32 norm and sum operands to 11
    bits or fewer, so a clipped contribution could exceed C by about 1e-3.

    Refused rather than switched off for the engine's arithmetic: PyTorch
    raises on any later read of its legacy TF32 flag once its new API was used
    to change it, so flipping the setting behind the user's back could break
    their code. Only reads, which are safe with either API."""
    backend = torch.backends.cuda.matmul if device_type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(backend, "fp32_precision", None)
    if precision is None:  # torch before the new API: only CUDA has a (legacy) TF32 flag
        reduced = device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    else:
        reduced = precision not in ("ieee", "none")
    if reduced:
        setting = ("torch.backends.cuda.matmul.fp32_precision = 'ieee' (or allow_tf32 = False)"
                   if device_type == "cuda" else "torch.backends.mkldnn.matmul.fp32_precision = 'ieee'")
        raise ValueError(
            f"reduced-precision fp32 matmuls are enabled on {device_type} ({precision or 'allow_tf32'}); they "
            f"round the privacy engine's norms and clipped sums, so an example could add more than "
            f"max_grad_norm: set {setting} (bf16 autocast is unaffected and stays fast)"
        )


@contextmanager
def _arithmetic(device: torch.device) -> Iterator[None]:
    """The engine's own arithmetic: no graph (saved inputs may require grad) and
    no autocast (a backward called inside autocast would run the fp32 Grams and
    sums in bf16)."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


@dataclass(eq=False)
class _Target:
    """A layer whose trainable parameters the engine clips."""

    qualname: str
    module: nn.Module
    rule: Rule
    names: tuple[str, ...]  # trainable parameter attributes, all covered by the rule
    calls: list[Call] = field(default_factory=list)
    done: bool = False  # prepared in this pass


@dataclass(eq=False)
class _MicroBatch:
    """What one backward pass gathers from the layers, combined at its end: few
    operators per layer (a GPU pays a launch for each), the sums over layers
    and the small per-example gradients of every layer in one go."""

    batch: int  # examples
    device: torch.device
    ctx: Context
    views: int = 1  # consecutive loss rows per example (augmentation multiplicity)
    keep: ClipFactors | None = None  # two-pass second pass: the factors are in the gradients; 1 kept, 0 dropped
    sq_norms: list[Tensor] = field(default_factory=list)  # per layer, its parameters not in rows
    # B_iL of ghost layers by their rounding unit u + T 2^-24 (few distinct): the margins' terms
    ghost_bounds: dict[float, list[Tensor]] = field(default_factory=dict)
    # small per-example gradients [b, ...] by parameter
    rows: dict[tuple[nn.Module, str], Tensor] = field(default_factory=dict)
    sums: list = field(default_factory=list)  # the layers' accumulate(factors) for the rest
    # bare parameters' per-example gradients [b, numel], summed over their uses in the forward
    bare: dict[tuple[BareOwner, str], Tensor] = field(default_factory=dict)

    @property
    def loss_rows(self) -> int:
        """Rows of the loss: the layers' rows are proved grouped relative to these."""
        return self.batch * self.views

    def add_bare(self, owner: BareOwner, name: str, per_example: Tensor) -> None:
        flat = per_example.reshape(self.batch, -1).float()
        key = (owner, name)
        self.bare[key] = flat if key not in self.bare else self.bare[key] + flat

    def add(self, module: nn.Module, prepared: Prepared) -> None:
        for name, value in prepared.rows.items():
            # a parameter with gradients from two places (a Linear's bias through its rule and, changed in its
            # parent's code, as a bare value: torchvision's Swin V2) has their per-example sum as its gradient
            key = (module, name)
            before = self.rows.get(key)
            self.rows[key] = value if before is None else before.reshape(self.batch, -1) + value.reshape(self.batch, -1)
        if self.ctx.norms and prepared.sq_norm is not None:
            self.sq_norms.append(prepared.sq_norm)
            if prepared.ghost_bound is not None:
                u = unit_roundoff(prepared.operand_dtype) + prepared.tokens * U32
                self.ghost_bounds.setdefault(u, []).append(prepared.ghost_bound)
        if prepared.accumulate is not None:
            if self.keep is not None:  # nothing left to wait for
                prepared.accumulate(self.keep)
            elif self.ctx.keep_sum:
                self.sums.append(prepared.accumulate)

    def flat_rows(self) -> Tensor | None:
        """fp32 [b, N]: every small per-example gradient of the micro-batch, side by side."""
        if not self.rows:
            return None
        return torch.cat([value.reshape(self.batch, -1) for value in self.rows.values()], 1)

    def add_rows(self, flat: Tensor, factors: ClipFactors, add_sum) -> None:
        """The clipped sums of all small per-example gradients: one matmul."""
        summed = mm_fp32(factors.fp32.view(1, -1), finite_or_zero(flat)).view(-1)
        parts = summed.split([value.shape[1:].numel() for value in self.rows.values()])
        for (module, name), part in zip(self.rows, parts):
            add_sum(module, name, part)


def _total(parts: list[Tensor], batch: int, device: torch.device) -> Tensor:
    return torch.stack(parts).sum(0) if parts else torch.zeros(batch, dtype=FP32, device=device)


class _LayerSums:
    """One layer's view of the engine's clipped sums (privacy.rules.base.Sums)."""

    def __init__(self, engine: "PrivacyEngine", module: nn.Module, device: torch.device):
        self.engine, self.module, self.device = engine, module, device

    def add(self, name: str, value: Tensor) -> None:
        self.engine._add_sum(self.module, name, value)

    def buffer(self, name: str) -> Tensor:
        return self.engine._buffer(self.module, name, self.device)


class _BookkeptCall(torch.autograd.Function):
    """Runs a layer through its rule; the backward returns the input's gradient only.

    The parameters are read here, not passed in, so the graph has no edge to them:
    autograd runs no AccumulateGrad for a parameter, and a sharding backend's
    per-parameter gradient hooks (DeepSpeed ZeRO-2/3 reduce in them) never fire on
    a parameter that gets no gradient. ``anchor`` (a scalar that requires grad) makes
    the output require grad when the input does not (images, token ids).
    """

    row_kind = "rows"  # privacy.graph: each output row is made from the same input row

    @staticmethod
    def forward(ctx, engine: "PrivacyEngine", target: _Target, call: Call, x: Tensor, anchor: Tensor):
        ctx.engine, ctx.target, ctx.call = engine, target, call
        module = target.module
        return target.rule.forward(module, call, x, *(getattr(module, s, None) for s in target.rule.slots))

    @staticmethod
    def backward(ctx, grad: Tensor):
        target, call = ctx.target, ctx.call
        grad_x = target.rule.grad_input(target.module, call, grad) if ctx.needs_input_grad[3] else None
        ctx.engine._on_grad(target, call, grad)
        return None, None, None, grad_x, None


def _refuse_batch_mixing(qualname: str, module: nn.Module) -> None:
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


def _plan(model: nn.Module, rules: dict[RuleKey, Rule]) -> tuple[list[_Target], list[BareOwner]]:
    """One target per layer with a rule; every other module with trainable
    parameters of its own owns bare parameters (privacy/bare.py), unless it is
    one of torch's layers (which has no rule); ValueError for anything not covered."""
    targets, owners, owner_of = [], [], {}
    for qualname, module in model.named_modules():
        _refuse_batch_mixing(qualname, module)
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
        targets.append(_Target(qualname, module, rule, trainable))
    return targets, owners


class _BareHost:
    """The engine as privacy.bare.Host: what bare parameters' copies need from it."""

    def __init__(self, engine: "PrivacyEngine"):
        self.engine = engine
        self.anchor = engine._anchor

    def linear_target(self, weight: Tensor) -> _Target | None:
        return next((t for t in self.engine._targets if isinstance(t.rule, LinearRule)
                     and t.module._parameters.get("weight") is weight), None)

    def call_target(self, target: _Target, x: Tensor) -> Tensor:
        return self.engine._call(target, x)

    def bias_value(self, target: _Target) -> BareTensor:
        return self.engine._bias_value(target)

    def record_use(self, use: Use) -> None:
        self.engine._uses.append(use)

    def on_use_grad(self, use: Use, grad: Tensor) -> None:
        self.engine._on_use_grad(use, grad)


def _new_call(target: _Target) -> Call:
    call = Call()
    target.calls.append(call)
    return call


class _Layer:
    """The engine as privacy.rules.base.Layer, for one target's rule."""

    def __init__(self, engine: "PrivacyEngine", target: _Target):
        self.engine, self.target, self.module = engine, target, target.module
        self.anchor = engine._anchor

    def call(self, x: Tensor) -> Tensor:
        return self.engine._call(self.target, x)

    def new_call(self) -> Call:
        return _new_call(self.target)

    def on_grad(self, call: Call, grad) -> None:
        self.engine._on_grad(self.target, call, grad)


def _qualified(qualname: str, name: str) -> str:
    return f"{qualname}.{name}" if qualname else name


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)


class PrivacyEngine:
    """Per-example clipping to ``max_grad_norm`` and Gaussian noise, for ``model``.

    Use::

        loss = model(batch)              # [b], one loss per example
        engine.backward(loss)            # any number of micro-batches
        stats = engine.finish_step()     # p.grad = (clipped sum + noise) / B
        optimizer.step(); engine.zero_grad()

    ``seed=None`` draws a fresh secret seed from ``os.urandom``; save it with
    :meth:`state_dict` to resume. The noise of step ``k`` comes from a
    generator seeded with (seed, reducer.noise_stream, k, device), so a resumed
    run never reuses noise and ranks with distinct streams are independent.

    ``two_pass=True`` runs the original DP-Cap algorithm instead, on the same
    rules: a backward for the norms, then a backward of ``sum_i c_i loss_i``
    whose (already clipped) weight gradients are summed in each layer's
    backward. For comparison only: it costs a second backward, and its bound
    holds only up to the rounding of that backward (exact in exact arithmetic;
    in bf16 the clipped gradient is rounded through the whole backward).

    ``reuse_memory``: a layer keeps its per-example gradients for the clipped
    sum (instead of its (activation, output gradient) pair) only where they take
    at most this multiple of the pair's bytes; 1.0 never lets the choice raise
    what the engine holds. :attr:`plan` shows each layer's choice.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        seed: int | None = None,
        reducer: GradReducer | None = None,
        *,
        rules: dict[type[nn.Module], Rule] | None = None,
        two_pass: bool = False,
        reuse_memory: float = 1.0,
    ):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0 (the Poisson rate times the dataset size), "
                             f"got {expected_batch_size}")
        if seed is not None and not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if not (reuse_memory >= 0 and math.isfinite(reuse_memory)):
            raise ValueError(f"reuse_memory must be a finite number >= 0, got {reuse_memory}")
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.reducer: GradReducer = reducer if reducer is not None else LocalReducer()
        self.rules = dict(DEFAULT_RULES if rules is None else rules)
        self.two_pass = bool(two_pass)
        self.reuse_memory = float(reuse_memory)
        self._seed = _random_seed() if seed is None else seed
        self._step = 0
        self._targets, self._owners = _plan(model, self.rules)
        self._model_buffers = model.buffers
        self._constant_owners: dict[_Target, BareOwner] = {}  # layers called on a constant input (_is_constant)
        self._bias_owners: dict[_Target, BareOwner] = {}  # Linear biases used in their parents' code (_bias_value)
        # every clipped parameter as (module, attribute name, qualified name)
        self._clipped = [(t.module, name, _qualified(t.qualname, name)) for t in self._targets for name in t.names]
        self._clipped += [(o.module, name, o.label(name)) for o in self._owners for name in o.names]
        # each parameter's full shape, read once here: a sharding backend may later swap a
        # parameter's storage for a part of it (a ZeRO-3 parameter released after use is empty)
        self._shapes = {(module, name): tuple(getattr(module, name).shape) for module, name, _ in self._clipped}
        self._anchor = torch.zeros((), requires_grad=True)  # see _BookkeptCall
        self._host = _BareHost(self)
        self._uses: list[Use] = []  # bare parameters' per-example copies made in this forward
        self._sums: dict[tuple[nn.Module, str], Tensor] = {}
        self._micro: _MicroBatch | None = None
        self.plan: dict[str, LayerPlan] = {}
        self._reset_step_stats()
        self.per_example_norms = torch.empty(0, dtype=FP32)
        self._attached = True
        for target in self._targets:
            target.module.forward = self._wrapped_forward(target)
        for owner in self._owners:
            self._watch(owner)
        logger.info("privacy engine clips %d parameter tensors: %d layers, %d modules' bare parameters",
                    len(self._clipped), len(self._targets), len(self._owners))

    # -- installation -------------------------------------------------------

    def _wrapped_forward(self, target: _Target):
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

    def _call(self, target: _Target, x: Tensor) -> Tensor:
        """One call of a layer, through its rule."""
        if self._is_constant(x):
            return self._constant_output(target, x)
        call = _new_call(target)
        out = _BookkeptCall.apply(self, target, call, x, self._anchor)
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

    def _constant_output(self, target: _Target, x: Tensor) -> BareTensor:
        """The layer on a constant input (:meth:`_is_constant`), as a derived bare value (privacy/bare.py):
        its rule's forward on leaf copies of the parameters, with the graph kept,
        so that where it meets the batch each example's gradient is its copy's row."""
        owner = self._constant_owners.setdefault(
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

    def _bias_value(self, target: _Target) -> BareTensor:
        """A clipped Linear's bias used in its parent's own code (privacy.bare.LinearByWeight):
        a leaf copy, as a derived bare value whose per-example gradients join its rule's
        (:meth:`_MicroBatch.add`)."""
        owner = self._bias_owners.setdefault(target, BareOwner(target.qualname, target.module, ("bias",)))
        leaf = target.module._parameters["bias"].detach().requires_grad_(True)
        setattr(leaf, graph.BARE_LEAF, owner.label("bias"))
        return BareTensor.derived(self._host, owner, leaf, ((owner, "bias", leaf),))

    def _watch(self, owner: BareOwner) -> None:
        """Shadow the owner's bare parameters by BareTensors while it runs with grad
        enabled (in its instance ``__dict__``; its ``_parameters`` stay as they are)."""
        shadowing: list[bool] = []  # per nested call: whether it shadows
        children = {id(child) for child in owner.module.children()}
        linears = [t for t in self._targets if isinstance(t.rule, LinearRule) and id(t.module) in children]
        by_weight = LinearByWeight(self._host, linears) if linears else None

        def before(module: nn.Module, args) -> None:
            shadow = torch.is_grad_enabled() and self._attached
            shadowing.append(shadow)
            if shadow:
                owner.depth += 1
                if owner.depth == 1:
                    owner._constants = None
                    for name in owner.names:
                        module.__dict__[name] = BareTensor.root(self._host, owner, name,
                                                                self._shapes[(module, name)])
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

    def detach(self) -> None:
        """Restore every layer's own forward and drop all engine state."""
        for target in self._targets:
            target.module.__dict__.pop("forward", None)
            target.calls.clear()
        for owner in self._owners:
            for handle in owner.handles:
                handle.remove()
            for name in owner.names:
                owner.module.__dict__.pop(name, None)
            owner.depth = 0
        self._uses.clear()
        self._sums.clear()
        self._attached = False

    @property
    def covered_parameters(self) -> list[str]:
        """Qualified names of the trainable parameters the engine clips (all of them)."""
        return [qualified for _, _, qualified in self._clipped]

    @property
    def bare_parameters(self) -> list[str]:
        """Those of :attr:`covered_parameters` that no layer rule covers: used in
        their module's own forward code and handled by privacy/bare.py."""
        return [o.label(name) for o in self._owners for name in o.names]

    # -- one micro-batch ----------------------------------------------------

    def backward(self, per_example_loss: Tensor, views: int = 1) -> None:
        """Backward one micro-batch and add its clipped per-example gradients.

        ``views=K`` (augmentation multiplicity, De et al. 2022): ``per_example_loss``
        has ``b x K`` rows, rows ``i K .. i K + K - 1`` the losses of example i's K
        augmented views. The example's loss is the mean of its views' losses, so
        its gradient (the mean of its views' gradients) is clipped as one: the
        example still adds at most C, and the statistics count examples. That the
        rows come K per example is the caller's declaration (the loss is where
        the examples are defined); every layer's rows are then taken as K times
        the grouping privacy.graph proves relative to the loss's rows."""
        if not self._attached:
            raise ValueError("this PrivacyEngine was detached; create a new one")
        if per_example_loss.dim() != 1:
            raise ValueError(
                "per_example_loss must have shape [b] (one loss per example, not reduced), "
                f"got {tuple(per_example_loss.shape)}"
            )
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an int >= 1 (augmented views per example), got {views!r}")
        if per_example_loss.shape[0] % views:
            raise ValueError(f"per_example_loss has {per_example_loss.shape[0]} rows, not a multiple of views={views} "
                             "(rows i*views .. i*views + views - 1 are example i's views)")
        device = per_example_loss.device
        check_matmul_precision(device.type)
        self._drop_stale_calls()
        self._refuse_leaks(per_example_loss)
        loss = per_example_loss if views == 1 else per_example_loss.view(-1, views).mean(1)
        batch = loss.shape[0]
        try:
            # an empty micro-batch still runs backward, so that every rank runs the
            # same hooks and collectives, but it has no per-example gradient to clip
            if self.two_pass and batch > 0:
                # the original algorithm's norm pass: ghost norms for every Linear (nothing kept for a sum)
                scale = self._pass(loss, Context(device.type, batch, keep_sum=False, reuse_memory=0.0), views,
                                   retain=True)
                keep = (scale > 0).to(FP32)
                self._pass(loss * scale.to(loss.dtype), Context(device.type, batch, norms=False), views, keep=keep)
            else:
                self._pass(loss, Context(device.type, batch, reuse_memory=self.reuse_memory), views)
            if batch == 0:
                self.per_example_norms = loss.new_zeros(0, dtype=FP32)
        finally:
            self._micro = None
            self._uses.clear()
            for target in self._targets:
                target.calls.clear()

    def _refuse_leaks(self, loss: Tensor) -> None:
        """ValueError if the backward would give a parameter a gradient outside the
        engine (privacy.graph.reached_leaves): it would be neither clipped nor in the norms."""
        leaked = graph.reached_leaves(loss.grad_fn)
        if not leaked:
            return
        names = {id(getattr(module, name)): qualified for module, name, qualified in self._clipped}
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

    def _pass(self, loss: Tensor, ctx: Context, views: int, retain: bool = False,
              keep: Tensor | None = None) -> Tensor | None:
        """One backward of the per-example ``loss`` [b] (each the mean of ``views``
        rows): every layer prepared as its gradient arrives; then (unless this is
        the two-pass mode's second pass) clip factors, and the sums."""
        micro = _MicroBatch(loss.shape[0], loss.device, ctx, views, keep=None if keep is None else ClipFactors(keep))
        self._micro = micro
        for target in self._targets:
            target.done = False
        loss.sum().backward(retain_graph=retain)
        if micro.batch == 0:
            return None
        with _arithmetic(micro.device):
            for target in self._targets:  # layers whose every call did not reach the loss
                if not target.done and any(call.grad is not None for call in target.calls):
                    self._prepare(target)
            constant_targets = {id(owner): target for target, owner in self._constant_owners.items()}
            for (owner, name), per_example in micro.bare.items():
                if id(owner) in constant_targets and constant_targets[id(owner)].done:
                    raise ValueError(f"{owner.label(name)}: its layer is called both on the batch and on a constant "
                                     "input (a buffer of one row) in one forward; the privacy engine handles one or "
                                     "the other")
                prepared = Prepared({name: per_example}, plan=rows_plan({name: per_example}, ctx.device_type))
                micro.add(owner.module, prepared)
                if ctx.norms:
                    self.plan[owner.label(name)] = prepared.plan
            self._micro = None
            flat = micro.flat_rows()
            scale = None
            if ctx.norms:
                scale = self._clip_factors(micro, flat)
            factors = micro.keep or (ClipFactors(scale) if ctx.keep_sum else None)
            if factors is not None:
                for accumulate in micro.sums:
                    accumulate(factors)
                if flat is not None:
                    micro.add_rows(flat, factors, self._add_sum)
        return scale

    def _on_grad(self, target: _Target, call: Call, grad: Tensor) -> None:
        """A wrapped layer's output gradient: once all its calls have theirs, prepare it."""
        call.grad = grad
        micro = self._micro
        if micro is None:  # a backward outside engine.backward: dropped later
            return
        if micro.batch == 0:  # nothing to clip; the backward ran for the ranks' symmetry
            return
        rows = (grad if isinstance(grad, Tensor) else grad[0]).shape[0]
        if rows != micro.loss_rows:
            self._rows_per_example(target.qualname or "model", rows, call.node, micro)
        if all(c.grad is not None for c in target.calls):
            with _arithmetic(micro.device):
                self._prepare(target)

    def _rows_per_example(self, label: str, rows: int, node, micro: _MicroBatch) -> int:
        """k for a layer (or a bare parameter's copy) with ``rows`` = k x ``micro.batch``
        rows in dim 0, where privacy.graph proves they are grouped k / views per loss
        row (the loss's rows being views per example); ValueError otherwise."""
        if micro.batch == 1:  # every row belongs to the one example
            return rows
        loss_rows = micro.loss_rows
        why = f"{rows} is not a multiple of it"
        if rows % loss_rows == 0 and node is not None:
            try:
                return graph.rows_per_example(node, 0, loss_rows) * micro.views
            except graph.Unproven as unproven:
                why = str(unproven)
        examples = f"{micro.batch} examples" if micro.views == 1 else \
            f"{loss_rows} rows ({micro.views} views of each of {micro.batch} examples)"
        raise ValueError(
            f"{label}: its output has {rows} rows in dim 0 but the loss has {examples}, and {why}; the "
            "privacy engine needs each layer to keep one example per row of dim 0, or consecutive rows per example "
            "where it can prove that from the operators in between (reshapes and permutes of windows, as Swin's)"
        )

    def _on_use_grad(self, use: Use, grad: Tensor) -> None:
        """A bare parameter's copy got its gradient [rows, ...]: the parameters'
        per-example gradients, now (see privacy/bare.py)."""
        micro = self._micro
        if micro is None or micro.batch == 0:  # a backward outside engine.backward, or nothing to clip
            return
        rows = grad.shape[0]
        if rows != micro.loss_rows:
            node, _ = use.output or (None, 0)
            self._rows_per_example(use.label(), rows, node, micro)
        with _arithmetic(micro.device):
            per_row = grad.reshape(rows, *use.value.shape)
            for owner, name, per_example in use.per_example(sum_rows(per_row, micro.batch)):
                micro.add_bare(owner, name, per_example)

    def _prepare(self, target: _Target) -> None:
        micro = self._micro
        calls = [call for call in target.calls if call.grad is not None]
        prepared = target.rule.prepare(target.module, target.names, calls, micro.ctx,
                                       _LayerSums(self, target.module, micro.device))
        target.done = True
        micro.add(target.module, prepared)
        if micro.ctx.norms:
            self._record_plan(target, prepared)
        for call in target.calls:  # what the rule did not keep is freed now
            call.grad = None
            if micro.ctx.keep_sum:
                call.saved = None

    def _record_plan(self, target: _Target, prepared: Prepared) -> None:
        plan = prepared.plan
        if plan is None:
            return
        before = self.plan.get(target.qualname)
        if before is None or before.kind != plan.kind:
            logger.debug("%s: %s, predicted extra %.3g GFLOP, %.3g MB written, %.3g MB held, %.3g ms (%s)",
                         target.qualname or "model", plan.kind, plan.extra_flops / 1e9, plan.extra_bytes / 1e6,
                         plan.held_bytes / 1e6, plan.seconds * 1e3,
                         ", ".join(f"{k} {s * 1e3:.3g} ms" for k, s in plan.alternatives) or "no choice")
        self.plan[target.qualname] = plan

    def _clip_factors(self, micro: _MicroBatch, flat: Tensor | None) -> Tensor:
        """Clip factors (0 for dropped examples), all on the device; the bound's
        margins are described in the module docstring."""
        b, device = micro.batch, micro.device
        parts = micro.sq_norms + ([flat.square().sum(1)] if flat is not None else [])
        sq = _total(parts, b, device).clamp_min(0.0)  # a ghost norm of cancelling tokens may round below 0
        slack, error_sq = sq, sq * U32**2
        for u, bounds in micro.ghost_bounds.items():
            sq_bounds = _total([bound.square() for bound in bounds], b, device) if len(bounds) < 2 else \
                torch.stack(bounds).square().sum(0)
            slack = slack + sq_bounds
            error_sq = error_sq + sq_bounds * (u * BOUND_SLACK) ** 2
        upper = (sq + NORM_SLACK * slack).sqrt() + error_sq.sqrt() + STABILITY
        scale = torch.where(torch.isfinite(upper), (self.max_grad_norm / upper).clamp(max=1.0), 0.0)
        norms = sq.sqrt()
        self.per_example_norms = norms
        self._norm_parts.append(norms)
        self._scale_parts.append(scale)
        return scale

    def _drop_stale_calls(self) -> None:
        """Forget layer calls that a backward outside the engine already reached,
        so a stray ``loss.backward()`` never leaks into the clipped sum."""
        stale = 0
        for target in self._targets:
            kept = [call for call in target.calls if call.grad is None]
            stale += len(target.calls) - len(kept)
            target.calls[:] = kept
        if stale:
            logger.warning("%d layer calls had a gradient from a backward outside engine.backward "
                           "(e.g. loss.backward()); it was discarded, use engine.backward(per_example_loss)", stale)

    def _buffer(self, module: nn.Module, name: str, device: torch.device) -> Tensor:
        key = (module, name)
        if key not in self._sums:
            self._sums[key] = torch.zeros(self._shapes[key], dtype=FP32, device=device)
        return self._sums[key]

    def _add_sum(self, module: nn.Module, name: str, value: Tensor) -> None:
        """The step's first sum of a parameter is kept as it is (no zeros, no add)."""
        key = (module, name)
        summed = self._sums.get(key)
        if summed is None:
            self._sums[key] = value.view(self._shapes[key])
        else:
            summed.add_(value.view_as(summed))

    # -- the logical step ---------------------------------------------------

    @torch.no_grad()
    def finish_step(self) -> dict[str, float]:
        """Reduce, add noise once, divide by the expected batch, assign ``p.grad``."""
        if not self._attached:
            raise ValueError("this PrivacyEngine was detached; create a new one")
        generators: dict[torch.device, torch.Generator] = {}
        std = self.noise_multiplier * self.max_grad_norm
        for module, name, _ in self._clipped:
            param = getattr(module, name)
            summed = self._sums.pop((module, name), None)
            if summed is None:  # no example this step used the layer
                summed = torch.zeros(self._shapes[(module, name)], dtype=FP32, device=param.device)
            local = self.reducer.reduce(param, summed)
            if std > 0:
                generator = generators.get(local.device) or self._generator(local.device, len(generators))
                generators[local.device] = generator
                noise = torch.randn(local.shape, generator=generator, dtype=FP32, device=local.device)
                local = torch.add(local, noise, alpha=std).div_(self.expected_batch_size)
            else:
                local = local / self.expected_batch_size
            self.reducer.assign(param, local)
        self._step += 1
        stats = self._step_stats()
        self._reset_step_stats()
        return stats

    def _generator(self, device: torch.device, index: int) -> torch.Generator:
        words = [self._seed, self.reducer.noise_stream, self._step, index]
        seed = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) & (2**63 - 1)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    def _reset_step_stats(self) -> None:
        self._norm_parts: list[Tensor] = []
        self._scale_parts: list[Tensor] = []

    def _step_stats(self) -> dict[str, float]:
        """Statistics of the step's per-example norms, read from the device once."""
        stats = {"step": self._step, "examples": sum(n.numel() for n in self._norm_parts)}
        if stats["examples"] == 0:
            return stats | {"skipped_nonfinite": 0, "clip_fraction": 0.0}
        norms, scale = torch.cat(self._norm_parts), torch.cat(self._scale_parts)
        kept = scale > 0
        count = kept.sum()
        ordered = torch.where(kept, norms, torch.inf).sort().values
        quantiles = torch.tensor([0.1, 0.5, 0.9, 1.0], device=norms.device)
        picks = ordered.index_select(0, (quantiles * (count - 1).clamp(min=0)).round().long())
        values = torch.cat([
            torch.stack([count.float(), ((scale < 1) & kept).sum().float(), torch.where(kept, norms, 0.0).sum()]),
            picks,
        ]).tolist()  # the one read per step
        finite, clipped, total = values[:3]
        stats["skipped_nonfinite"] = stats["examples"] - int(finite)
        if finite == 0:
            return stats | {"clip_fraction": 0.0}
        keys = ("norm_p10", "norm_p50", "norm_p90", "norm_max")
        return stats | {"clip_fraction": clipped / finite, "norm_mean": total / finite} | dict(zip(keys, values[3:]))

    def zero_grad(self) -> None:
        """Set ``p.grad = None`` for every clipped parameter."""
        for module, name, _ in self._clipped:
            getattr(module, name).grad = None

    # -- checkpointing ------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Step count and secret noise seed (keep checkpoints private)."""
        return {"step": self._step, "seed": self._seed, "noise_stream": self.reducer.noise_stream}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._sums:
            raise ValueError("load_state_dict in the middle of a logical step; call it before any backward")
        missing = {"step", "seed"} - set(state)
        if missing:
            raise ValueError(f"engine state is missing {sorted(missing)}")
        self._step, self._seed = int(state["step"]), int(state["seed"])
        if state.get("noise_stream", self.reducer.noise_stream) != self.reducer.noise_stream:
            logger.info("noise stream changed on resume (%s -> %s)", state["noise_stream"], self.reducer.noise_stream)

    @property
    def step(self) -> int:
        """Number of finished logical steps."""
        return self._step
