"""From canary scores to a statistical lower bound on epsilon.

Three estimators, all one-sided (a high score means "the canary was in"):

- :func:`one_run_epsilon`: Steinke, Nasr and Jagielski 2023, "Privacy Auditing
  with One (1) Training Run". m canaries, each in the training set with
  probability 1/2, one training run. Guess "in" for the r highest scores and
  abstain on the rest; an (epsilon, delta)-DP mechanism makes the number of
  correct guesses v (nearly) dominated by Binomial(r, e^eps / (1 + e^eps)).
- the same guesses judged by :func:`one_run_fdp_bound` (``bound=`` of
  :func:`one_run_epsilon`): Mahloujifar, Melis and Chaudhuri 2025, "Auditing
  f-Differential Privacy in One Run". It bounds the chance of v correct guesses
  of r through the trade-off curve of (epsilon, delta)-DP itself rather than a
  binomial with delta paid once per canary, so it stays valid for any mechanism
  and certifies more where delta matters (10^4 canaries at delta 1e-6: 6.3
  for a perfect attack, against 4.0).
- :func:`many_runs_epsilon`: Nasr et al. 2023, "Tight Auditing". One canary,
  many independent runs with it in or out; Clopper-Pearson upper bounds on the
  false positive and false negative rates of a threshold test give
  epsilon >= ln((1 - delta - FNR_ub) / FPR_ub), and, under the assumption that
  the mechanism's trade-off curve is Gaussian (mu-GDP), the estimate
  mu >= Phi^-1(1 - FPR_ub) - Phi^-1(FNR_ub) turned into epsilon at delta.

Every choice made after seeing the scores (which r, which threshold, which of
several score functions) is one more hypothesis, so the significance level is
split over all of them (Bonferroni). The grids are fixed in advance and small
(powers of two), which keeps the correction cheap.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

# Searches for epsilon stop here: no audit with fewer than ~e^60 runs or canaries can certify more.
MAX_EPSILON = 60.0


# One-run audits guess "in" for the top r = floor(GUESS_FRACTION * m / 2^k) scores, k < GUESS_COUNTS:
# just under the m/2 canaries expected in, so a perfect attack can get every guess right.
GUESS_FRACTION = 0.45
GUESS_COUNTS = 5


def guess_counts(canaries: int) -> list[int]:
    """The numbers of guesses a one-run audit of ``canaries`` canaries tries (largest first)."""
    return sorted({r for k in range(GUESS_COUNTS) if (r := int(GUESS_FRACTION * canaries) >> k) >= 1}, reverse=True)


def threshold_ranks(out_runs: int) -> list[int]:
    """The ranks k (1, 2, 4, ... <= out_runs / 4, at least 1) of the out-run scores tried as
    thresholds: high thresholds are where large epsilons show; the rest only dilute the test."""
    limit = max(out_runs // 4, 1)
    return [2**i for i in range(int(math.log2(limit)) + 1)]


def _check_significance(significance: float) -> None:
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1) (one minus the confidence), got {significance}")


def _check_delta(delta: float) -> None:
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")


# --------------------------------------------------------------------------- one run


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """p-value of ``correct`` right guesses out of ``guesses`` under (epsilon, delta)-DP.

    beta = P[Bin(r, p) >= v] with p = e^eps / (1 + e^eps);
    alpha = max_{i=1..v} (P[Bin(r, p) >= v - i] - beta) / i;
    p-value = min(1, beta + 2 m delta alpha)   (Steinke et al. 2023, Theorem 5.2).
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    p = special.expit(epsilon)
    beta = stats.binom.sf(correct - 1, guesses, p)
    if delta == 0 or correct == 0:
        return float(beta)
    i = np.arange(1, correct + 1)
    alpha = np.max((stats.binom.sf(correct - i - 1, guesses, p) - beta) / i)
    return float(min(1.0, beta + 2 * canaries * delta * alpha))


def one_run_bound(canaries: int, guesses: int, correct: int, significance: float, delta: float) -> float:
    """The largest epsilon whose p-value stays <= ``significance`` (0 if none does)."""
    _check_significance(significance)
    _check_delta(delta)

    def excess(eps: float) -> float:  # > 0 where (eps, delta)-DP is rejected
        return significance - one_run_p_value(canaries, guesses, correct, eps, delta)

    return 0.0 if guesses == 0 else _largest_epsilon_rejected(excess, xtol=1e-6)


def _dp_trade_off_at_complement(epsilon: float, delta: float):
    """x -> f(1 - x) for f the trade-off curve of (epsilon, delta)-DP,
    f(a) = max(0, 1 - delta - e^eps a, e^-eps (1 - delta - a)): the least
    probability of a wrong guess that a probability x of a right one forces."""
    growth = math.exp(epsilon)
    return lambda x: max(0.0, 1 - delta - growth * (1 - x), (x - delta) / growth)


def _one_run_fdp_gap(canaries: int, guesses: int, correct: int, significance: float, trade_off) -> float:
    """Positive when ``correct`` right guesses of ``guesses`` (m = ``canaries``) are less likely
    than ``significance`` under every mechanism whose curve is at least ``trade_off``
    (x -> f(1 - x)). Mahloujifar et al. 2025, the recursion over the i-th right guess:
    r and h start at significance x (right, wrong guesses) / m; each step raises h to
    the wrong-guess mass the curve forces for right-guess mass r, and r by the share
    i / (guesses - i) of that rise; the claim is rejected when r + h exceeds guesses / m."""
    right = significance * correct / canaries
    wrong = significance * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        forced = max(wrong, trade_off(right))
        if forced == wrong:  # nothing moves any more
            break
        right = min(right + i / (guesses - i) * (forced - wrong), 1.0)
        wrong = forced
    return right + wrong - guesses / canaries


def one_run_fdp_bound(canaries: int, guesses: int, correct: int, significance: float, delta: float) -> float:
    """The largest epsilon at which (epsilon, delta)-DP is rejected by the f-DP one-run test (0 if none)."""
    _check_significance(significance)
    _check_delta(delta)
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")

    def excess(eps: float) -> float:
        return _one_run_fdp_gap(canaries, guesses, correct, significance,
                                         _dp_trade_off_at_complement(eps, delta))

    return 0.0 if guesses == 0 else _largest_epsilon_rejected(excess, xtol=1e-6)


def _largest_epsilon_rejected(gap, xtol: float) -> float:
    """The epsilon where ``gap`` (positive while epsilon is rejected, decreasing) crosses
    zero: 0 if it never is positive, MAX_EPSILON if it still is there."""
    if gap(0.0) <= 0:
        return 0.0
    high = 1.0
    while gap(high) > 0:
        if high >= MAX_EPSILON:
            return MAX_EPSILON
        high *= 2
    return float(optimize.brentq(gap, high / 2 if high > 1 else 0.0, high, xtol=xtol))


@dataclass(frozen=True)
class OneRunResult:
    epsilon: float      # the lower bound
    guesses: int        # r of the best hypothesis
    correct: int        # v of the best hypothesis
    score: int          # index of the score function that gave it
    hypotheses: int     # (score functions) x (guess counts) tried: the Bonferroni factor
    ceiling: float      # what all-correct guesses would have certified: the most this audit can show


def one_run_epsilon(scores: Sequence[np.ndarray] | np.ndarray, included: np.ndarray, significance: float,
                    delta: float, bound=one_run_bound) -> OneRunResult:
    """One-run lower bound from canary scores (one row per score function) and membership.

    For every score function and every r of :func:`guess_counts`, guess "in"
    for the r highest scores; the bound (``bound``: :func:`one_run_bound`, or
    :func:`one_run_fdp_bound`) is the best over these hypotheses, each tested at
    ``significance / hypotheses``.
    """
    included = np.asarray(included, dtype=bool)
    rows = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    canaries = included.size
    if rows.shape[1] != canaries:
        raise ValueError(f"scores have {rows.shape[1]} columns but there are {canaries} canaries")
    if not np.isfinite(rows).all():
        raise ValueError("canary scores must be finite (a NaN score would rank arbitrarily)")
    counts = guess_counts(canaries)
    if not counts:
        raise ValueError(f"a one-run audit needs at least 2 canaries, got {canaries}")
    hypotheses = len(counts) * len(rows)
    level = significance / hypotheses
    best = (0.0, 0, 0, 0)  # epsilon, r, v, score function
    for index, row in enumerate(rows):
        ranked = included[np.argsort(-row, kind="stable")]
        for r in counts:
            v = int(ranked[:r].sum())
            eps = bound(canaries, r, v, level, delta)
            if eps > best[0]:
                best = (eps, r, v, index)
    in_count = int(included.sum())
    ceiling = max((bound(canaries, r, r, level, delta) for r in counts if r <= in_count), default=0.0)
    return OneRunResult(*best, hypotheses=hypotheses, ceiling=ceiling)


# --------------------------------------------------------------------------- many runs


def clopper_pearson_upper(successes: np.ndarray | int, trials: int, significance: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound u: P[Bin(n, u) <= k] = significance (1 if k = n)."""
    _check_significance(significance)
    k = np.asarray(successes)
    if np.any(k < 0) or np.any(k > trials):
        raise ValueError(f"successes must be in [0, {trials}], got {k}")
    return np.where(k < trials, stats.beta.ppf(1 - significance, k + 1, np.maximum(trials - k, 1)), 1.0)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon at ``delta`` of mu-GDP (Dong, Roth, Su 2019, Corollary 2.13):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for eps."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) for a GDP conversion, got {delta}")
    if mu <= 0:
        return 0.0

    def log_delta_gap(eps: float) -> float:  # log delta(eps) - log delta, decreasing in eps; in logs for the tails
        a = stats.norm.logcdf(-eps / mu + mu / 2)
        b = eps + stats.norm.logcdf(-eps / mu - mu / 2)
        return a + np.log1p(-np.exp(b - a)) - np.log(delta) if b < a else -np.inf

    return _largest_epsilon_rejected(log_delta_gap, xtol=1e-8)


@dataclass(frozen=True)
class ManyRunsResult:
    epsilon: float          # Clopper-Pearson lower bound (rigorous)
    epsilon_gdp: float      # GDP estimate (valid only if the mechanism is mu-GDP)
    mu: float
    false_positive_ub: float   # at the threshold of the CP bound
    false_negative_ub: float
    threshold_rank: int     # k: the threshold is the k-th highest score of the out runs
    score: int
    hypotheses: int
    ceiling: float          # CP bound of a perfect separation: the most this audit can show
    ceiling_gdp: float


def many_runs_epsilon(in_scores: Sequence[np.ndarray] | np.ndarray, out_scores: Sequence[np.ndarray] | np.ndarray,
                      significance: float, delta: float) -> ManyRunsResult:
    """Many-runs bounds from the scores of runs with the canary in and out (one row per score function).

    Thresholds are the k-th highest out-run score (k of :func:`threshold_ranks`): the false
    positive rate of "score > t_k" on a fresh out run is stochastically below
    Beta(k, n - k + 1) whatever the score distribution, which is exactly the
    Clopper-Pearson upper bound for k - 1 false positives of n; given t_k, the
    in runs are independent of it, so their false negatives get an ordinary
    Clopper-Pearson bound. Two bounds per (score function, k), Bonferroni over all.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    ins = np.atleast_2d(np.asarray(in_scores, dtype=np.float64))
    outs = np.atleast_2d(np.asarray(out_scores, dtype=np.float64))
    if len(ins) != len(outs):
        raise ValueError(f"{len(ins)} rows of in-run scores but {len(outs)} of out-run scores")
    if not (np.isfinite(ins).all() and np.isfinite(outs).all()):
        raise ValueError("run scores must be finite")
    n_in, n_out = ins.shape[1], outs.shape[1]
    if n_in == 0 or n_out == 0:
        raise ValueError(f"need runs with the canary in and out, got {n_in} in and {n_out} out")
    ranks = threshold_ranks(n_out)
    hypotheses = 2 * len(ranks) * len(ins)
    level = significance / hypotheses
    fpr_ub = clopper_pearson_upper(np.array(ranks) - 1, n_out, level)

    def bounds(fnr_ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epsilon >= ln((1 - delta - FNR_ub) / FPR_ub), mu >= Phi^-1(1 - FPR_ub) - Phi^-1(FNR_ub)) per k."""
        tpr_lb = 1 - delta - fnr_ub
        eps = np.log(np.maximum(tpr_lb, np.finfo(float).tiny)) - np.log(fpr_ub)
        return np.where(tpr_lb > 0, np.maximum(eps, 0.0), 0.0), stats.norm.isf(fpr_ub) - stats.norm.ppf(fnr_ub)

    best_eps, best_mu, best_fnr, at = 0.0, 0.0, 1.0, (0, 0)
    for index, (row_in, row_out) in enumerate(zip(ins, outs)):
        thresholds = -np.sort(-row_out)[np.array(ranks) - 1]
        false_negatives = (row_in[None, :] <= thresholds[:, None]).sum(1)
        fnr_ub = clopper_pearson_upper(false_negatives, n_in, level)
        eps, mu = bounds(fnr_ub)
        if eps.max() > best_eps:
            j = int(eps.argmax())
            best_eps, at, best_fnr = float(eps[j]), (index, j), float(fnr_ub[j])
        best_mu = max(best_mu, float(np.nanmax(mu)))
    perfect_eps, perfect_mu = bounds(clopper_pearson_upper(np.zeros(len(ranks), int), n_in, level))
    return ManyRunsResult(
        epsilon=best_eps, epsilon_gdp=gdp_epsilon(best_mu, delta),
        mu=best_mu, false_positive_ub=float(fpr_ub[at[1]]), false_negative_ub=best_fnr,
        threshold_rank=ranks[at[1]], score=at[0], hypotheses=hypotheses,
        ceiling=float(perfect_eps.max()),
        ceiling_gdp=gdp_epsilon(float(perfect_mu.max()), delta),
    )
