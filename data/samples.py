"""`read_samples`: the good (image, caption) pairs of some tar shards, for checks from outside."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from PIL import Image

from data.decode import BadSample, SkipCounter, decode_sample
from data.tar_samples import iter_samples


class SampleReader:
    """Iterates (RGB PIL image, caption) over every good sample of `paths`, in order.

    Bad samples are skipped; `skipped` is how many so far and
    `skipped_reasons` counts them by reason (an unreadable or truncated tar
    counts once, under its own reason).
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = [str(p) for p in paths]
        self.skipped_reasons = SkipCounter()

    @property
    def skipped(self) -> int:
        return self.skipped_reasons.total

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        for key, members in iter_samples(self.paths, self.skipped_reasons):
            try:
                yield decode_sample(members)
            except BadSample as bad:
                self.skipped_reasons.record(bad.reason, key)


def read_samples(paths: Sequence[str]) -> SampleReader:
    """Good samples of the tar files `paths`; see `SampleReader`."""
    if isinstance(paths, (str, os.PathLike)):
        raise ValueError("read_samples takes a list of tar paths; wrap a single path in a list")
    return SampleReader(paths)
