"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD, on dp-accounting.

A training run is one or more segments ``(noise_multiplier, sample_rate,
steps)``: a single segment normally, several when a run was resumed with
changed settings. Each segment is ONE self-composed event (composing by step
count: one ``compose`` call per step would take minutes for thousands of
steps), and the segments are composed together.

Only the add-or-remove-one neighbouring relation is used: it is the one under
which Poisson subsampling amplifies privacy.
"""

import logging
import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

log = logging.getLogger(__name__)


class _UnevaluatedOrders(logging.Filter):
    """dp-accounting's RDP accountant logs a warning (through absl) for every Renyi order it
    cannot evaluate ("_compute_log_a_frac failed to converge ... Excluding this order"), at
    every call: screens of them around a dry run at a high sampling rate. Leaving those
    orders out is harmless, since epsilon is the minimum over the orders that remain (still
    an upper bound, perhaps a looser one). Said once per process, in our words."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "_compute_log_a_frac failed to converge" not in str(record.msg):
            return True
        if not self.said:
            _UnevaluatedOrders.said = True
            log.info("RDP accounting: some small Renyi orders cannot be evaluated at this sampling rate and "
                     "are left out (the RDP epsilon stays an upper bound, perhaps a loose one; PLD is tighter)")
        return False


logging.getLogger("absl").addFilter(_UnevaluatedOrders())

METHODS = ("rdp", "pld")
# PLD grid step for the privacy loss at sigma >= 0.5: 1e-3 is fast (well under a
# second for thousands of steps) and moves epsilon by < 1e-2 at DP-Cap's settings.
PLD_DISCRETIZATION = 1e-3

# DP-SGD below this noise multiplier is never useful, and PLD grids get huge there
MIN_NOISE_MULTIPLIER = 0.1

Segment = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def _pld_interval(smallest_sigma: float) -> float:
    """PLD grid step: :data:`PLD_DISCRETIZATION`, widened as 1/sigma^2 below sigma 0.5.

    The privacy loss of one step spans about 1/sigma^2, so a fixed step would
    need an enormous grid at small sigma (a TAN run at sigma 0.01 would not
    finish). dp-accounting's PLD estimate is pessimistic, an upper bound on
    epsilon at any grid step; a wider step only loosens it (by < 1e-3 relative
    at sigma 0.3).
    """
    return PLD_DISCRETIZATION * max(1.0, (0.5 / smallest_sigma) ** 2)


def _accountant(method: str, smallest_sigma: float = 1.0) -> dp_accounting.PrivacyAccountant:
    if method == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    if method == "pld":
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=_pld_interval(smallest_sigma))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps
    )


def _check_segment(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate must be in [0, 1] (expected batch / dataset size), got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (usually below 1 / dataset size), got {delta}")


def epsilon_of_segments(segments: Sequence[Segment], delta: float, method: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of the segments, in order."""
    _check_delta(delta)
    _accountant(method)  # refuse an unknown method even when there is nothing to account
    for segment in segments:
        _check_segment(*segment)
    used = [(sigma, q, int(steps)) for sigma, q, steps in segments if steps > 0 and q > 0]
    if not used:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in used):
        return math.inf  # an update without noise has no privacy
    accountant = _accountant(method, min(sigma for sigma, _, _ in used))
    events = [_event(*segment) for segment in used]
    accountant.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, method: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-sampled Gaussian steps."""
    return epsilon_of_segments([(noise_multiplier, sample_rate, steps)], delta, method)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    method: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier (within ``tol``, and at least
    :data:`MIN_NOISE_MULTIPLIER`) whose epsilon is <= ``target_epsilon``.

    dp-accounting guarantees the returned value meets the target. PLD is slow
    at small sigma, so its search starts from the RDP answer, which meets the
    target under the tighter PLD accounting too.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    _check_delta(delta)
    _check_segment(0.0, sample_rate, steps)
    _accountant(method)  # refuse an unknown method before searching
    if steps == 0 or sample_rate == 0:
        return 0.0

    def meets(sigma: float) -> bool:
        return epsilon(sigma, sample_rate, steps, delta, method) <= target_epsilon

    lower, guess = MIN_NOISE_MULTIPLIER, 1.0
    if method == "pld":
        guess = calibrate_noise(target_epsilon, delta, sample_rate, steps, "rdp", tol)
        if guess / 2 > lower and not meets(guess / 2):
            lower = guess / 2
    if meets(lower):
        return lower
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(method, lower),
        lambda sigma: _event(sigma, sample_rate, int(steps)),
        target_epsilon,
        delta,
        dp_accounting.mechanism_calibration.LowerEndpointAndGuess(lower, max(guess, 2 * lower)),
        tol=tol,
    ))


def tan_noise_multiplier(sigma: float, batch_size: float, reference_batch_size: float) -> float:
    """TAN (Sander et al. 2023): the noise multiplier at batch ``batch_size``
    that keeps the noise per update, sigma / B, of a run at
    ``reference_batch_size`` with ``sigma``: sigma * batch_size / reference_batch_size.

    Used to try hyper-parameters cheaply at a small batch; the smaller run's
    own epsilon is much larger than the reference run's (use :func:`epsilon`).
    """
    if not (batch_size > 0 and reference_batch_size > 0):
        raise ValueError(f"batch sizes must be > 0, got {batch_size} and {reference_batch_size}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return sigma * batch_size / reference_batch_size
