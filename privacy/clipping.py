"""The engine's second stage: one micro-batch's per-example norms, clip factors
and clipped sums, inside and right after its backward.

:class:`Clipping` is where the installed layers' gradients go
(``privacy.install.GradSink``). As soon as a layer's output gradient arrives,
still inside the backward, its rule computes the layer's per-example norms
and keeps only what the clipped sum needs (the pair (activation, output
gradient) for a matmul, or the per-example gradient itself where that is
small: see ``privacy/rules/linear.py`` for the cost model); Gram matrices and
layer-norm inputs are freed at once. :class:`MicroBatch` gathers the layers'
shares: few operators per layer (a GPU pays a launch for each), the sums
over layers and the small per-example gradients of every layer in one go.
After the backward the clip factors are known (:func:`clip_factors`, with
the bound's proof) and each layer adds ``sum_i c_i g_i`` to the step's fp32
sums (``privacy.step.StepSums``). No step of a micro-batch waits for the
device: dropped (non-finite) examples are handled on the device (see
``privacy/rules/base.py``), and the statistics (:class:`ClipStatistics`) are
read once per logical step.

A layer's rows are ``k x b`` for ``b`` examples: k = 1 for most, the views of
an example where the loss has several rows per example (augmentation
multiplicity), times the grouping of rows per loss row that
:func:`privacy.graph.rows_per_example` proves (Swin's windows).
"""

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from privacy import graph
from privacy.bare import BareOwner, Use
from privacy.install import Installation, Target
from privacy.rules import Call
from privacy.rules.base import (
    FP32,
    ClipFactors,
    Context,
    LayerPlan,
    Prepared,
    finite_or_zero,
    mm_fp32,
    sum_rows,
    unit_roundoff,
)
from privacy.rules.linear import rows_plan
from privacy.step import StepSums

# a child of the engine's logger: one switch for the engine's log (the audit quiets privacy.engine)
logger = logging.getLogger("privacy.engine.clipping")

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
def arithmetic(device: torch.device) -> Iterator[None]:
    """The engine's own arithmetic: no graph (saved inputs may require grad) and
    no autocast (a backward called inside autocast would run the fp32 Grams and
    sums in bf16)."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


@dataclass(eq=False)
class MicroBatch:
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


def clip_factors(max_grad_norm: float, sq_norms: list[Tensor], ghost_bounds: dict[float, list[Tensor]],
                 batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 [b] clip factors (0 for dropped examples) and the per-example norms,
    from the layers' squared norms (``sq_norms``, each [b]) and the ghost
    layers' ``B_iL`` by rounding unit (``ghost_bounds``), all on the device.

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
    the two-pass mode's second backward (see ``PrivacyEngine``'s ``two_pass``).
    TF32 would round fp32 matmul operands to 11 bits: the engine refuses to run
    with it (:func:`check_matmul_precision`).
    """
    sq = _total(sq_norms, batch, device).clamp_min(0.0)  # a ghost norm of cancelling tokens may round below 0
    slack, error_sq = sq, sq * U32**2
    for u, bounds in ghost_bounds.items():
        sq_bounds = _total([bound.square() for bound in bounds], batch, device) if len(bounds) < 2 else \
            torch.stack(bounds).square().sum(0)
        slack = slack + sq_bounds
        error_sq = error_sq + sq_bounds * (u * BOUND_SLACK) ** 2
    upper = (sq + NORM_SLACK * slack).sqrt() + error_sq.sqrt() + STABILITY
    scale = torch.where(torch.isfinite(upper), (max_grad_norm / upper).clamp(max=1.0), 0.0)
    return scale, sq.sqrt()


class ClipStatistics:
    """A logical step's per-example norms and clip factors, kept on the device
    and read once (:meth:`pop`)."""

    def __init__(self):
        self._norm_parts: list[Tensor] = []
        self._scale_parts: list[Tensor] = []

    def record(self, norms: Tensor, scale: Tensor) -> None:
        self._norm_parts.append(norms)
        self._scale_parts.append(scale)

    def pop(self, step: int) -> dict[str, float]:
        """The step's statistics (examples, not views: one norm each), then forget them."""
        stats = self._read(step)
        self._norm_parts, self._scale_parts = [], []
        return stats

    def _read(self, step: int) -> dict[str, float]:
        stats = {"step": step, "examples": sum(n.numel() for n in self._norm_parts)}
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


class Clipping:
    """Per-example clipping of the micro-batches of one installation: the
    layers' gradients as they arrive (``privacy.install.GradSink``), then clip
    factors and clipped sums into ``sums``. ``plan``: qualified layer name ->
    the cost model's choice for the last micro-batch."""

    def __init__(self, installation: Installation, sums: StepSums, max_grad_norm: float):
        self.installation, self.sums, self.max_grad_norm = installation, sums, max_grad_norm
        self.plan: dict[str, LayerPlan] = {}
        self.stats = ClipStatistics()
        self.per_example_norms = torch.empty(0, dtype=FP32)
        self.micro: MicroBatch | None = None

    def run(self, loss: Tensor, ctx: Context, views: int, retain: bool = False,
            keep: Tensor | None = None) -> Tensor | None:
        """One backward of the per-example ``loss`` [b] (each the mean of ``views``
        rows): every layer prepared as its gradient arrives; then (unless this is
        the two-pass mode's second pass) clip factors, and the sums."""
        micro = MicroBatch(loss.shape[0], loss.device, ctx, views, keep=None if keep is None else ClipFactors(keep))
        self.micro = micro
        try:
            for target in self.installation.targets:
                target.done = False
            loss.sum().backward(retain_graph=retain)
            if micro.batch == 0:  # the backward ran for the ranks' symmetry
                self.per_example_norms = loss.new_zeros(0, dtype=FP32)
                return None
            with arithmetic(micro.device):
                self._prepare_the_rest(micro)
        finally:
            self.micro = None
        with arithmetic(micro.device):
            flat = micro.flat_rows()
            scale = None
            if ctx.norms:
                parts = micro.sq_norms + ([flat.square().sum(1)] if flat is not None else [])
                scale, norms = clip_factors(self.max_grad_norm, parts, micro.ghost_bounds, micro.batch, micro.device)
                self.per_example_norms = norms
                self.stats.record(norms, scale)
            factors = micro.keep or (ClipFactors(scale) if ctx.keep_sum else None)
            if factors is not None:
                for accumulate in micro.sums:
                    accumulate(factors)
                if flat is not None:
                    micro.add_rows(flat, factors, self.sums.add)
        return scale

    def _prepare_the_rest(self, micro: MicroBatch) -> None:
        """After the backward: layers whose every call did not reach the loss, and
        the bare parameters' per-example gradients, into ``micro``."""
        for target in self.installation.targets:
            if not target.done and any(call.grad is not None for call in target.calls):
                self._prepare(target)
        constant_targets = {id(owner): target for target, owner in self.installation.constant_owners.items()}
        for (owner, name), per_example in micro.bare.items():
            if id(owner) in constant_targets and constant_targets[id(owner)].done:
                raise ValueError(f"{owner.label(name)}: its layer is called both on the batch and on a constant "
                                 "input (a buffer of one row) in one forward; the privacy engine handles one or "
                                 "the other")
            prepared = Prepared({name: per_example}, plan=rows_plan({name: per_example}, micro.ctx.device_type))
            micro.add(owner.module, prepared)
            if micro.ctx.norms:
                self.plan[owner.label(name)] = prepared.plan

    def on_grad(self, target: Target, call: Call, grad: Tensor) -> None:
        """A wrapped layer's output gradient: once all its calls have theirs, prepare it."""
        call.grad = grad
        micro = self.micro
        if micro is None:  # a backward outside engine.backward: dropped later
            return
        if micro.batch == 0:  # nothing to clip; the backward ran for the ranks' symmetry
            return
        rows = (grad if isinstance(grad, Tensor) else grad[0]).shape[0]
        if rows != micro.loss_rows:
            self._rows_per_example(target.qualname or "model", rows, call.node, micro)
        if all(c.grad is not None for c in target.calls):
            with arithmetic(micro.device):
                self._prepare(target)

    def _rows_per_example(self, label: str, rows: int, node, micro: MicroBatch) -> int:
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

    def on_use_grad(self, use: Use, grad: Tensor) -> None:
        """A bare parameter's copy got its gradient [rows, ...]: the parameters'
        per-example gradients, now (see privacy/bare.py)."""
        micro = self.micro
        if micro is None or micro.batch == 0:  # a backward outside engine.backward, or nothing to clip
            return
        rows = grad.shape[0]
        if rows != micro.loss_rows:
            node, _ = use.output or (None, 0)
            self._rows_per_example(use.label(), rows, node, micro)
        with arithmetic(micro.device):
            per_row = grad.reshape(rows, *use.value.shape)
            for owner, name, per_example in use.per_example(sum_rows(per_row, micro.batch)):
                micro.add_bare(owner, name, per_example)

    def _prepare(self, target: Target) -> None:
        micro = self.micro
        calls = [call for call in target.calls if call.grad is not None]
        prepared = target.rule.prepare(target.module, target.names, calls, micro.ctx,
                                       self.sums.layer(target.module, micro.device))
        target.done = True
        micro.add(target.module, prepared)
        if micro.ctx.norms:
            self._record_plan(target, prepared)
        for call in target.calls:  # what the rule did not keep is freed now
            call.grad = None
            if micro.ctx.keep_sum:
                call.saved = None

    def _record_plan(self, target: Target, prepared: Prepared) -> None:
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
