"""The tight white-box line: a fixed decision rule's mistakes tested against the claimed family.

The assumption-free one-run bound (:func:`~privacy.audit.estimators.one_run_epsilon`)
must hold for every (epsilon, delta)-DP mechanism, so it certifies little of a
subsampled Gaussian. This line assumes more and certifies nearly all of it:

- every canary reaches the output through its own channel, independent of the
  others' (a correct engine gives each Dirac canary a coordinate that nothing
  else touches, with its own noise and its own Poisson draw), and
- that channel is some member of the claimed family: the Poisson-subsampled
  Gaussian at the claimed q and steps, with an unknown noise multiplier sigma'.

The rules are fixed before any score is seen: guess "in" when a canary's
log-likelihood ratio is > 0, one rule per score function (the ratio under the
claimed member, which is the Bayes-optimal rule if the engine is correct, and
the ratio with each coordinate's own zero and spread, which stays sharp when
the noise is missing or repeated). Canaries are in with probability 1/2
each, so under member sigma' every guess of any fixed rule is wrong
independently with probability at least the member's Bayes error
(1 - TV) / 2, which grows with sigma'. A Clopper-Pearson upper bound on a
rule's mistake rate rejects every sigma' whose Bayes error is above it; the
bound is the epsilon (same accountant as the claim) of the most private
member left: the mechanism that ran is at least as leaky as that member. No
threshold is searched; the rules share the significance level (Bonferroni).
"""

import math
from dataclasses import dataclass

import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from scipy import optimize

from privacy import accounting
from privacy.audit.estimators import clopper_pearson_upper

ASSUMPTION = ("independent per-canary channels, each a Poisson-subsampled Gaussian at the claimed q and steps "
              "with some noise multiplier")
# Members below sigma_claimed / SIGMA_RANGE are not searched: "at least the epsilon of that member" is reported.
SIGMA_RANGE = 8.0
LOG_SIGMA_TOLERANCE = 1e-3  # of the search for that member


def bayes_error(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """Least possible error rate of any in/out guess (prior 1/2) about one canary of the
    ``steps``-fold Poisson-subsampled Gaussian: (1 - TV) / 2. TV is the hockey-stick
    divergence at epsilon 0, from dp-accounting's pessimistic PLD: an upper bound, so
    this error is a lower bound and the test below only rejects less."""
    if noise_multiplier <= 0:
        return 0.0
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        noise_multiplier, sampling_prob=sample_rate, pessimistic_estimate=True,
        value_discretization_interval=accounting._pld_interval(noise_multiplier))
    total_variation = pld.self_compose(steps).get_delta_for_epsilon(0.0)
    return float(max(0.0, (1.0 - total_variation) / 2))


def guesses_in(llr: np.ndarray) -> np.ndarray:
    """The fixed rules: "in" where a likelihood ratio (one row per score function) exceeds 1."""
    return np.atleast_2d(np.asarray(llr)) > 0


@dataclass(frozen=True)
class FamilyResult:
    epsilon: float              # lower bound: epsilon of the most private member not rejected
    sigma: float                # that member's noise multiplier (inf when nothing is rejected)
    rule: int                   # index of the rule that gave it
    mistakes: int               # that rule's wrong guesses
    canaries: int
    mistake_rate_upper: float   # Clopper-Pearson upper bound on that rule's mistake rate
    hypotheses: int             # rules tested: the Bonferroni factor
    ceiling: float              # the bound of an audit without mistakes: the most it can show


def _most_private_member(rate_upper: float, sigma_claimed: float, sample_rate: float, steps: int) -> float:
    """The largest sigma' whose Bayes error is <= ``rate_upper`` (every larger one is rejected)."""
    floor = max(sigma_claimed / SIGMA_RANGE, accounting.MIN_NOISE_MULTIPLIER)
    if rate_upper >= 0.5:
        return math.inf  # no member errs more than chance
    if bayes_error(floor, sample_rate, steps) >= rate_upper:
        return floor  # all searched members are rejected: report the least leaky of them
    high = max(sigma_claimed, floor) * 2
    while bayes_error(high, sample_rate, steps) < rate_upper:
        high *= 2

    def gap(log_sigma: float) -> float:
        return bayes_error(math.exp(log_sigma), sample_rate, steps) - rate_upper

    # the root's far side within the tolerance: a larger sigma', a smaller epsilon, never an overstatement
    return math.exp(optimize.brentq(gap, math.log(floor), math.log(high), xtol=LOG_SIGMA_TOLERANCE)
                    + LOG_SIGMA_TOLERANCE)


def family_epsilon(guesses: np.ndarray, included: np.ndarray, significance: float, sigma_claimed: float,
                   sample_rate: float, steps: int, delta: float, accountant: str) -> FamilyResult:
    """The tight lower bound from the fixed rules' guesses (one row per rule) and the
    canaries' memberships: the best rule's, each tested at ``significance / rules``."""
    guesses, included = np.atleast_2d(np.asarray(guesses, dtype=bool)), np.asarray(included, dtype=bool)
    if included.ndim != 1 or guesses.shape[1:] != included.shape:
        raise ValueError(f"guesses {guesses.shape} must be [rules, canaries] for {included.shape} memberships")
    canaries, rules = included.size, len(guesses)
    level = significance / rules
    mistakes = (guesses != included).sum(1)
    rule = int(mistakes.argmin())  # the Bayes error grows with sigma': the fewest mistakes reject the most

    def epsilon_of(sigma: float) -> float:
        return 0.0 if math.isinf(sigma) else accounting.epsilon(sigma, sample_rate, steps, delta, accountant)

    rate_upper = float(clopper_pearson_upper(int(mistakes[rule]), canaries, level))
    sigma = _most_private_member(rate_upper, sigma_claimed, sample_rate, steps)
    perfect = _most_private_member(float(clopper_pearson_upper(0, canaries, level)), sigma_claimed,
                                   sample_rate, steps)
    return FamilyResult(epsilon=epsilon_of(sigma), sigma=sigma, rule=rule, mistakes=int(mistakes[rule]),
                        canaries=canaries, mistake_rate_upper=rate_upper, hypotheses=rules,
                        ceiling=epsilon_of(perfect))
