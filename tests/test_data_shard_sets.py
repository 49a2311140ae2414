"""Shards written by other tools (webdataset.ShardWriter, tarfile in other member orders),
named by a folder, a glob or a brace pattern: indexed once, in parts, cached, read back."""

import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

from data import shard_sets
from data.loader import PoissonReader
from data.offset_tables import scan_sample_offsets, scan_shards
from data.shard_sets import cached_index, index_shard_set, merge_parts, resolve, scan_part
from data.tar_index import TarIndex
from data.transform import ImageTextTransform
from tests.helpers.samples import encoded, index_captions, random_image
from tests.helpers.shards import write_like_img2dataset


def _image(i: int, fmt: str) -> bytes:
    return encoded(random_image(i, size=12), fmt)


def _shard_writer(folder, count: int, per_shard: int) -> list[str]:
    """LAION-style shards as img2dataset writes them; the captions, in order."""
    write_like_img2dataset(folder, ((_image(i, "JPEG"), f"photo {i}", {"url": f"http://x/{i}", "similarity": 0.3})
                                    for i in range(count)), per_shard)
    return [f"photo {i}" for i in range(count)]


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tar_index(found) -> TarIndex:
    return TarIndex.of(found.paths, found.counts, found.offsets_path)


def test_shard_writer_folder_is_indexed_once_beside_the_shards_then_found(tmp_path):
    captions = _shard_writer(tmp_path / "laion", 25, per_shard=10)
    shards = resolve(tmp_path / "laion")
    assert [os.path.basename(p) for p in shards.paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert cached_index(shards) is None
    found = index_shard_set(tmp_path / "laion", processes=2)
    assert found.counts == [10, 10, 5] and found.index_path == tmp_path / "laion" / "index.json"
    assert index_captions(_tar_index(found)) == captions
    # the index is a wids index: webdataset's own reader agrees with it
    import wids

    dataset = wids.ShardListDataset(str(found.index_path), localname=lambda url: url, transformations=[])
    assert len(dataset) == 25 and dataset[17][".txt"].read().decode() == "photo 17"
    assert not [p for p in os.listdir(tmp_path / "laion") if p.startswith(".")]  # no parts or temporaries left
    stamp = found.offsets_path.stat().st_mtime_ns
    again = index_shard_set(tmp_path / "laion")  # a second run: read, not rebuilt
    assert again.counts == found.counts and found.offsets_path.stat().st_mtime_ns == stamp
    assert index_captions(TarIndex(again.index_path)) == captions  # now a folder with an index.json


def test_member_orders_and_names_other_tools_write(tmp_path):
    """Members of a sample in any order (.txt first, .json in between), .png/.webp images,
    upper-case extensions, keys with dots in their folders; a sample's key is its name up to
    the first dot of the base name, as webdataset groups them."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    _tar(folder / "a.tar", [
        ("v1.2/cats/0001.txt", b"txt first"), ("v1.2/cats/0001.jpg", _image(1, "JPEG")),
        ("v1.2/cats/0002.jpg", _image(2, "JPEG")), ("v1.2/cats/0002.json", b'{"w": 1}'),
        ("v1.2/cats/0002.txt", b"json between"),
        ("v1.2/dogs/0001.PNG", _image(3, "PNG")), ("v1.2/dogs/0001.TXT", b"same stem, other folder"),
    ])
    _tar(folder / "b.tar", [("x.y/z.webp", _image(4, "WEBP")), ("x.y/z.txt", b"webp"),
                            ("x.y/z.seg.png", _image(5, "PNG"))])  # z.seg.png: extension "seg.png", unread
    found = index_shard_set(folder)
    assert found.counts == [3, 1]
    index = _tar_index(found)
    assert index_captions(index) == ["txt first", "json between", "same stem, other folder", "webp"]
    assert set(index.members(1)) == {"jpg", "json", "txt"} and set(index.members(2)) == {"png", "txt"}
    assert set(index.members(3)) == {"webp", "txt"}


def test_images_alone_for_vip(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _tar(folder / "0.tar", [(f"{i:03d}.jpg", _image(i, "JPEG")) for i in range(6)])
    found = index_shard_set(folder)

    class All:
        def step_batches(self, step):
            return [list(range(6))]

    transform = ImageTextTransform(8, lambda s: [0] * 4, 4)
    vip = PoissonReader(_tar_index(found), All(), transform, captions=False)
    (batch,) = vip.micro_batches(0)
    assert batch.images.shape == (6, 3, 8, 8) and vip.skipped == 0
    dpcap = PoissonReader(_tar_index(found), All(), transform)  # a captioner needs captions
    (batch,) = dpcap.micro_batches(0)
    assert len(batch.images) == 0 and dict(dpcap.skipped_reasons) == {"missing caption": 6}


def test_brace_patterns_globs_gaps_and_a_read_only_folder(tmp_path, monkeypatch, caplog):
    captions = _shard_writer(tmp_path / "laion", 40, per_shard=10)  # 00000..00003
    (tmp_path / "laion" / "00002.tar").unlink()  # a failed download leaves a gap
    kept = captions[:20] + captions[30:]
    with caplog.at_level("WARNING"):
        brace = resolve(str(tmp_path / "laion" / "{00000..00003}.tar"))
    assert "1 of the 4 names it expands to do not exist" in caplog.text and len(brace.paths) == 3
    assert resolve(str(tmp_path / "laion" / "0000[0-3].tar")).paths == brace.paths  # a glob, sorted
    assert resolve(str(tmp_path / "laion" / "{00003,00000}.tar")).paths[0].endswith("00003.tar")  # brace order

    found = index_shard_set(str(tmp_path / "laion" / "{00000..00003}.tar"))
    assert found.index_path.parent == tmp_path / "laion" and found.index_path.name.startswith("index-")
    assert index_captions(_tar_index(found)) == kept
    # another pattern is another shard list, hence another index
    other = index_shard_set(str(tmp_path / "laion" / "{00000..00001}.tar"))
    assert other.index_path != found.index_path and other.counts == [10, 10]

    # the shards' folder read-only: the index goes to the fallback folder, and is found there
    real_access = os.access
    monkeypatch.setattr(shard_sets.os, "access",
                        lambda p, mode: False if os.path.abspath(p) == str(tmp_path / "laion") else real_access(p, mode))
    for f in (tmp_path / "laion").glob("index*"):
        f.unlink()
    fallback = tmp_path / "run" / "shard_index"
    moved = index_shard_set(str(tmp_path / "laion" / "*.tar"), fallback)
    assert moved.index_path.parent == fallback and not list((tmp_path / "laion").glob("index*"))
    assert index_captions(_tar_index(moved)) == kept
    assert cached_index(resolve(str(tmp_path / "laion" / "*.tar")), fallback) == moved

    with pytest.raises(ValueError, match="no .tar files match"):
        resolve(str(tmp_path / "nothing" / "{0..3}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar files"):
        resolve(tmp_path / "empty")


def test_ranks_index_their_parts_and_one_merges(tmp_path):
    """Three ranks each read every third shard (simulated here in turn; the trainer runs them
    at once, test_trainer_own_data), rank 0 merges: the same index as one process makes."""
    _shard_writer(tmp_path / "laion", 47, per_shard=9)  # 6 shards
    shards = resolve(tmp_path / "laion")
    for rank in range(3):
        scan_part(shards, shards.beside, rank, 3, job="run")
    scan_part(shards, shards.beside, 0, 1, job="other")  # another job indexing the same shards at once
    assert cached_index(shards) is None  # the parts alone are no index
    merged = merge_parts(shards, shards.beside, 3, job="run")
    assert shard_sets.parts_dir(shards, shards.beside, "other").is_dir()  # its parts are its own
    assert merged.counts == [9, 9, 9, 9, 9, 2]
    blocks = (tmp_path / "laion" / "index.offsets").read_bytes()
    (tmp_path / "laion" / "index.json").unlink()
    (tmp_path / "laion" / "index.offsets").unlink()
    alone = index_shard_set(tmp_path / "laion")
    assert alone.counts == merged.counts and alone.offsets_path.read_bytes() == blocks
    assert [len(t) for t in scan_shards(shards.paths, 2)] == merged.counts


def test_a_changed_or_broken_index_is_rebuilt(tmp_path):
    _shard_writer(tmp_path / "laion", 20, per_shard=10)
    spec = str(tmp_path / "laion" / "*.tar")
    first = index_shard_set(spec)
    # a shard rewritten with more samples: its size changed, so the cached counts are stale
    _tar(tmp_path / "laion" / "00001.tar", [(f"k{i}.{ext}", data) for i in range(12)
                                            for ext, data in (("jpg", _image(i, "JPEG")), ("txt", b"new"))])
    assert cached_index(resolve(spec)) is None
    second = index_shard_set(spec)
    assert second.counts == [10, 12] and second.index_path == first.index_path
    # a table cut short (a copy interrupted): not used, rebuilt
    second.offsets_path.write_bytes(second.offsets_path.read_bytes()[:-8])
    assert cached_index(resolve(spec)) is None
    assert index_shard_set(spec).counts == [10, 12]
    np.testing.assert_array_equal(scan_sample_offsets(second.paths[1]),
                                  _tar_index(second)._table(1))


# ---- each example counts once in N: one file named twice is refused, whatever the form

def _duplicate_spellings(folder):
    """a.tar, and the other names of that one file: a symbolic link, a hard link."""
    _shard_writer(folder, 4, per_shard=4)
    os.rename(folder / "00000.tar", folder / "a.tar")
    os.symlink("a.tar", folder / "linked.tar")
    os.link(folder / "a.tar", folder / "hard.tar")


@pytest.mark.parametrize("second", ["a.tar", "./a.tar", "linked.tar", "hard.tar"])
def test_an_index_listing_one_shard_twice_is_refused_naming_both(tmp_path, second):
    _duplicate_spellings(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"shardlist": [
        {"url": "a.tar", "nsamples": 4}, {"url": second, "nsamples": 4}, {"url": "a.tar", "nsamples": 4}]}))
    both = re.escape(f"{tmp_path / 'a.tar'} and {tmp_path / second} are the same shard")
    for open_index in (TarIndex, resolve, index_shard_set):
        with pytest.raises(ValueError, match=both):
            open_index(tmp_path / "index.json")


def test_an_index_listing_a_missing_shard_twice_is_refused(tmp_path):
    """Its listed counts are taken as given: N would count them twice."""
    (tmp_path / "index.json").write_text(json.dumps({"shardlist": [
        {"url": "gone.tar", "nsamples": 10}, {"url": "./gone.tar", "nsamples": 10}]}))
    with pytest.raises(ValueError, match="gone.tar are the same shard"):
        TarIndex(tmp_path / "index.json")


@pytest.mark.parametrize("link", ["linked.tar", "hard.tar"])
@pytest.mark.parametrize("form", ["folder", "glob", "brace"])
def test_folders_globs_and_brace_patterns_over_a_linked_copy_are_refused(tmp_path, link, form):
    _duplicate_spellings(tmp_path / "d")
    (tmp_path / "d" / {"linked.tar": "hard.tar", "hard.tar": "linked.tar"}[link]).unlink()
    spec = {"folder": tmp_path / "d", "glob": tmp_path / "d" / "*.tar", "brace": tmp_path / "d" / f"{{a,{link[:-4]}}}.tar"}
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'd' / 'a.tar'} and {tmp_path / 'd' / link} are")):
        resolve(str(spec[form]))


def test_a_brace_pattern_naming_a_shard_twice_is_refused(tmp_path):
    _shard_writer(tmp_path, 4, per_shard=4)
    with pytest.raises(ValueError, match="00000.tar and .*00000.tar are the same shard"):
        resolve(f"{tmp_path}/{{00000,00000}}.tar")


def test_a_copy_with_its_own_bytes_is_another_shard(tmp_path):
    _shard_writer(tmp_path, 4, per_shard=4)
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00000.tar").read_bytes())
    assert index_shard_set(tmp_path).counts == [4, 4]
