"""Accounting against the DP-Cap figure and against dp-accounting called directly."""

import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from privacy.accounting import calibrate_noise, epsilon, epsilon_of_segments, tan_noise_multiplier

N = 233_804_767
Q = 1_310_720 / N
DELTA = 1 / N


def direct_epsilon(accountant, segments, delta):
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in segments
    ]
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return accountant.get_epsilon(delta)


def test_dpcap_paper_figure_rdp():
    assert epsilon(0.728, Q, 5708, DELTA, method="rdp") == pytest.approx(8.05, abs=0.01)


def test_dpcap_paper_figure_pld():
    assert epsilon(0.728, Q, 5708, DELTA, method="pld") == pytest.approx(7.34, abs=0.02)


@pytest.mark.parametrize("sigma, q, steps", [(1.1, 0.01, 300), (0.6, 0.002, 2000)])
def test_matches_dp_accounting_directly(sigma, q, steps):
    delta = 1e-6
    assert epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(
        direct_epsilon(rdp_privacy_accountant.RdpAccountant(), [(sigma, q, steps)], delta), rel=1e-9
    )
    assert epsilon(sigma, q, steps, delta, "pld") == pytest.approx(
        direct_epsilon(pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3),
                       [(sigma, q, steps)], delta),
        rel=1e-6,
    )


def test_segments_compose_like_one_run_and_like_dp_accounting():
    segments = [(1.0, 0.01, 100), (0.8, 0.02, 50)]
    delta = 1e-5
    expected = direct_epsilon(rdp_privacy_accountant.RdpAccountant(), segments, delta)
    assert epsilon_of_segments(segments, delta) == pytest.approx(expected, rel=1e-9)
    # splitting one run into two segments changes nothing
    assert epsilon_of_segments([(1.0, 0.01, 60), (1.0, 0.01, 40)], delta) == pytest.approx(
        epsilon(1.0, 0.01, 100, delta), rel=1e-9
    )
    assert epsilon_of_segments(segments, delta) > epsilon(1.0, 0.01, 100, delta)


def test_more_steps_or_less_noise_cost_more():
    base = epsilon(1.0, 0.01, 100, 1e-5)
    assert epsilon(1.0, 0.01, 200, 1e-5) > base
    assert epsilon(0.8, 0.01, 100, 1e-5) > base
    assert epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert math.isinf(epsilon(0.0, 0.01, 10, 1e-5))


def test_calibrate_noise_inverts_epsilon():
    sigma = calibrate_noise(8.05, DELTA, Q, 5708, method="rdp")
    assert sigma == pytest.approx(0.728, abs=2e-3)
    assert epsilon(sigma, Q, 5708, DELTA) <= 8.05 + 1e-9
    assert epsilon(sigma * 0.99, Q, 5708, DELTA) > 8.05


def test_pld_at_small_sigma_is_a_slightly_looser_upper_bound():
    """A TAN run's sigma (0.1 here) widens the PLD grid: still pessimistic, and
    close to a five times finer grid; far tighter than RDP."""
    sigma, q, steps, delta = 0.1, 0.01, 400, 2e-5
    fine = direct_epsilon(pld_privacy_accountant.PLDAccountant(value_discretization_interval=5e-3),
                          [(sigma, q, steps)], delta)
    ours = epsilon(sigma, q, steps, delta, method="pld")
    assert fine <= ours <= fine * 1.001
    assert ours < epsilon(sigma, q, steps, delta, method="rdp")


def test_tan_keeps_sigma_over_batch():
    sigma = tan_noise_multiplier(0.728, 16_384, 1_310_720)
    assert sigma / 16_384 == pytest.approx(0.728 / 1_310_720)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: epsilon(1.0, 1.5, 10, 1e-5), "sample_rate"),
        (lambda: epsilon(1.0, 0.1, 10, 0.0), "delta"),
        (lambda: epsilon(1.0, 0.1, 10, 1e-5, method="prv"), "method"),
        (lambda: epsilon(1.0, 0.1, 2.5, 1e-5), "steps"),
        (lambda: calibrate_noise(-1.0, 1e-5, 0.1, 10), "target_epsilon"),
    ],
)
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_composing_by_count_equals_composing_step_by_step():
    sigma, q, steps, delta = 0.9, 0.02, 25, 1e-5
    acc = rdp_privacy_accountant.RdpAccountant()
    for _ in range(steps):
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    assert epsilon(sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_calibrate_noise_pld_needs_less_noise_than_rdp():
    rdp = calibrate_noise(8.0, DELTA, Q, 5708, method="rdp")
    pld = calibrate_noise(8.0, DELTA, Q, 5708, method="pld", tol=1e-3)
    assert epsilon(pld, Q, 5708, DELTA, method="pld") <= 8.0
    assert epsilon(pld - 2e-3, Q, 5708, DELTA, method="pld") > 8.0
    assert 0.9 * rdp < pld < rdp


def test_pld_at_small_sigma_stays_fast_and_close():
    q = 20_480 / N  # the TAN run at B/64
    # sigma 0.3: the widened PLD grid against dp-accounting's at the fine step
    fine = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    assert epsilon(0.3, q, 5708, DELTA, method="pld") == pytest.approx(
        direct_epsilon(fine, [(0.3, q, 5708)], DELTA), rel=1e-3)
    # sigma 0.728 / 64: the fine grid would not finish; PLD stays below RDP
    tiny = epsilon(0.728 / 64, q, 5708, DELTA, method="pld")
    assert 0 < tiny < epsilon(0.728 / 64, q, 5708, DELTA, method="rdp")


def test_segments_without_steps_or_noise():
    assert epsilon_of_segments([], 1e-5) == 0.0
    assert epsilon_of_segments([(1.0, 0.01, 0), (1.0, 0.0, 10)], 1e-5) == 0.0
    assert math.isinf(epsilon_of_segments([(1.0, 0.01, 10), (0.0, 0.01, 1)], 1e-5, method="pld"))
