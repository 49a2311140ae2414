"""The offset table of a shard set: written with the shards, memory-mapped for random access,
ignored (shard by shard) when it does not fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.decode import BadSample
from data.index_shards import main
from data.offset_tables import read_blocks, scan_sample_offsets, table_path, write_table
from data.shards import ShardLimits, write_shards
from data.sources import Example
from data.tar_index import TarIndex
from tests.helpers.samples import index_captions

COUNT = 7  # per shard, two shards
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def shards(tmp_path):
    examples = (Example(Image.new("RGB", (8, 8), (i, i, i)), f"caption {i}") for i in range(2 * COUNT))
    index_path = write_shards(examples, tmp_path, ShardLimits(max_count=COUNT))
    return index_path, [tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"]


def test_writer_saves_the_offsets_a_scan_finds_and_the_reader_maps_them(shards):
    index_path, paths = shards
    blocks = list(read_blocks(table_path(index_path), [COUNT, COUNT]))
    for (offsets, size), path in zip(blocks, paths):
        assert np.array_equal(offsets, scan_sample_offsets(path)) and size == path.stat().st_size
    index = TarIndex(index_path)
    assert [index.members(i)["txt"].decode() for i in range(2 * COUNT)] == [f"caption {i}" for i in range(2 * COUNT)]
    # one shared mapping of the table in this process, not a private copy
    maps = Path("/proc/self/smaps").read_text()
    assert str(table_path(index_path).resolve()) in maps


def test_reader_uses_the_table_and_a_wrong_one_only_mislabels(shards):
    index_path, paths = shards
    first = scan_sample_offsets(paths[0])
    shifted = np.append(first[1:], first[-1] + 100)  # every sample of shard 0 points to the next
    write_table(table_path(index_path), [(shifted, paths[0].stat().st_size),
                                         (scan_sample_offsets(paths[1]), paths[1].stat().st_size)])
    index = TarIndex(index_path)
    assert [index.members(i)["txt"].decode() for i in range(COUNT - 1)] == [f"caption {i}" for i in range(1, COUNT)]
    with pytest.raises(BadSample):
        index.members(COUNT - 1)  # points inside a member: an unreadable sample, not a crash
    assert index.members(COUNT)["txt"] == b"caption 7"  # shard 1's block is right


@pytest.mark.parametrize("damage", ["stale", "decreasing", "short", "garbage"])
def test_tables_that_do_not_fit_are_ignored(shards, damage, caplog):
    index_path, paths = shards
    table = table_path(index_path)
    blocks = list(read_blocks(table, [COUNT, COUNT]))
    if damage == "stale":  # shard 0 changed size after the table was written
        paths[0].write_bytes(paths[0].read_bytes() + bytes(10240))
    elif damage == "decreasing":
        write_table(table, [(blocks[0][0][::-1], blocks[0][1]), blocks[1]])
    elif damage == "short":
        table.write_bytes(table.read_bytes()[:-8])
    else:
        table.write_bytes(os.urandom(table.stat().st_size))
    with caplog.at_level("WARNING"):
        assert index_captions(TarIndex(index_path)) == [f"caption {i}" for i in range(2 * COUNT)]  # scanned instead
    assert "ignoring" in caplog.text


def test_cli_indexes_an_index_without_a_table(shards):
    """``python -m data.index_shards`` (the documented command, run as a user runs it) writes the
    table the shard writer wrote."""
    index_path, paths = shards
    table = table_path(index_path)
    expected = table.read_bytes()
    table.unlink()
    done = subprocess.run([sys.executable, "-m", "data.index_shards", str(index_path), "--processes", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert table.read_bytes() == expected
    assert "14 samples" in done.stdout
    # an index that claims more samples than a shard holds: that shard gets no table (scanned, and
    # its missing samples skipped when read); the others keep theirs
    table.unlink()
    spec = json.loads(index_path.read_text())
    spec["shardlist"][0]["nsamples"] = COUNT + 1
    index_path.write_text(json.dumps(spec))
    main([str(index_path)])
    blocks = list(read_blocks(table, [COUNT + 1, COUNT]))
    assert blocks[0][1] == -1 and np.array_equal(blocks[1][0], scan_sample_offsets(paths[1]))
