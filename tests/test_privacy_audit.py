"""privacy.audit: estimators against independent references, the simulated ranks,
detection of broken engines, and the command's contract."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from scipy import special, stats

from privacy import PrivacyEngine, accounting
from privacy.audit.canaries import POPULATION_DIMS, DiracCanaries, LinearLoss, Setting
from privacy.audit.cli import load_engine
from privacy.audit.estimators import (
    clopper_pearson_upper,
    gdp_epsilon,
    guess_counts,
    many_runs_epsilon,
    one_run_bound,
    one_run_epsilon,
    one_run_p_value,
    threshold_ranks,
)
from privacy.audit.runner import Plan, audit_point, verdict
from privacy.audit.training import Mechanism, train_private
from tests.broken_engines import BROKEN_ENGINES

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- one-run estimator


def brute_force_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """SPEC section 6 written out with exact binomial sums (math.comb), nothing shared with scipy."""
    p = math.exp(eps) / (1 + math.exp(eps))

    def at_least(k: int) -> float:
        return sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(max(k, 0), r + 1))

    beta = at_least(v)
    alpha = max([(at_least(v - i) - beta) / i for i in range(1, v + 1)], default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (100, 10, 10, 1.0, 0.0), (100, 10, 7, 0.5, 1e-3), (1000, 40, 35, 2.0, 1e-5), (50, 25, 20, 0.0, 1e-2),
    (200, 30, 0, 1.0, 1e-4), (300, 60, 58, 3.0, 1e-6),
])
def test_one_run_p_value_matches_brute_force(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(brute_force_p_value(m, r, v, eps, delta),
                                                                 rel=1e-9, abs=1e-15)


def test_one_run_bound_closed_form_when_all_guesses_are_right():
    # delta = 0, v = r: P[Bin(r, p) >= r] = p^r = significance  =>  eps = logit(significance^(1/r))
    for r, significance in [(10, 0.05), (100, 0.05), (500, 0.001)]:
        expected = special.logit(significance ** (1 / r))
        assert one_run_bound(1000, r, r, significance, 0.0) == pytest.approx(expected, abs=1e-5)
    # the bound is where the p-value crosses the significance level, with delta too
    eps = one_run_bound(1000, 300, 290, 0.01, 1e-6)
    assert one_run_p_value(1000, 300, 290, eps - 1e-3, 1e-6) < 0.01 < one_run_p_value(1000, 300, 290, eps + 1e-3, 1e-6)
    assert one_run_bound(1000, 300, 150, 0.05, 1e-6) == 0.0  # chance-level guesses prove nothing


def randomized_response_scores(m: int, eps: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An exactly eps-DP mechanism per canary: report membership truthfully with probability
    e^eps / (1 + e^eps); the score is the reported bit (ties broken at random)."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < special.expit(eps)
    reported = np.where(truthful, included, ~included)
    return reported + 0.01 * rng.random(m), included


def test_one_run_epsilon_valid_and_tight_on_randomized_response():
    rng = np.random.default_rng(0)
    eps, significance = 1.0, 0.05
    bounds = [one_run_epsilon(*randomized_response_scores(2000, eps, rng), significance, 0.0).epsilon
              for _ in range(200)]
    # validity: an eps-DP mechanism is certified above eps at most 5% of the time (binomial 99.9% band: <= 19/200)
    assert np.mean(np.array(bounds) > eps) <= 0.095
    # randomized response is the worst case of eps-DP, so with many canaries the bound gets close
    big = one_run_epsilon(*randomized_response_scores(200_000, eps, rng), significance, 0.0)
    assert 0.9 * eps < big.epsilon <= eps
    assert big.guesses == max(guess_counts(200_000))


def test_one_run_epsilon_perfect_guesses_reach_the_ceiling():
    included = np.random.default_rng(1).random(1000) < 0.5
    result = one_run_epsilon(included.astype(float), included, 0.05, 1e-6)
    assert result.epsilon == pytest.approx(result.ceiling)
    assert result.correct == result.guesses == max(guess_counts(1000))
    assert result.hypotheses == len(guess_counts(1000))
    assert result.epsilon == pytest.approx(one_run_bound(1000, 450, 450, 0.05 / result.hypotheses, 1e-6))


# --------------------------------------------------------------------------- many-runs estimators


@pytest.mark.parametrize("k,n,a", [(0, 10, 0.05), (3, 50, 0.05), (17, 200, 0.001), (99, 100, 0.01), (0, 500, 1e-4)])
def test_clopper_pearson_matches_scipy_binomtest_and_binomial_tail(k, n, a):
    upper = float(clopper_pearson_upper(k, n, a))
    # the two-sided exact interval at confidence 1 - 2a has the one-sided bound at level a as its upper end
    assert upper == pytest.approx(stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * a,
                                                                      method="exact").high, rel=1e-7)
    assert stats.binom.cdf(k, n, upper) == pytest.approx(a, rel=1e-6)  # the definition
    assert float(clopper_pearson_upper(n, n, a)) == 1.0


@pytest.mark.parametrize("eps,delta", [(0.5, 1e-5), (1.0, 1e-6), (4.0, 1e-5), (8.0, 1e-6)])
def test_gdp_epsilon_inverts_the_analytic_gaussian_mechanism(eps, delta):
    # dp-accounting's analytic Gaussian (Balle & Wang 2018): noise sigma for (eps, delta) at sensitivity 1,
    # i.e. exactly mu-GDP with mu = 1 / sigma
    sigma = dp_accounting.get_sigma_gaussian(eps, delta)
    assert gdp_epsilon(1 / sigma, delta) == pytest.approx(eps, rel=1e-4)


def test_many_runs_perfect_separation_closed_form():
    n, significance, delta = 300, 0.05, 1e-6
    rng = np.random.default_rng(2)
    result = many_runs_epsilon(rng.random(n) + 10, rng.random(n), significance, delta)
    a = significance / (2 * len(threshold_ranks(n)))
    upper = 1 - a ** (1 / n)  # Clopper-Pearson with no false positive (negative) out of n
    assert result.hypotheses == 2 * len(threshold_ranks(n))
    assert result.epsilon == pytest.approx(math.log((1 - delta - upper) / upper), rel=1e-6)
    assert result.epsilon == pytest.approx(result.ceiling)
    assert result.mu == pytest.approx(2 * stats.norm.isf(upper), rel=1e-6)
    assert result.epsilon_gdp == pytest.approx(gdp_epsilon(result.mu, delta))


def test_many_runs_on_gaussian_scores_valid_and_gdp_near_mu():
    """Scores N(0, 1) out, N(mu, 1) in: the test of a mu-GDP mechanism, eps(mu) known in closed form."""
    mu, delta = 1.0, 1e-5
    true_eps = gdp_epsilon(mu, delta)
    rng = np.random.default_rng(3)
    small = [many_runs_epsilon(rng.normal(mu, 1, 200), rng.normal(0, 1, 200), 0.05, delta) for _ in range(200)]
    assert np.mean([r.epsilon > true_eps for r in small]) <= 0.095  # valid (binomial 99.9% band of 5%)
    assert np.mean([r.mu > mu for r in small]) <= 0.095
    big = many_runs_epsilon(rng.normal(mu, 1, 200_000), rng.normal(0, 1, 200_000), 0.05, delta)
    # measured: mu 0.96 and CP epsilon 1.9 of the true 4.2 at 200k runs a side
    assert 0.9 * mu < big.mu <= mu and big.epsilon_gdp <= true_eps
    assert 0.3 * true_eps < big.epsilon < true_eps


def test_estimators_refuse_bad_inputs():
    with pytest.raises(ValueError, match="correct"):
        one_run_p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        one_run_epsilon(np.array([np.nan, 1.0]), np.array([True, False]), 0.05, 0.0)
    with pytest.raises(ValueError, match="in and out"):
        many_runs_epsilon(np.zeros(0), np.zeros(5), 0.05, 1e-5)
    with pytest.raises(ValueError, match="significance"):
        one_run_bound(10, 5, 5, 1.5, 0.0)


# --------------------------------------------------------------------------- the audited training


def test_simulated_ranks_reduce_like_one_process_and_noise_each_coordinate_once():
    """The sharded reducer must give the one-process gradient without noise, and noise every
    coordinate exactly once with it (not twice, not never): a wrong simulation would hide
    or invent distributed bugs."""
    setting = Setting(PrivacyEngine, Mechanism(0.0, 0.5, 3), population=40, slots=300)
    inputs = DiracCanaries(setting).population
    weights = {}
    for world in (1, 2, 3):
        model = train_private(PrivacyEngine, LinearLoss(inputs.shape[1]), (inputs,),
                              Mechanism(0.0, 0.5, 3, micro_batch=7, world_size=world), seed=5)
        weights[world] = model.probe.weight.detach()
    torch.testing.assert_close(weights[2], weights[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights[3], weights[1], rtol=1e-6, atol=1e-7)
    assert weights[1][0, :POPULATION_DIMS].abs().min() > 0  # the population did train

    sigma, steps, q = 1.5, 40, 0.5
    updates = []

    def observe(step, model):
        updates.append(model.probe.weight.detach()[0].clone())

    train_private(PrivacyEngine, LinearLoss(inputs.shape[1]), (inputs,),
                  Mechanism(sigma, q, steps, world_size=2), seed=6, observe=observe)
    released = torch.diff(torch.stack([torch.zeros_like(updates[0])] + updates), dim=0) * (q * len(inputs))
    # each rank's shard, without the population coordinates: noise only, std sigma * C
    shards = [part[:, POPULATION_DIMS:] for part in released.tensor_split(2, dim=1)]
    for noise in shards:  # 40 steps x 142 coordinates: the std of the std estimate is about 1%
        assert noise.std(0).mean().item() == pytest.approx(sigma, rel=0.05)
    # independent streams: the shards' noise is uncorrelated (ranks sharing a stream would
    # draw the same noise: 1); 5680 pairs, the std of the estimate is about 0.013
    assert abs(torch.corrcoef(torch.stack([s.flatten() for s in shards]))[0, 1].item()) < 0.06


# --------------------------------------------------------------------------- detection


def _audit(engine, epsilon: float, runs: int, canaries: int, kinds: tuple[str, ...]) -> list[dict]:
    q, steps, delta = 0.3, 10, 1e-6
    sigma = accounting.calibrate_noise(epsilon, delta, q, steps, "pld")
    plan = Plan(canaries=canaries, runs=runs, population=60, delta=delta, kinds=kinds, seed=11)
    return audit_point(engine, Mechanism(sigma, q, steps, world_size=2), plan)


def _one_run(entries: list[dict], kind: str) -> dict:
    return next(e for e in entries if e["canary"] == kind and e["estimator"] == "one_run")


# what the final model's loss shows: not a repeated noise draw, nor a noise-free shard of the
# gradient (the loss mixes it with the noisy classes)
INPUT_CANARIES_CATCH = ("SkipClipping", "NoiseDividedTwice", "LeakUnclipped")


def test_audit_passes_the_correct_engine_and_catches_five_broken_ones():
    """Small one-run audits (500 canaries of each kind, claimed epsilon 1, two simulated ranks,
    fixed seed): the correct engine stays below the claim, every broken engine above it.
    Measured at this seed: correct 0.0 and 0.0; Dirac 2.78 for NoiseOnRankZero and
    LeakUnclipped (half the canaries: one rank's), 3.49 (the most 500 canaries can certify
    here) for the other three; input canaries 3.28, 3.61, 2.57 for INPUT_CANARIES_CATCH."""
    correct = _audit(PrivacyEngine, 1.0, runs=8, canaries=500, kinds=("dirac", "input"))
    assert not verdict(correct)
    assert max(_one_run(correct, kind)["epsilon_lower"] for kind in ("dirac", "input")) < 1.0
    for name, engine in BROKEN_ENGINES.items():
        entries = _audit(engine, 1.0, runs=8, canaries=500, kinds=("dirac", "input"))
        assert verdict(entries), name
        dirac, image = _one_run(entries, "dirac"), _one_run(entries, "input")
        assert dirac["violation"], (name, dirac["epsilon_lower"])
        if name in INPUT_CANARIES_CATCH:
            assert image["violation"], (name, image["epsilon_lower"])


def test_many_runs_catch_a_leak_on_one_rank():
    """160 runs of one Dirac canary, LeakUnclipped (rank 0 adds its own examples' unclipped
    gradients): the canary lands on rank 0's slice in about half the runs. Measured at this
    seed (claimed 1.0): Clopper-Pearson 1.49 of a ceiling 2.34, GDP estimate 5.3."""
    entries = _audit(BROKEN_ENGINES["LeakUnclipped"], 1.0, runs=160, canaries=200, kinds=("dirac",))
    for estimator in ("many_runs_cp", "many_runs_gdp"):
        entry = next(e for e in entries if e["estimator"] == estimator)
        assert entry["epsilon_lower"] > entry["epsilon_claimed"], (estimator, entry["epsilon_lower"])


# --------------------------------------------------------------------------- the command


def test_load_engine_explains_bad_specs():
    assert load_engine("privacy.engine:PrivacyEngine") is PrivacyEngine
    assert load_engine("tests.broken_engines:SkipClipping") is BROKEN_ENGINES["SkipClipping"]
    for spec, message in [("privacy.engine", "MODULE:NAME"), ("no_such_module:X", "cannot import"),
                          ("privacy.engine:Nope", "no callable"), ("privacy.audit.runner:Plan", "lacks")]:
        with pytest.raises(ValueError, match=message):
            load_engine(spec)


def test_contract_command_writes_audit_json(tmp_path):
    out = tmp_path / "audit"
    command = [sys.executable, "-m", "privacy.audit", "--engine", "tests.broken_engines:NoiseDividedTwice",
               "--epsilon", "1", "--out", str(out), "--canaries", "200", "--runs", "8", "--steps", "5",
               "--population", "20", "--sigmas", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "audit.json").read_text())
    audits = result["audits"]
    assert {(e["canary"], e["estimator"]) for e in audits} == {
        (c, s) for c in ("dirac", "input") for s in ("one_run", "many_runs_cp", "many_runs_gdp")}
    assert len(audits) == 6
    for entry in audits:
        assert {"canary", "estimator", "epsilon_claimed", "epsilon_lower", "confidence"} <= set(entry)
        assert entry["epsilon_claimed"] == pytest.approx(1.0, abs=0.01)  # calibrated to --epsilon
        assert 0 < entry["confidence"] < 1 and entry["epsilon_lower"] >= 0
    assert [p["sigma"] for p in result["sweep"]] == sorted([3.0, audits[0]["sigma"]])
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "VIOLATION" in done.stdout and result["violation"] is True

    bad = subprocess.run(command[:3] + ["--engine", "nowhere:X", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot import nowhere" in bad.stderr
