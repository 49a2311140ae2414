"""One audit point: the accountant's epsilon for a mechanism next to audited lower bounds.

For every canary kind, one run with ``canaries`` canaries each included with
probability 1/2 (the one-run estimators) and ``runs`` runs of a single canary,
half with it in (the many-runs estimators). The Dirac canaries' one run feeds
two lines: the assumption-free one-run bound and the tight family bound
(:mod:`~privacy.audit.tight`, valid under its stated assumption). The entries
that take part in the verdict (one-run and Clopper-Pearson per kind, and the
tight line) share the significance level 1 - confidence (Bonferroni), so
"some entry is above the claimed epsilon" is itself a test at that
confidence. The GDP entry is an estimate (valid only if the mechanism's
trade-off curve is Gaussian) and takes no part in that verdict. Every entry
says whether it is assumption-free, and if not, what it assumes.
"""

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from privacy import accounting
from privacy.audit.canaries import CANARY_KINDS, Setting
from privacy.audit.estimators import many_runs_epsilon, one_run_bound, one_run_epsilon, one_run_fdp_bound
from privacy.audit.tight import ASSUMPTION, family_epsilon, guesses_in
from privacy.audit.training import EngineFactory, Mechanism, SamplerFactory
from privacy.sampling import PoissonSampler

logger = logging.getLogger(__name__)

RIGOROUS_ESTIMATORS = ("one_run", "many_runs_cp")  # per kind; and "many_runs_gdp", an estimate
TIGHT_KIND = "dirac"  # the kind whose one run also feeds the tight family line
GDP_ASSUMPTION = "the mechanism's trade-off curve is Gaussian (mu-GDP)"
# slots of the many-runs model: a single canary's slot only decides which rank owns it,
# and a small model keeps hundreds of runs fast
MANY_RUNS_SLOTS = 64


@dataclass(frozen=True)
class Plan:
    """How hard to look: canary counts, runs, confidence, and what the accountant assumes."""

    canaries: int = 10000  # one-run audit: m
    runs: int = 400        # many-runs audit: R (half with the canary in)
    population: int = 200  # ordinary examples of every training set
    confidence: float = 0.999  # 20 audits of a correct engine flag none with probability >= 0.98
    delta: float = 1e-6
    accountant: str = "pld"
    kinds: tuple[str, ...] = tuple(CANARY_KINDS)
    seed: int = 0

    def __post_init__(self):
        if self.canaries < 2 or self.runs < 2:
            raise ValueError(f"need at least 2 canaries and 2 runs, got {self.canaries} and {self.runs}")
        if self.population < 1:
            raise ValueError(f"population must be >= 1, got {self.population}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        unknown = set(self.kinds) - set(CANARY_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"canary kinds must be among {sorted(CANARY_KINDS)}, got {list(self.kinds)}")

    @property
    def entry_significance(self) -> float:
        """1 - confidence, split over the rigorous entries of one audit point."""
        rigorous = len(RIGOROUS_ESTIMATORS) * len(self.kinds) + (TIGHT_KIND in self.kinds)
        return (1 - self.confidence) / rigorous


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def claimed_epsilon(mechanism: Mechanism, plan: Plan) -> float:
    return accounting.epsilon(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps, plan.delta,
                              plan.accountant)


def audit_point(engine: EngineFactory, mechanism: Mechanism, plan: Plan,
                device: torch.device = torch.device("cpu"), sampler: SamplerFactory = PoissonSampler) -> list[dict]:
    """Audit entries (one per canary kind and estimator) for ``engine`` run as ``mechanism``,
    its batches drawn by ``sampler``."""
    claimed = claimed_epsilon(mechanism, plan)
    significance = plan.entry_significance
    common = {"epsilon_claimed": claimed, "confidence": 1 - significance, "sigma": mechanism.noise_multiplier,
              "sample_rate": mechanism.sample_rate, "steps": mechanism.steps, "delta": plan.delta,
              "accountant": plan.accountant, "world_size": mechanism.world_size}
    entries = []
    for kind_index, kind in enumerate(plan.kinds):
        def canary_kind(slots: int):
            return CANARY_KINDS[kind](Setting(engine, mechanism, plan.population, slots, plan.seed, device, sampler))

        canaries, single = canary_kind(plan.canaries), canary_kind(min(plan.canaries, MANY_RUNS_SLOTS))

        start = time.perf_counter()
        included = np.random.default_rng([plan.seed, kind_index, 0]).random(plan.canaries) < 0.5
        scores = canaries.one_run(included, _seed(plan.seed, kind_index, 1))
        trained = time.perf_counter() - start
        for estimator, bound in (("one_run", one_run_bound), ("one_run_fdp", one_run_fdp_bound)):
            start = time.perf_counter()
            one = one_run_epsilon(scores, included, significance, plan.delta, bound=bound)
            entries.append(common | {
                "canary": kind, "estimator": estimator, "epsilon_lower": one.epsilon, "rigorous": True,
                "assumption_free": True, "assumption": None,
                "epsilon_ceiling": one.ceiling, "canaries": plan.canaries, "canaries_in": int(included.sum()),
                "guesses": one.guesses, "correct": one.correct, "score": canaries.score_names[one.score],
                "hypotheses": one.hypotheses, "runs": 1, "seconds": trained + time.perf_counter() - start})
            logger.info("%s %s: %d canaries, epsilon >= %.3f (claimed %.3f), %.1f s",
                        kind, estimator, plan.canaries, one.epsilon, claimed, entries[-1]["seconds"])
        if kind == TIGHT_KIND:
            start = time.perf_counter()
            tight = family_epsilon(guesses_in(scores), included, significance, mechanism.noise_multiplier,
                                   mechanism.sample_rate, mechanism.steps, plan.delta, plan.accountant)
            entries.append(common | {
                "canary": kind, "estimator": "tight_family", "epsilon_lower": tight.epsilon, "rigorous": True,
                "assumption_free": False, "assumption": ASSUMPTION, "epsilon_ceiling": tight.ceiling,
                "canaries": plan.canaries, "canaries_in": int(included.sum()), "mistakes": tight.mistakes,
                "mistake_rate_upper": tight.mistake_rate_upper,
                "sigma_at_most": None if math.isinf(tight.sigma) else tight.sigma,
                "score": f"{canaries.score_names[tight.rule]} > 0", "hypotheses": tight.hypotheses, "runs": 1,
                "seconds": time.perf_counter() - start})
            logger.info("%s tight (claimed family): %d mistakes of %d, sigma' <= %.4f (claimed %.4f), "
                        "epsilon >= %.3f (claimed %.3f)", kind, tight.mistakes, plan.canaries, tight.sigma,
                        mechanism.noise_multiplier, tight.epsilon, claimed)

        start = time.perf_counter()
        runs_in = plan.runs // 2
        scores = np.stack([single.many_runs_one(run < runs_in, _seed(plan.seed, kind_index, 2, run))
                           for run in range(plan.runs)], axis=1)  # [score functions, runs]
        many = many_runs_epsilon(scores[:, :runs_in], scores[:, runs_in:], significance, plan.delta)
        seconds = time.perf_counter() - start
        shared = {"canary": kind, "runs": plan.runs, "runs_in": runs_in, "canaries": 1,
                  "threshold_rank": many.threshold_rank, "hypotheses": many.hypotheses, "seconds": seconds}
        entries.append(common | shared | {
            "estimator": "many_runs_cp", "epsilon_lower": many.epsilon, "rigorous": True,
            "assumption_free": True, "assumption": None,
            "epsilon_ceiling": many.ceiling, "false_positive_ub": many.false_positive_ub,
            "false_negative_ub": many.false_negative_ub, "score": canaries.score_names[many.score]})
        entries.append(common | shared | {
            "estimator": "many_runs_gdp", "epsilon_lower": many.epsilon_gdp, "rigorous": False, "mu": many.mu,
            "assumption_free": False, "assumption": GDP_ASSUMPTION,
            "epsilon_ceiling": many.ceiling_gdp})
        logger.info("%s many-runs: %d runs, epsilon >= %.3f (Clopper-Pearson), GDP estimate %.3f, %.1f s",
                    kind, plan.runs, many.epsilon, many.epsilon_gdp, seconds)
    for entry in entries:
        entry["violation"] = bool(entry["epsilon_lower"] > entry["epsilon_claimed"])
    return entries


def verdict(entries: list[dict]) -> bool:
    """True when a rigorous lower bound exceeds the claimed epsilon: the engine is not
    as private as claimed, at the plan's confidence."""
    return any(e["violation"] for e in entries if e["rigorous"])
