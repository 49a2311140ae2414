"""The privacy plan of a job: sigma, q, steps, delta, the epsilon budget.

Resolves target-epsilon mode (sigma calibrated) and TAN mode (train at B'
with sigma' = sigma * B' / B_ref), composes the accountant history (a list of
``(sigma, q, steps)`` segments, one per resume with changed settings) and
formats the ``--dry-run`` report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privacy import accounting

from trainer.common.config import JobConfig, delta_of, learning_rate, reference_batch
from trainer.job.backend import backend_class
from trainer.job.geometry import Geometry


@dataclass(kw_only=True)
class PrivacyPlan:
    enabled: bool
    sigma: float  # noise multiplier this run trains with
    reference_sigma: float  # sigma of the reference run (TAN), else == sigma
    q: float  # sample rate of this run: B / N
    steps: int
    delta: float
    max_grad_norm: float
    target_epsilon: float | None
    accountant: str

    def segment(self, steps: int) -> accounting.Segment:
        return (self.sigma, self.q, steps)


def resolve(cfg: JobConfig, geo: Geometry) -> PrivacyPlan:
    p = cfg.privacy
    n = cfg.data.num_examples
    q = geo.batch_size / n
    delta = delta_of(cfg)
    if not p.enabled:
        return PrivacyPlan(enabled=False, sigma=0.0, reference_sigma=0.0, q=q, steps=cfg.steps,
                           delta=delta, max_grad_norm=math.inf, target_epsilon=None,
                           accountant=p.accountant)
    b_ref = reference_batch(cfg)
    if p.noise_multiplier is None:
        sigma_ref = accounting.calibrate_noise(p.target_epsilon, delta, b_ref / n, cfg.steps,
                                               method=p.accountant)
    else:
        sigma_ref = p.noise_multiplier
    sigma = accounting.tan_noise_multiplier(sigma_ref, geo.batch_size, b_ref) if b_ref != geo.batch_size else sigma_ref
    return PrivacyPlan(enabled=True, sigma=sigma, reference_sigma=sigma_ref, q=q, steps=cfg.steps,
                       delta=delta, max_grad_norm=p.max_grad_norm,
                       target_epsilon=None if p.tan_reference_batch else p.target_epsilon,
                       accountant=p.accountant)


def budget_steps(history: list[accounting.Segment], plan: PrivacyPlan, limit: int) -> int:
    """The most steps (<= limit) this run may take without exceeding the target epsilon."""
    if plan.target_epsilon is None:
        return limit

    def ok(k: int) -> bool:
        return accounting.epsilon_of_segments(history + [plan.segment(k)], plan.delta, plan.accountant) \
            <= plan.target_epsilon * (1 + 1e-9)

    if ok(limit):
        return limit
    lo, hi = 0, limit  # ok(lo) or lo == 0, not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# delta = 1/N above this (N below 100,000) gets a note in the plan
WEAK_DELTA = 1e-5


def weak_delta_note(cfg: JobConfig, plan: PrivacyPlan) -> list[str]:
    """Lines saying that the default delta = 1/N is weak for this small N, and what a
    smaller delta costs at this sigma."""
    n = cfg.data.num_examples
    if cfg.privacy.delta is not None or plan.delta <= WEAK_DELTA:
        return []
    smaller = 10.0 ** math.floor(math.log10(0.1 / n))
    seg = [plan.segment(cfg.steps)]
    return [f"  note: delta = 1/N = {plan.delta:.3g} is weak for N = {n:,}: a mechanism that publishes one "
            f"training example in full is (0, 1/N)-DP; prefer a delta well below 1/N, e.g. "
            f"privacy.delta={smaller:g}: epsilon {accounting.epsilon_of_segments(seg, smaller, 'rdp'):.4g} "
            f"(RDP) / {accounting.epsilon_of_segments(seg, smaller, 'pld'):.4g} (PLD) after "
            f"{cfg.steps:,} steps at this sigma"]


def format_plan(cfg: JobConfig, geo: Geometry, plan: PrivacyPlan) -> str:
    """The --dry-run report: batch geometry, noise, epsilon along the way, TAN options."""
    b, w, m = geo.batch_size, geo.world_size, geo.micro_batch
    per_rank = b / w
    spread = 3 * math.sqrt(b * (1 - plan.q)) / w  # Poisson: +-3 std of the realised batch, per rank
    lines = [
        f"job {cfg.name}: model {cfg.model.name} {cfg.model.overrides or ''}",
        f"data: N = {cfg.data.num_examples:,} examples ({cfg.data.source})",
        "batch geometry (Poisson sampling: realised sizes vary):",
        f"  expected logical batch B = {b:,}  (q = B/N = {plan.q:.6g})",
        f"  world size {w}: {per_rank:,.1f} examples per rank per step "
        f"(+-{spread:,.1f} at 3 std)",
        f"  micro-batch <= {m} per rank: {geo.accumulation} accumulation steps expected, "
        f"up to {math.ceil((per_rank + spread) / m)} at +3 std",
        f"  parameters in {'bf16 (GPU), fp32 reduction' if geo.bf16 else 'fp32'}",
        f"backend {cfg.backend}: {backend_class(cfg.backend).describe(cfg)}",
        f"steps {cfg.steps:,}; lr {learning_rate(cfg):.4g} (warmup {cfg.optim.warmup_steps}, "
        f"cosine horizon {cfg.optim.decay_steps or cfg.steps})",
    ]
    if not plan.enabled:
        lines.append("privacy: DISABLED (no differential privacy guarantee)")
        return "\n".join(lines)
    lines += [
        f"privacy: sigma = {plan.sigma:.6g}, C = {plan.max_grad_norm:g}, delta = {plan.delta:.3g}; "
        f"noise std per coordinate of the gradient sigma*C/B = {plan.sigma * plan.max_grad_norm / b:.3g}",
    ]
    lines += weak_delta_note(cfg, plan)
    if cfg.privacy.noise_multiplier is None:
        lines.append(f"  sigma calibrated for target epsilon {cfg.privacy.target_epsilon} "
                     f"({plan.accountant.upper()})")
    b_ref = reference_batch(cfg)
    if b_ref != b:
        lines.append(f"  TAN simulation of B_ref = {b_ref:,} with sigma_ref = {plan.reference_sigma:.6g}: "
                     f"same sigma/B, lr from B_ref; the epsilon below is this run's own")
    lines.append("epsilon (RDP / PLD):")
    for frac in (0.25, 0.5, 0.75, 1.0):
        k = max(1, round(cfg.steps * frac))
        seg = [plan.segment(k)]
        lines.append(f"  after {k:>7,} steps ({frac:4.0%}): "
                     f"{accounting.epsilon_of_segments(seg, plan.delta, 'rdp'):8.4f} / "
                     f"{accounting.epsilon_of_segments(seg, plan.delta, 'pld'):8.4f}")
    if plan.target_epsilon is not None:
        allowed = budget_steps([], plan, cfg.steps)
        if allowed < cfg.steps:
            lines.append(f"  GUARD: target epsilon {plan.target_epsilon} is reached after "
                         f"{allowed:,} steps; training stops there")
    if b_ref == b:
        lines.append("TAN-equivalent cheaper runs (same sigma/B; predict this run's utility, "
                     "not its privacy):")
        for div in (8, 64, 512):
            b2 = b // div
            if b2 < 1:
                break
            s2 = accounting.tan_noise_multiplier(plan.sigma, b2, b)
            lines.append(f"  B/{div:<4}= {b2:>9,}: sigma' = {s2:.4g}, its own epsilon "
                         f"{accounting.epsilon_of_segments([(s2, b2 / cfg.data.num_examples, cfg.steps)], plan.delta, 'rdp'):.4g} "
                         f"(RDP); ds.train_batch_size={b2} privacy.tan_reference_batch={b}")
    return "\n".join(lines)
