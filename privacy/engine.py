"""PrivacyEngine: DP-SGD gradients with exact per-example clipping, one backward.

Book-keeping clipping (see ../shared/SPEC.md section 3). At construction the
engine finds a rule for every layer that owns trainable parameters and swaps
that layer's ``forward`` for a custom autograd Function which keeps the input
activation, catches the output gradient, and returns a gradient for the input
only, so autograd never forms the (unclipped) weight gradient. After the one
backward of a micro-batch the engine knows every layer's (activation, output
gradient), computes per-example norms over all parameters, and adds each
layer's clipped sum ``sum_i c_i g_i`` (one matmul) to its own fp32 buffers.
``finish_step`` reduces, noises once, scales by 1/B and assigns ``p.grad``.

Parameters are addressed as (module, attribute name) and read again when
needed, so FSDP2's swapping between sharded and unsharded parameters is
transparent. The noise seed is secret: whoever knows it can remove the noise.

Limits: activation checkpointing stays exact but saves no memory (the engine
keeps each layer's input from the first forward until the step's norms are
known); torch.compile breaks the graph at every wrapped layer; with TF32
matmuls enabled, norms and clipped sums of fp32 layers are TF32-rounded, so a
clipped gradient may exceed C by about 1e-3 relative: keep TF32 off.
"""

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from privacy.reducer import GradReducer, LocalReducer
from privacy.rules import DEFAULT_RULES, Call, Rule, find_rule

logger = logging.getLogger(__name__)

FP32 = torch.float32
STABILITY = 1e-6  # c_i = min(1, C / (||g_i|| + STABILITY))


@dataclass(eq=False)
class _Target:
    """A layer whose trainable parameters the engine clips."""

    qualname: str
    module: nn.Module
    rule: Rule
    names: tuple[str, ...]  # trainable parameter attributes, all covered by the rule
    # each parameter's full shape, read once here: a sharding backend may later swap a
    # parameter's storage for a part of it (a ZeRO-3 parameter released after use is empty)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)


class _BookkeptCall(torch.autograd.Function):
    """Runs a layer through its rule; the backward returns the input's gradient only.

    The parameters are read here, not passed in, so the graph has no edge to them:
    autograd runs no AccumulateGrad for a parameter, and a sharding backend's
    per-parameter gradient hooks (DeepSpeed ZeRO-2/3 reduce in them) never fire on
    a parameter that gets no gradient. ``anchor`` (a scalar that requires grad) makes
    the output require grad when the input does not (images, token ids).
    """

    @staticmethod
    def forward(ctx, target: _Target, call: Call, x: Tensor, anchor: Tensor) -> Tensor:
        ctx.target, ctx.call = target, call
        module = target.module
        return target.rule.forward(module, call, x, *(getattr(module, s, None) for s in target.rule.slots))

    @staticmethod
    def backward(ctx, grad: Tensor):
        target, call = ctx.target, ctx.call
        call.grad = grad
        grad_x = target.rule.grad_input(target.module, call, grad) if ctx.needs_input_grad[2] else None
        return None, None, grad_x, None


def _refuse_batch_mixing(qualname: str, module: nn.Module) -> None:
    if isinstance(module, _BatchNorm):
        raise ValueError(
            f"{qualname or 'model'} ({type(module).__name__}) mixes examples of a batch, which breaks "
            "per-example privacy; replace it with LayerNorm or GroupNorm-free layers"
        )
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        raise ValueError(
            f"{qualname or 'model'} ({type(module).__name__}) keeps running statistics over examples; "
            "use track_running_stats=False"
        )


def _plan(model: nn.Module, rules: dict[type[nn.Module], Rule]) -> list[_Target]:
    """One target per layer with trainable parameters; ValueError for anything not covered."""
    targets, owner_of = [], {}
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
            raise ValueError(
                f"{label} has trainable parameters {list(trainable)} but the privacy engine has no rule for "
                f"{type(module).__name__}; freeze them, or build the layer from supported ones "
                f"({', '.join(cls.__name__ for cls in rules)}; bare tensors via privacy.layers.AddedParameter)"
            )
        cls, rule = found
        if type(module).forward is not cls.forward:
            raise ValueError(
                f"{label} subclasses {cls.__name__} but overrides forward, so the {cls.__name__} rule would not "
                f"compute what it does; register a rule for {type(module).__name__}"
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
        shapes = {name: tuple(getattr(module, name).shape) for name in trainable}
        targets.append(_Target(qualname, module, rule, trainable, shapes))
    return targets


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
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.reducer: GradReducer = reducer if reducer is not None else LocalReducer()
        self.rules = dict(DEFAULT_RULES if rules is None else rules)
        self._seed = _random_seed() if seed is None else seed
        self._step = 0
        self._targets = _plan(model, self.rules)
        self._anchor = torch.zeros((), requires_grad=True)  # see _BookkeptCall
        self._sums: dict[tuple[nn.Module, str], Tensor] = {}
        self._reset_step_stats()
        self.per_example_norms = torch.empty(0, dtype=FP32)
        self._attached = True
        for target in self._targets:
            target.module.forward = self._wrapped_forward(target)
        logger.info("privacy engine clips %d parameter tensors in %d layers",
                    len(self.covered_parameters), len(self._targets))

    # -- installation -------------------------------------------------------

    def _wrapped_forward(self, target: _Target):
        original = type(target.module).forward

        def forward(x: Tensor) -> Tensor:
            module = target.module
            if not torch.is_grad_enabled():
                return original(module, x)
            call = Call()
            target.calls.append(call)
            return _BookkeptCall.apply(target, call, x, self._anchor)

        return forward

    def detach(self) -> None:
        """Restore every layer's own forward and drop all engine state."""
        for target in self._targets:
            target.module.__dict__.pop("forward", None)
            target.calls.clear()
        self._sums.clear()
        self._attached = False

    @property
    def covered_parameters(self) -> list[str]:
        """Qualified names of the trainable parameters the engine clips (all of them)."""
        return [f"{t.qualname}.{n}" if t.qualname else n for t in self._targets for n in t.names]

    # -- one micro-batch ----------------------------------------------------

    def backward(self, per_example_loss: Tensor) -> None:
        """Backward one micro-batch and add its clipped per-example gradients."""
        if not self._attached:
            raise ValueError("this PrivacyEngine was detached; create a new one")
        if per_example_loss.dim() != 1:
            raise ValueError(
                "per_example_loss must have shape [b] (one loss per example, not reduced), "
                f"got {tuple(per_example_loss.shape)}"
            )
        self._drop_stale_calls()
        try:
            # an empty micro-batch still runs backward, so that every rank runs the
            # same hooks and collectives, but it has no per-example gradient to clip
            per_example_loss.sum().backward()
            if per_example_loss.shape[0] == 0:
                self.per_example_norms = per_example_loss.new_zeros(0, dtype=FP32)
            else:
                self._clip_and_accumulate(per_example_loss.shape[0], per_example_loss.device)
        finally:
            for target in self._targets:
                target.calls.clear()

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

    @torch.no_grad()  # saved inputs may require grad: the arithmetic must not build a graph
    def _clip_and_accumulate(self, batch: int, device: torch.device) -> None:
        active, sq_norms = [], torch.zeros(batch, dtype=FP32, device=device)
        for target in self._targets:
            calls = [call for call in target.calls if call.grad is not None]
            if not calls:
                continue  # unused in this forward: contributes zero
            for call in calls:
                if call.grad.shape[0] != batch:
                    raise ValueError(
                        f"{target.qualname}: its output has {call.grad.shape[0]} rows in dim 0 but the loss has "
                        f"{batch} examples; every layer must keep the example in dim 0"
                    )
            scratch: dict = {}
            sq_norms += target.rule.sq_norms(target.module, target.names, calls, scratch)
            active.append((target, calls, scratch))
        norms = sq_norms.sqrt()
        finite = torch.isfinite(norms)
        scale = torch.where(finite, (self.max_grad_norm / (norms + STABILITY)).clamp(max=1.0), 0.0)
        dropped = int((~finite).sum())
        for target, calls, scratch in active:
            target.rule.accumulate(
                target.module, target.names, calls, scratch, scale, dropped > 0,
                lambda name, target=target: self._buffer(target, name, device),
            )
        self.per_example_norms = norms
        self._norm_parts.append(norms)
        self._dropped += dropped

    def _buffer(self, target: _Target, name: str, device: torch.device) -> Tensor:
        key = (target.module, name)
        if key not in self._sums:
            self._sums[key] = torch.zeros(target.shapes[name], dtype=FP32, device=device)
        return self._sums[key]

    # -- the logical step ---------------------------------------------------

    @torch.no_grad()
    def finish_step(self) -> dict[str, float]:
        """Reduce, add noise once, divide by the expected batch, assign ``p.grad``."""
        if not self._attached:
            raise ValueError("this PrivacyEngine was detached; create a new one")
        generators: dict[torch.device, torch.Generator] = {}
        std = self.noise_multiplier * self.max_grad_norm
        for target in self._targets:
            for name in target.names:
                param = getattr(target.module, name)
                summed = self._sums.pop((target.module, name), None)
                if summed is None:  # no example this step used the layer
                    summed = torch.zeros(target.shapes[name], dtype=FP32, device=param.device)
                local = self.reducer.reduce(param, summed)
                if std > 0:
                    generator = generators.get(local.device) or self._generator(local.device, len(generators))
                    generators[local.device] = generator
                    local = local + std * torch.randn(
                        local.shape, generator=generator, dtype=FP32, device=local.device
                    )
                self.reducer.assign(param, local / self.expected_batch_size)
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
        self._dropped = 0

    def _step_stats(self) -> dict[str, float]:
        norms = torch.cat(self._norm_parts) if self._norm_parts else torch.empty(0)
        finite = norms[torch.isfinite(norms)].sort().values
        stats = {"step": self._step, "examples": int(norms.numel()), "skipped_nonfinite": self._dropped}
        if finite.numel() == 0:
            return stats | {"clip_fraction": 0.0}
        last = finite.numel() - 1
        picks = torch.stack([
            (finite > self.max_grad_norm).float().mean(), finite.mean(),
            finite[round(0.1 * last)], finite[round(0.5 * last)], finite[round(0.9 * last)], finite[last],
        ]).tolist()
        keys = ("clip_fraction", "norm_mean", "norm_p10", "norm_p50", "norm_p90", "norm_max")
        return stats | dict(zip(keys, picks))

    def zero_grad(self) -> None:
        """Set ``p.grad = None`` for every clipped parameter."""
        for target in self._targets:
            for name in target.names:
                getattr(target.module, name).grad = None

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
