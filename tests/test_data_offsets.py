"""Offset tables: written with the shards, used for random access, ignored when they do not fit."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from data.decode import BadSample
from data.offset_tables import load_offset_table, main, offsets_path, scan_sample_offsets, write_offset_table
from data.shards import ShardLimits, write_shards
from data.sources import Example
from data.tar_index import TarIndex

COUNT = 7


@pytest.fixture
def shard(tmp_path):
    examples = (Example(Image.new("RGB", (8, 8), (i, i, i)), f"caption {i}") for i in range(COUNT))
    index_path = write_shards(examples, tmp_path, ShardLimits(max_count=COUNT))
    return index_path, tmp_path / "shard-000000.tar"


def _captions(index_path):
    index = TarIndex(index_path)
    return [index.members(i)["txt"].decode() for i in range(len(index))]


def test_writer_saves_the_offsets_a_scan_finds(shard):
    index_path, path = shard
    table = load_offset_table(path, COUNT)
    assert table is not None and np.array_equal(table, scan_sample_offsets(path)) and len(table) == COUNT
    assert _captions(index_path) == [f"caption {i}" for i in range(COUNT)]


def test_reader_uses_the_table_and_a_wrong_one_only_mislabels(shard):
    index_path, path = shard
    offsets = scan_sample_offsets(path)
    write_offset_table(path, np.append(offsets[1:], offsets[-1] + 100))  # every sample points to the next
    index = TarIndex(index_path)
    assert [index.members(i)["txt"].decode() for i in range(COUNT - 1)] == [f"caption {i}" for i in range(1, COUNT)]
    with pytest.raises(BadSample):
        index.members(COUNT - 1)  # points inside a member: an unreadable sample, not a crash


@pytest.mark.parametrize("damage", ["stale", "short", "decreasing", "garbage"])
def test_tables_that_do_not_fit_the_shard_are_ignored(shard, damage):
    index_path, path = shard
    table_path = offsets_path(path)
    if damage == "stale":  # the shard changed size after its table was written
        path.write_bytes(path.read_bytes() + bytes(10240))
    elif damage == "short":
        table_path.write_bytes(table_path.read_bytes()[:-8])
    elif damage == "decreasing":
        write_offset_table(path, scan_sample_offsets(path)[::-1])
    else:
        table_path.write_bytes(os.urandom((COUNT + 1) * 8))
    assert table_path.stat().st_size == (COUNT + 1) * 8 or damage == "short"
    assert load_offset_table(path, COUNT) is None
    assert _captions(index_path) == [f"caption {i}" for i in range(COUNT)]  # the reader scanned instead


def test_cli_writes_tables_for_shards_from_other_tools(shard, capsys):
    index_path, path = shard
    offsets_path(path).unlink()
    main([str(index_path)])
    assert np.array_equal(load_offset_table(path, COUNT), scan_sample_offsets(path))
    offsets_path(path).unlink()
    spec = json.loads(index_path.read_text())
    spec["shardlist"][0]["nsamples"] = COUNT + 1
    index_path.write_text(json.dumps(spec))
    main([str(index_path)])
    assert "index says 8" in capsys.readouterr().out and not offsets_path(path).exists()
