"""Shard writer: folder, table and synthetic sources, limits, a wids-readable index."""

import json
import tarfile

import pytest
import wids
from wids.wids import compute_file_md5sum, compute_num_samples

from data import read_samples
from data.decode import SkipCounter
from data.shards import ShardLimits, write_shards
from data.sources import folder_examples, synthetic_examples, table_examples
from data.write_shards import main
from tests.helpers.samples import random_image


def _shard_paths(index_path):
    index = json.loads(index_path.read_text())
    return [str(index_path.parent / s["url"]) for s in index["shardlist"]], index


def test_folder_source_pairs_images_with_captions_and_skips_the_rest(tmp_path):
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    random_image(0, size=24).save(src / "a.jpg")
    (src / "a.txt").write_text("first caption")
    random_image(1, size=24).save(src / "sub" / "b.png")
    (src / "sub" / "b.txt").write_text("second caption\n")
    random_image(2, size=24).save(src / "c.jpg")  # no caption
    (src / "d.jpg").write_bytes(b"not an image")
    (src / "d.txt").write_text("broken image")
    skips = SkipCounter()
    index_path = write_shards(folder_examples(src, skips), tmp_path / "out")
    paths, _ = _shard_paths(index_path)
    reader = read_samples(paths)
    samples = list(reader)
    assert [caption for _, caption in samples] == ["first caption", "second caption"]
    assert samples[0][0].size == (24, 24) and reader.skipped == 0
    assert skips == {"missing caption": 1, "undecodable image": 1}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_table_sources_with_configurable_columns(tmp_path, suffix):
    rows = [("img0.png", "a caption, with comma"), ("nested/img1.jpg", "another one"), ("missing.jpg", "gone")]
    (tmp_path / "nested").mkdir()
    for i, (name, _) in enumerate(rows[:2]):
        random_image(i, size=24).save(tmp_path / name)
    table = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        table.write_text("".join(json.dumps({"file": n, "text": c}) + "\n" for n, c in rows) + "not json\n")
    else:
        delimiter = "," if suffix == ".csv" else "\t"
        lines = [f"file{delimiter}text"] + [f'{n}{delimiter}"{c}"' for n, c in rows]
        table.write_text("\n".join(lines) + "\n")
    skips = SkipCounter()
    index_path = write_shards(table_examples(table, skips, "file", "text"), tmp_path / "out")
    paths, _ = _shard_paths(index_path)
    assert [c for _, c in read_samples(paths)] == ["a caption, with comma", "another one"]
    assert skips["missing image file"] == 1
    with pytest.raises(ValueError, match=".csv, .tsv or .jsonl"):
        next(table_examples(tmp_path / "pairs.xlsx", skips))


def test_csv_with_byte_order_mark_and_default_columns(tmp_path):
    random_image(0, size=24).save(tmp_path / "a.png")
    table = tmp_path / "pairs.csv"
    table.write_bytes("path,caption\na.png,from a spreadsheet\n".encode("utf-8-sig"))
    skips = SkipCounter()
    examples = list(table_examples(table, skips))
    assert [e.caption for e in examples] == ["from a spreadsheet"] and not skips


def test_synthetic_shards_respect_count_limit_and_index_reads_with_wids(tmp_path):
    index_path = write_shards(synthetic_examples(23, seed=0, size=32), tmp_path, ShardLimits(max_count=10))
    paths, index = _shard_paths(index_path)
    assert index["wids_version"] == 1 and [s["nsamples"] for s in index["shardlist"]] == [10, 10, 3]
    shard_files = [f"shard-00000{i}.tar" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "index.offsets"] + shard_files
    for path, shard in zip(paths, index["shardlist"]):  # the figures `widsindex create` would write
        assert shard["nsamples"] == compute_num_samples(path) and shard["md5sum"] == compute_file_md5sum(path)
    ours = list(read_samples(paths))
    dataset = wids.ShardListDataset(str(index_path), localname=lambda url: url, transformations=[])
    assert len(dataset) == 23
    for i in (0, 9, 10, 22):
        sample = dataset[i]
        assert sample[".txt"].read().decode() == ours[i][1]
        assert json.loads(sample[".json"].read())["index"] == i
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]


def test_size_limit_bounds_every_shard_file(tmp_path):
    examples = synthetic_examples(30, seed=1, size=96)
    index_path = write_shards(examples, tmp_path, ShardLimits(max_size=40 * 1024, jpeg_quality=95))
    _, index = _shard_paths(index_path)
    assert len(index["shardlist"]) > 2 and sum(s["nsamples"] for s in index["shardlist"]) == 30
    for shard in index["shardlist"]:
        size = (tmp_path / shard["url"]).stat().st_size
        assert size == shard["filesize"] and size <= 40 * 1024


def test_cli_writes_synthetic_shards(tmp_path, capsys):
    main([str(tmp_path), "--synthetic", "12", "--seed", "4", "--size", "20", "--max-count", "5", "--split", "heldout"])
    assert "index" in capsys.readouterr().out
    paths, index = _shard_paths(tmp_path / "index.json")
    samples = list(read_samples(paths))
    assert len(samples) == 12 and len(paths) == 3 and samples[0][0].size == (20, 20)


def test_bad_limits_and_empty_sources_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_count"):
        ShardLimits(max_count=0)
    with pytest.raises(ValueError, match="no examples"):
        write_shards(iter(()), tmp_path)


def test_cli_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    (tmp_path / "old-000099.tar").write_bytes(b"left by an earlier run")
    with pytest.raises(SystemExit, match="is not empty"):
        main([str(tmp_path), "--synthetic", "3"])
    assert not (tmp_path / "index.json").exists()
    main([str(tmp_path), "--synthetic", "3", "--force"])
    paths, _ = _shard_paths(tmp_path / "index.json")
    assert len(list(read_samples(paths))) == 3
