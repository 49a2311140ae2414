"""Readers: Poisson reads exactly the sampled indices, streaming splits disjointly, both resume exactly."""

import functools
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data.loader import PoissonReader
from data.shards import ShardLimits, write_shards
from data.sources import Example
from data.decode import BadSample
from data.tar_index import TarIndex
from data.transform import IMAGENET_MEAN, IMAGENET_STD, ImageTextTransform
from tests.helpers.samples import batch_captions, byte_tokens

TEXT_LENGTH = 12
NUM_EXAMPLES = 40


def _examples():
    for i in range(NUM_EXAMPLES):
        pixels = np.full((12, 12, 3), (i * 6) % 256, dtype=np.uint8)
        yield Example(Image.fromarray(pixels), f"s{i}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    index = write_shards(_examples(), out, ShardLimits(max_count=7))  # 6 shards: 7,7,7,7,7,5
    return index, sorted(str(p) for p in out.glob("*.tar"))


TRANSFORM = ImageTextTransform(8, functools.partial(byte_tokens, length=TEXT_LENGTH), TEXT_LENGTH)


class Bernoulli:
    """Stand-in for privacy.sampling.PoissonSampler: each example joins a step with probability q."""

    def __init__(self, q=0.3, seed=5, micro=4):
        self.q, self.seed, self.micro = q, seed, micro

    def step_batches(self, step):
        if step == 2:
            return []  # an empty logical step is valid
        chosen = np.flatnonzero(np.random.default_rng([self.seed, step]).random(NUM_EXAMPLES) < self.q).tolist()
        micro_batches = [chosen[i : i + self.micro] for i in range(0, len(chosen), self.micro)]
        if step == 3:
            micro_batches.append([])  # a rank with fewer examples pads with empty micro-batches
        return micro_batches


def _read_steps(reader, steps):
    return {step: [b for b in reader.micro_batches(step)] for step in steps}


def test_transform_normalises_and_checks_token_length():
    image = Image.new("RGB", (20, 10), (255, 0, 128))
    pixels, tokens = TRANSFORM(image, "hi")
    assert pixels.shape == (3, 8, 8) and tokens.dtype == torch.long and tokens.tolist()[:3] == [104, 105, 0]
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(pixels[:, 4, 4], expected, atol=1e-5)
    with pytest.raises(ValueError, match="text_length"):
        ImageTextTransform(8, lambda s: [1, 2], TEXT_LENGTH)(image, "hi")


def test_poisson_reader_yields_exactly_the_sampled_examples(shards):
    index, _ = shards
    source = Bernoulli()
    reader = PoissonReader(index, source, TRANSFORM)
    assert reader.num_examples == NUM_EXAMPLES == len(TarIndex(index))
    for step in range(5):
        batches = list(reader.micro_batches(step))
        expected = source.step_batches(step)
        assert [batch_captions(b) for b in batches] == [[f"s{i}" for i in micro] for micro in expected]
        for batch, micro in zip(batches, expected):  # pixels belong to the same examples
            grey = torch.tensor([((i * 6) % 256) / 255 for i in micro])
            assert torch.allclose(batch.images[:, 0, 0, 0], (grey - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5)
        assert all(b.images.shape[1:] == (3, 8, 8) and b.tokens.shape[1] == TEXT_LENGTH for b in batches)
        assert reader.state_dict()["next_step"] == step + 1
    assert reader.skipped == 0


def test_poisson_reader_is_deterministic_with_workers_and_resumes_exactly(shards):
    index, _ = shards
    reference = _read_steps(PoissonReader(index, Bernoulli(), TRANSFORM), range(6))
    with_workers = PoissonReader(index, Bernoulli(), TRANSFORM, num_workers=2)
    first = _read_steps(with_workers, range(3))
    state = with_workers.state_dict()
    resumed = PoissonReader(index, Bernoulli(), TRANSFORM, num_workers=2)
    resumed.load_state_dict(state)
    assert resumed.next_step == 3
    rest = _read_steps(resumed, range(3, 6))
    assert reference[2] == [] and len(reference[0]) > 1
    abandoned = PoissonReader(index, Bernoulli(), TRANSFORM)
    next(abandoned.micro_batches(0))  # stop mid-step: asking for the step again restarts it
    assert [batch_captions(b) for b in abandoned.micro_batches(0)] == [batch_captions(b) for b in reference[0]]
    for step, batches in {**first, **rest}.items():
        assert len(batches) == len(reference[step])
        for got, want in zip(batches, reference[step]):
            assert torch.equal(got.images, want.images) and torch.equal(got.tokens, want.tokens)


def test_tar_index_bounds_open_files_and_reports_vanished_shards(tmp_path):
    index_path = write_shards(_examples(), tmp_path, ShardLimits(max_count=7))
    index = TarIndex(index_path, max_open_files=2)
    open_before = len(os.listdir("/proc/self/fd"))
    order = np.random.default_rng(0).permutation(NUM_EXAMPLES).tolist()
    captions = {i: index.members(i)["txt"].decode() for i in order}
    assert captions == {i: f"s{i}" for i in range(NUM_EXAMPLES)}
    assert len(os.listdir("/proc/self/fd")) - open_before <= 2 + 1  # + the offset table's one mapping
    index.members(0), index.members(7)  # shards 0 and 1 are now the open ones
    for shard in tmp_path.glob("*.tar"):
        shard.unlink()
    assert index.members(0)["txt"] == b"s0"
    with pytest.raises(BadSample, match="unreadable shard"):
        index.members(14)
    with pytest.raises(ValueError, match="max_open_files"):
        TarIndex(index_path, max_open_files=0)


def test_tar_index_reads_long_pax_names_and_refuses_duplicate_members(tmp_path):
    long_key = "deep/" * 30 + "sample"  # over 100 characters: stored with a pax extended header
    members = [(f"{long_key}.txt", b"long"), (f"{long_key}.cls", b"7"), ("dup.txt", b"a"), ("dup.txt", b"b"),
               ("last.txt", b"last")]
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "index.json").write_text(json.dumps({"shardlist": [{"url": "s.tar", "nsamples": 3}]}))
    index = TarIndex(tmp_path / "index.json")
    assert index.members(0) == {"txt": b"long"} and index.members(2) == {"txt": b"last"}
    with pytest.raises(BadSample, match="duplicate member"):
        index.members(1)


def test_poisson_reader_refuses_indices_outside_the_dataset(shards):
    index, _ = shards

    class OutOfRange:
        def step_batches(self, step):
            return [[0, NUM_EXAMPLES]]

    with pytest.raises(ValueError, match="num_examples"):
        list(PoissonReader(index, OutOfRange(), TRANSFORM).micro_batches(0))


def test_pinning_a_batch_keeps_where_it_came_from(monkeypatch):
    """DataLoader(pin_memory=True) pins what the workers send through this method (it
    needs a GPU, so page-locking itself is stood in for here)."""
    from data.decode import SkipCounter
    from data.loader import Batch, _Tagged

    pinned = []

    def pin(tensor, *args, **kwargs):
        pinned.append(tensor)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batch = Batch(torch.rand(2, 3, 8, 8), torch.ones(2, TEXT_LENGTH, dtype=torch.long))
    tagged = _Tagged(batch, SkipCounter({"missing image": 1}), step=4, micro=2, num_micro=3)
    out = tagged.pin_memory()
    assert (out.step, out.micro, out.num_micro) == (4, 2, 3) and out.skipped == tagged.skipped
    assert torch.equal(out.batch.images, batch.images) and torch.equal(out.batch.tokens, batch.tokens)
    assert [t is u for t, u in zip(pinned, batch)] == [True, True]
    empty = _Tagged(None, SkipCounter())
    assert empty.pin_memory() is empty
