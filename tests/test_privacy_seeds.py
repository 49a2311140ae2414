"""privacy.seeds: the one seed derivation (bit for bit the formula every seeded stream
was drawn with, so checkpoints and recorded runs keep their seeds) and the secret draw."""

import numpy as np

from privacy.audit.training import _seeds
from privacy.seeds import derived_seed, derived_seeds, draw_secret_seed


def test_derived_seed_is_the_seed_sequence_word_below_2_63():
    for words in [(0,), (7, 1), (1, 2, 3, 4), (2**62 + 5, 0, 9)]:
        expected = int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0]) & (2**63 - 1)
        assert derived_seed(*words) == expected
    assert derived_seed(7, 1) == 6635463128224577688  # pinned: a change of formula moves every resumed run's noise


def test_derived_seeds_extend_derived_seed_and_keep_the_audits_run_seeds():
    first, second = derived_seeds(5, count=2)
    assert first == derived_seed(5) and second != first and second < 2**63
    assert _seeds(5) == (3408106289409078375, 4464650224815488352)  # the audit's recorded runs


def test_secret_seeds_fit_int64_and_differ():
    draws = {draw_secret_seed() for _ in range(64)}
    assert len(draws) == 64 and all(0 <= s < 2**63 for s in draws)
