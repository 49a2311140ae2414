"""The privacy ledger: what this run has spent, and where the budget stops it.

One ``(sigma, q, steps)`` segment per privacy setting the run trained with (a
resume with changed settings opens a new one, only when
``privacy.allow_privacy_change`` says to compose them); epsilon by either
accountant is a function of the segments alone, so every report (log,
TensorBoard, summary, checkpoint) asks the ledger. The guard: with a target
epsilon, the run stops at the last step whose epsilon stays within it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from privacy import accounting

from trainer.job import privacy_plan
from trainer.job.privacy_plan import PrivacyPlan

logger = logging.getLogger(__name__)


class PrivacyLedger:
    def __init__(self, plan: PrivacyPlan, allow_privacy_change: bool):
        self.plan = plan
        self.allow_privacy_change = allow_privacy_change
        self.segments: list[accounting.Segment] = [plan.segment(0)]

    @property
    def enabled(self) -> bool:
        return self.plan.enabled

    def record_step(self) -> None:
        """One more step at the current setting."""
        if self.enabled:
            sigma, q, k = self.segments[-1]
            self.segments[-1] = (sigma, q, k + 1)

    def epsilon(self, method: str = "rdp") -> float:
        if not self.enabled:
            return math.inf
        return accounting.epsilon_of_segments(self.segments, self.plan.delta, method)

    def stop_step(self, step: int, steps: int) -> int:
        """The step the guard stops at: ``steps``, or earlier if the target epsilon is reached
        (``step``: where this run starts)."""
        if not self.enabled:
            return steps
        closed, current = self.segments[:-1], self.segments[-1]
        start = step - current[2]
        allowed = privacy_plan.budget_steps(closed, self.plan, steps - start)
        if start + allowed < steps:
            logger.warning("privacy guard: target epsilon %s is reached after step %d of %d; "
                           "training stops there", self.plan.target_epsilon, start + allowed, steps)
        return start + allowed

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "delta": self.plan.delta, "max_grad_norm": self.plan.max_grad_norm,
                "segments": [list(s) for s in self.segments],
                "epsilon_rdp": self.epsilon("rdp") if self.enabled else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The spent budget of the run being resumed. A change of privacy.enabled is refused; a
        change of sigma, q, delta or the clip norm is refused unless allowed, then composed as a
        new segment."""
        if state["enabled"] != self.enabled:
            raise ValueError(f"it was trained with privacy.enabled={state['enabled']}; "
                             f"resume with the same setting or use a new checkpoint.dir")
        if not self.enabled:
            return
        sigma, q, _ = state["segments"][-1]
        plan = self.plan
        changed = [name for name, a, b in (("sigma", sigma, plan.sigma), ("q", q, plan.q),
                                           ("delta", state["delta"], plan.delta),
                                           ("max_grad_norm", state["max_grad_norm"], plan.max_grad_norm))
                   if not math.isclose(a, b, rel_tol=1e-12)]
        if changed and not self.allow_privacy_change:
            raise ValueError(f"resuming with changed {', '.join(changed)}; set privacy.allow_privacy_change=true "
                             f"to compose the privacy cost of both settings, or start a new checkpoint.dir")
        segments = [tuple(s) for s in state["segments"]]
        self.segments = segments + [plan.segment(0)] if changed else segments
