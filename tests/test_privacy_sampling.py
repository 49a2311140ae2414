"""privacy.sampling.PoissonSampler: distribution, determinism, the split across ranks."""

import numpy as np
import pytest

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
