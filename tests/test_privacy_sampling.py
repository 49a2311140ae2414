"""privacy.sampling.PoissonSampler: distribution, determinism, the split across ranks.

The statistical tests compare the draws with the model the accountant assumes,
N x T independent Bernoulli(q) coin flips, through exact binomial tails (scipy),
not through the sampler's own algorithm. They are seeded, so they are
deterministic; each is also built to fail with probability below 1e-6 under
that model had another seed been chosen (Bonferroni over its checks).
"""

import numpy as np
import pytest
from scipy import stats

from privacy.sampling import PoissonSampler


def sampler(n=10_000, q=0.01, seed=0, world=1, rank=0, micro=16) -> PoissonSampler:
    return PoissonSampler(n, q, seed, world_size=world, rank=rank, max_physical_batch=micro)


def test_same_seed_and_step_same_batch_across_instances():
    a, b = sampler(seed=3), sampler(seed=3)
    for step in (0, 1, 57):
        assert np.array_equal(a.logical_batch(step), b.logical_batch(step))
    assert not np.array_equal(a.logical_batch(1), a.logical_batch(2))
    assert not np.array_equal(a.logical_batch(1), sampler(seed=4).logical_batch(1))
    assert np.array_equal(a.logical_batch(5), sampler(seed=3).logical_batch(5))  # order of calls is irrelevant


def test_batches_are_sorted_unique_and_in_range():
    s = sampler(n=1000, q=0.3)
    for step in range(20):
        batch = s.logical_batch(step)
        assert batch.dtype == np.int64
        assert np.all(np.diff(batch) > 0)
        assert batch.min() >= 0 and batch.max() < 1000


def test_each_example_joins_independently_with_probability_q():
    n, q, steps = 2_000, 0.05, 600
    s = sampler(n=n, q=q, seed=1)
    member = np.zeros((steps, n), dtype=bool)
    for step in range(steps):
        member[step, s.logical_batch(step)] = True
    sizes = member.sum(1)
    # batch size ~ Binomial(n, q): mean n q = 100, variance n q (1 - q) = 95 (a fixed size would give 0)
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.25)
    # every example's count over the steps ~ Binomial(steps, q): mean 30, variance 28.5
    per_example = member.sum(0)
    assert per_example.mean() == pytest.approx(steps * q, rel=0.01)
    assert per_example.var(ddof=1) == pytest.approx(steps * q * (1 - q), rel=0.1)
    # joining one step says nothing about the next: P(both) = q^2
    both = (member[:-1] & member[1:]).mean()
    assert both == pytest.approx(q * q, rel=0.1)


# Each statistical test below fails with probability < FAMILY_ALPHA under the
# Poisson model: its checks share this budget equally (Bonferroni).
FAMILY_ALPHA = 1e-7


def membership(s: PoissonSampler, steps: int) -> np.ndarray:
    """[steps, N] bool: whether each example is in each step's logical batch."""
    member = np.zeros((steps, s.num_examples), dtype=bool)
    for step in range(steps):
        member[step, s.logical_batch(step)] = True
    return member


def binomial_p_values(counts, trials, p) -> np.ndarray:
    """Two-sided exact p-values of ``counts`` under Binomial(trials, p)."""
    counts = np.asarray(counts)
    tail = np.minimum(stats.binom.cdf(counts, trials, p), stats.binom.sf(counts - 1, trials, p))
    return np.minimum(1.0, 2 * tail)


def assert_binomial(counts, trials, p, alpha, what):
    """Every count is plausible under Binomial(trials, p), at level ``alpha`` shared by all of them."""
    p_values = binomial_p_values(counts, trials, p)
    worst = np.unravel_index(np.argmin(p_values), p_values.shape)
    assert p_values.min() > alpha / p_values.size, (
        f"{what} {worst}: {np.asarray(counts)[worst]} of {trials}, expected {trials * p:.1f} "
        f"(p-value {p_values.min():.2e}, needs > {alpha / p_values.size:.1e})")


def disjoint_pairs(length: int, lag: int) -> np.ndarray:
    """Start positions t of pairs (t, t + lag) in range(length) that share no position:
    t with t // lag even. Pairs that share nothing are independent under the
    Poisson model, so counts over them are exactly binomial."""
    starts = np.arange(length - lag)
    return starts[(starts // lag) % 2 == 0]


# A small population over many steps: every pair of examples and every example
# is tested on its own. 20 000 steps of 40 examples take ~0.4 s to draw.
SMALL_N, SMALL_Q, SMALL_STEPS = 40, 0.25, 20_000


@pytest.fixture(scope="module")
def small_membership() -> np.ndarray:
    return membership(sampler(n=SMALL_N, q=SMALL_Q, seed=11), SMALL_STEPS)


def test_examples_join_a_step_independently_of_each_other(small_membership):
    """Co-membership of every pair of examples in a step ~ Binomial(T, q^2).
    A contiguous block (or any batch of neighbours) puts neighbours together
    with probability ~q instead: 4 times the expected count here."""
    counts = small_membership.T.astype(np.int64) @ small_membership.astype(np.int64)
    upper = np.triu_indices(SMALL_N, k=1)  # the 780 pairs i < j
    assert_binomial(counts[upper], SMALL_STEPS, SMALL_Q ** 2, FAMILY_ALPHA, "examples (i, j) together")


@pytest.mark.parametrize("lag", [1, 2, 7])
def test_examples_join_steps_independently_of_earlier_steps(small_membership, lag):
    """Example i in step t and example j in step t + lag (every i, j, i = j
    included) ~ Binomial(pairs of steps, q^2): no step's batch is derived from
    an earlier one (repeated, shifted, or its complement)."""
    first = disjoint_pairs(SMALL_STEPS, lag)
    counts = small_membership[first].T.astype(np.int64) @ small_membership[first + lag].astype(np.int64)
    assert_binomial(counts, first.size, SMALL_Q ** 2, FAMILY_ALPHA / 3, f"example i at t, j at t+{lag}")


def test_every_example_joins_at_rate_q(small_membership):
    """Each example's number of steps ~ Binomial(T, q): no example is left out
    or favoured (an off-by-one range, a block that does not wrap around)."""
    assert_binomial(small_membership.sum(0), SMALL_STEPS, SMALL_Q, FAMILY_ALPHA, "example")


def test_batch_sizes_follow_binomial_n_q(small_membership):
    """The histogram of batch sizes against Binomial(N, q): Pearson's
    chi-square over bins expecting >= 50 steps each (tails merged), where its
    chi-square approximation is accurate. A fixed size, Poisson(N q) or
    Binomial(N - 1, q) fail it."""
    sizes = small_membership.sum(1)
    expected = stats.binom.pmf(np.arange(SMALL_N + 1), SMALL_N, SMALL_Q) * SMALL_STEPS
    edges = np.flatnonzero(expected >= 50)
    low, high = edges[0], edges[-1]
    observed = np.bincount(np.clip(sizes, low, high), minlength=SMALL_N + 1)[low:high + 1]
    merged = expected[low:high + 1].copy()
    merged[0], merged[-1] = expected[:low + 1].sum(), expected[high:].sum()
    statistic = ((observed - merged) ** 2 / merged).sum()
    assert statistic < stats.chi2.isf(FAMILY_ALPHA, merged.size - 1), (observed, merged.round(1))


@pytest.mark.parametrize("n, q", [
    (100_000, 0.01),  # a draw of 1% of a large population, like DP-Cap's 0.56%
    (20_000, 0.25),  # a quarter: numpy's choice switches algorithm above 5% of 10 000+
])
def test_large_population_membership_is_independent(n, q):
    """Where every pair cannot be tested: co-membership summed over disjoint
    pairs of neighbours (i, i+1), of far examples (i, i + N/2) and of a random
    matching ~ Binomial(T N / 2, q^2) exactly; the total size ~ Binomial(T N, q);
    and the sizes' dispersion, sum (b_t - N q)^2 / (N q (1 - q)), ~ chi-square(T)."""
    steps = 200
    member = membership(sampler(n=n, q=q, seed=5), steps)
    neighbours = disjoint_pairs(n, 1)
    far = np.arange(n // 2)
    matching = np.random.default_rng(0).permutation(n).reshape(2, -1)
    counts = [
        (member[:, neighbours] & member[:, neighbours + 1]).sum(),
        (member[:, far] & member[:, far + n // 2]).sum(),
        (member[:, matching[0]] & member[:, matching[1]]).sum(),
    ]
    assert_binomial(counts, steps * n // 2, q * q, FAMILY_ALPHA / 2, "pairs together (neighbours, far, random)")
    sizes = member.sum(1)
    assert_binomial([sizes.sum()], steps * n, q, FAMILY_ALPHA / 4, "total batch size")
    dispersion = ((sizes - n * q) ** 2).sum() / (n * q * (1 - q))
    assert stats.chi2.sf(dispersion, steps) > FAMILY_ALPHA / 8 and stats.chi2.cdf(dispersion, steps) > FAMILY_ALPHA / 8


def test_empty_and_full_steps():
    assert sampler(q=0.0).logical_batch(0).size == 0
    assert sampler(q=0.0).step_batches(0) == []
    assert np.array_equal(sampler(n=50, q=1.0).logical_batch(0), np.arange(50))


def test_dpcap_scale_draw_is_a_poisson_batch():
    n, b = 233_804_767, 1_310_720
    batch = PoissonSampler(n, b / n, 0, max_physical_batch=128).logical_batch(7)
    assert abs(batch.size - b) < 5 * np.sqrt(b)
    assert np.unique(batch).size == batch.size and 0 <= batch[0] and batch[-1] < n


@pytest.mark.parametrize("n, q, world, micro", [
    (10_000, 0.01, 1, 16), (10_000, 0.01, 3, 16), (1_000, 0.5, 4, 7), (40, 0.05, 8, 4), (10, 0.3, 5, 1),
])
def test_ranks_split_the_logical_batch_into_equal_counts_of_bounded_micro_batches(n, q, world, micro):
    ranks = [sampler(n=n, q=q, seed=2, world=world, rank=r, micro=micro) for r in range(world)]
    for step in range(10):
        logical = ranks[0].logical_batch(step)
        per_rank = [r.step_batches(step) for r in ranks]
        counts = {len(batches) for batches in per_rank}
        assert counts == {ranks[0].num_micro_batches(logical.size)}  # the same on every rank
        flat = [i for batches in per_rank for mb in batches for i in mb]
        assert sorted(flat) == logical.tolist()  # disjoint, and the union is the logical batch
        assert all(len(mb) <= micro for batches in per_rank for mb in batches)
        assert all(isinstance(i, int) for i in flat)
        sizes = [sum(map(len, batches)) for batches in per_rank]
        assert max(sizes) - min(sizes) <= 1
        if logical.size:
            # as few micro-batches as the busiest rank needs
            assert len(per_rank[0]) == -(-max(sizes) // micro)


def test_repeated_calls_do_not_change_the_batch():
    s = sampler(q=0.1, world=2, rank=1)
    first = s.step_batches(4)
    s.logical_batch(5)
    assert s.step_batches(4) == first
    with pytest.raises(ValueError):
        s.logical_batch(4)[0] = 1  # read-only: the cached batch cannot be corrupted


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=0), "num_examples"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(seed=-1), "seed"),
    (dict(world_size=0), "world_size"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(max_physical_batch=0), "max_physical_batch"),
])
def test_bad_arguments_say_what_to_change(kwargs, match):
    args = dict(num_examples=10, sample_rate=0.1, seed=0, world_size=1, rank=0, max_physical_batch=4) | kwargs
    with pytest.raises(ValueError, match=match):
        PoissonSampler(**args)
    with pytest.raises(ValueError, match="step"):
        sampler().logical_batch(-1)
