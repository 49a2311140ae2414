"""Seeds: one derivation of a seed from words, one draw of a secret seed.

Every seeded stream of the project that is derived from other numbers (a step's
noise generator from the secret seed, the stream and the step; the sampling seed
from the secret seed; a resumed branch's seeds from their salt; an audit run's
seeds) comes from :func:`derived_seed`, so two uses of the same words get the
same seed and different words independent ones (numpy's ``SeedSequence`` hashes
them). Seeds are kept below 2**63 so they fit a signed 64-bit integer
(``torch.Generator.manual_seed``, an int64 tensor broadcast between ranks).

:func:`draw_secret_seed` is the one draw of a seed nobody may know (the noise
and the Poisson sampling of a private run): from the operating system's
randomness, never from a seeded generator.

This module lives in ``privacy`` (which imports nothing of the project) so the
engine, the audit and the trainer share it; ``data`` may not import ``privacy``
and needs no derived seed (its generators are seeded directly with word lists).
"""

from __future__ import annotations

import os

import numpy as np

SEED_BITS = 63  # every seed fits a signed 64-bit integer
_SEED_MASK = (1 << SEED_BITS) - 1


def derived_seeds(*words: int, count: int) -> list[int]:
    """``count`` independent seeds (each < 2**63) determined by ``words``, in order; the
    first is :func:`derived_seed` of the same words."""
    state = np.random.SeedSequence(list(words)).generate_state(count, np.uint64)
    return [int(word) & _SEED_MASK for word in state]


def derived_seed(*words: int) -> int:
    """A seed (< 2**63) determined by ``words`` (non-negative ints): equal words, equal
    seeds; any other words, an independent one."""
    return derived_seeds(*words, count=1)[0]


def draw_secret_seed() -> int:
    """A fresh secret seed (< 2**63) from the operating system's randomness (``os.urandom``)."""
    return int.from_bytes(os.urandom(8), "little") & _SEED_MASK
