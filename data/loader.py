"""The training reader: Poisson batches by random access into tar shards.

It yields `Batch(images [b, 3, H, W] float, tokens [b, text_length] long)`,
skips bad samples (so a batch can be smaller than asked), counts them in
`skipped_reasons`, and has
`state_dict()` / `load_state_dict()` such that a new reader loaded with a state
yields exactly what the saved one would have yielded next. The state is per
rank: save each rank's reader state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from data.decode import BadSample, SkipCounter, decode_sample
from data.tar_index import TarIndex
from data.tar_samples import RawSample
from data.transform import ImageTextTransform


# what a skipped sample of the Poisson reader is called in the log: which examples a step
# drew is as secret as the sampling seed, so no index (nor its tar key) is ever logged
SAMPLED = "(a sampled example)"


class Batch(NamedTuple):
    images: torch.Tensor  # [b, 3, img_size, img_size] float32, normalised
    tokens: torch.Tensor  # [b, text_length] int64


class BatchSource(Protocol):
    """What the Poisson reader needs from privacy.sampling.PoissonSampler."""

    def step_batches(self, step: int) -> list[list[int]]: ...


@dataclass
class _Tagged:
    """A worker's output: a batch (or None) plus which micro-batch it is and what it skipped."""

    batch: Batch | None
    skipped: SkipCounter
    step: int = 0
    micro: int = 0
    num_micro: int = 0

    def pin_memory(self) -> _Tagged:
        """Called by DataLoader(pin_memory=True) in its pinning thread: page-locked
        tensors let the trainer's copy to the GPU run asynchronously."""
        if self.batch is None:
            return self
        return replace(self, batch=Batch(self.batch.images.pin_memory(), self.batch.tokens.pin_memory()))


def _decode_all(raw: list[RawSample], transform: ImageTextTransform, skipped: SkipCounter,
                words: list[tuple[int, ...]], captions: bool) -> Batch:
    """The good samples of `raw` as one batch, possibly of zero examples; `words[i]` names
    sample i for the transform's augmentation (the same whenever it is read again);
    without `captions` a sample needs only its image. A sample's key is what a log line
    about it says."""
    images, tokens = [], []
    for (key, members), sample_words in zip(raw, words, strict=True):
        try:
            image, caption = decode_sample(members, draft_size=transform.decode_size, caption_required=captions)
            pixels, ids = transform(image, caption, sample_words)
        except BadSample as bad:
            skipped.record(bad.reason, str(key))
            continue
        images.append(pixels)
        tokens.append(ids)
    if not images:
        size = transform.img_size
        return Batch(torch.zeros(0, 3, size, size), torch.zeros(0, transform.text_length, dtype=torch.long))
    return Batch(torch.stack(images), torch.stack(tokens))


def _as_is(item):
    """Collation happens in the dataset (bad samples are dropped there)."""
    return item


def _loader(dataset, num_workers: int, **kwargs) -> DataLoader:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(dataset, num_workers=num_workers, collate_fn=_as_is, **kwargs)


@dataclass(frozen=True)
class _Request:
    step: int
    micro: int
    num_micro: int
    index: int | None  # None: placeholder for an empty micro-batch or step


class _IndexedSamples(Dataset):
    def __init__(self, index: TarIndex, transform: ImageTextTransform, captions: bool):
        self.index, self.transform, self.captions = index, transform, captions

    def __getitems__(self, requests: list[_Request]) -> _Tagged:
        """One micro-batch, decoded in the worker."""
        first, skipped = requests[0], SkipCounter()
        raw, words = [], []
        for request in requests:
            if request.index is None:
                continue
            # a log line names neither the index nor its shard: which samples were drawn is secret
            try:
                raw.append((SAMPLED, self.index.members(request.index)))
                words.append((request.step, request.index))
            except BadSample as bad:
                skipped.record(bad.reason, SAMPLED)
        batch = _decode_all(raw, self.transform, skipped, words, self.captions)
        return _Tagged(batch, skipped, step=first.step, micro=first.micro, num_micro=first.num_micro)


class _StepPlan:
    """Batch sampler: the micro-batches of steps start, start+1, ... as request lists."""

    def __init__(self, source: BatchSource, start: int, num_examples: int):
        self.source, self.start, self.num_examples = source, start, num_examples

    def __iter__(self) -> Iterator[list[_Request]]:
        step = self.start
        while True:
            micro_batches = [list(b) for b in self.source.step_batches(step)]
            if not micro_batches:
                yield [_Request(step, 0, 0, None)]
            for micro, indices in enumerate(micro_batches):
                bad = [i for i in indices if not 0 <= i < self.num_examples]
                if bad:
                    raise ValueError(
                        f"batch source gave indices {bad[:5]} outside [0, {self.num_examples}): "
                        "build the sampler with num_examples=reader.num_examples"
                    )
                requests = [_Request(step, micro, len(micro_batches), int(i)) for i in indices]
                yield requests or [_Request(step, micro, len(micro_batches), None)]
            step += 1


class PoissonReader:
    """Random-access reader for DP training with true Poisson batches.

    `batch_source.step_batches(step)` (privacy.sampling.PoissonSampler, built
    with `num_examples=reader.num_examples`) says which examples this rank
    reads at each logical step, already split into micro-batches;
    `micro_batches(step)` yields them decoded, in order: exactly one batch per
    micro-batch, so ranks stay in lockstep, even when it has zero examples
    (an empty micro-batch, or all its samples bad). Steps are read in
    increasing order; worker processes prefetch across step boundaries. The
    state is the next step to read. `index` is a wids index.json or a TarIndex;
    `captions=False` (ViP) reads samples that are an image alone.
    """

    def __init__(
        self,
        index: str | Path | TarIndex,
        batch_source: BatchSource,
        transform: ImageTextTransform,
        *,
        num_workers: int = 0,
        worker_timeout_s: float = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        captions: bool = True,
    ):
        self.index = index if isinstance(index, TarIndex) else TarIndex(index)
        self.captions = captions
        self.batch_source = batch_source
        self.transform = transform
        self.num_workers = num_workers
        self.worker_timeout_s = worker_timeout_s  # with workers: the longest wait for one batch (0: none)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory  # for a GPU: page-locked batches, copied asynchronously
        self.next_step = 0
        self.skipped_reasons = SkipCounter()
        self._stream: Iterator[_Tagged] | None = None
        self._stream_step = -1  # the step at whose start the live stream stands, -1: none

    @property
    def num_examples(self) -> int:
        return len(self.index)

    @property
    def skipped(self) -> int:
        return self.skipped_reasons.total

    def micro_batches(self, step: int) -> Iterator[Batch]:
        """The decoded micro-batches of logical `step` (none for an empty step)."""
        if self._stream is None or self._stream_step != step:
            self._stream = self._open(step)
        self._stream_step = -1  # mid-step until its last micro-batch: a caller that stops early gets a fresh stream
        skipped = SkipCounter()  # counted once the step is read whole: a restarted step is not counted twice
        while True:
            tagged = next(self._stream)
            if tagged.step != step:
                raise RuntimeError(f"reader out of order: expected step {step}, got {tagged.step}")
            skipped.update(tagged.skipped)
            last = tagged.micro + 1 >= tagged.num_micro  # an empty step has num_micro 0
            if last:
                self.skipped_reasons.update(skipped)
                self._stream_step, self.next_step = step + 1, step + 1
            if tagged.num_micro:
                yield tagged.batch
            if last:
                return

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "skipped_reasons": dict(self.skipped_reasons)}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])
        self.skipped_reasons = SkipCounter(state.get("skipped_reasons", {}))
        self._stream, self._stream_step = None, -1

    def _open(self, step: int) -> Iterator[_Tagged]:
        extra = {"prefetch_factor": self.prefetch_factor, "timeout": self.worker_timeout_s} if self.num_workers else {}
        loader = _loader(
            _IndexedSamples(self.index, self.transform, self.captions),
            self.num_workers,
            batch_sampler=_StepPlan(self.batch_source, step, self.num_examples),
            pin_memory=self.pin_memory,
            **extra,
        )
        return iter(loader)
