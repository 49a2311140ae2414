"""Hostile shards: nothing crashes, nothing executes, bad samples are skipped and counted."""

import io
import json
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from data import read_samples
from data.decode import MAX_METADATA_BYTES, BadSample, decode_image, decode_metadata
from data.loader import PoissonReader, StreamingReader
from data.transform import ImageTextTransform


class _WritesMarker:
    """Unpickling this runs code that creates a file: the proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _jpeg(seed: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's first line)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _write_tar(path, members):
    """`members`: (name, bytes) for regular files, (name, (link type, target)) for links."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def hostile(tmp_path):
    """A shard with 3 good samples among every kind of bad one, and its truncated copy."""
    marker = tmp_path / "EXECUTED"
    payload = pickle.dumps(_WritesMarker(str(marker)))
    members = [
        ("good0.jpg", _jpeg(0)), ("good0.txt", b"good zero"),
        ("garbage.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("garbage.txt", b"caption"),
        ("latin1.jpg", _jpeg(1)), ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("empty.jpg", _jpeg(2)), ("empty.txt", b"  \n"),
        ("huge.jpg", _jpeg(3)), ("huge.txt", b"x" * (10 * 2**20)),
        ("nocaption.jpg", _jpeg(4)),
        ("bomb.png", _png_claiming(60000, 60000)), ("bomb.txt", b"bomb"),
        ("good1.jpg", _jpeg(5)), ("good1.pyd", payload), ("good1.txt", b"good one"),
        ("onlypickle.pickle", payload), ("onlypickle.pth", payload),
        ("exe.exe", b"MZ\x90\x00"), ("exe.txt", b"program"),
        ("symlink.jpg", (tarfile.SYMTYPE, "/etc/passwd")), ("symlink.txt", b"followed a symlink"),
        ("hardlink.jpg", (tarfile.LNKTYPE, "good0.jpg")), ("hardlink.txt", b"followed a hard link"),
        ("good2.jpg", _jpeg(6)), ("good2.json", b'{"k": 1}'), ("good2.txt", "good two \u00e9".encode()),
    ]
    shard = tmp_path / "hostile.tar"
    _write_tar(shard, members)
    data = shard.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 3])  # cut inside the 10 MB caption
    return shard, truncated, marker, len({name.split(".")[0] for name, _ in members})


EXPECTED_SKIPS = {
    "undecodable image": 1, "caption not UTF-8": 1, "empty caption": 1, "member too large": 1,
    "missing caption": 1, "image too large": 1, "no readable member": 1, "missing image": 3,
}


def test_read_samples_yields_only_good_samples_and_counts_the_rest(hostile):
    shard, _, marker, _ = hostile
    reader = read_samples([shard])
    samples = list(reader)
    assert [caption for _, caption in samples] == ["good zero", "good one", "good two \u00e9"]
    assert all(image.mode == "RGB" and image.size == (16, 16) for image, _ in samples)
    assert dict(reader.skipped_reasons) == EXPECTED_SKIPS
    assert reader.skipped == sum(EXPECTED_SKIPS.values())
    assert not marker.exists()


def test_truncated_and_missing_tars_end_only_themselves(hostile, tmp_path):
    shard, truncated, marker, _ = hostile
    not_a_tar = tmp_path / "random.tar"
    not_a_tar.write_bytes(os.urandom(3000))
    reader = read_samples([truncated, tmp_path / "absent.tar", not_a_tar, shard])
    captions = [caption for _, caption in reader]
    assert captions == ["good zero", "good zero", "good one", "good two \u00e9"]
    assert reader.skipped_reasons["truncated or unreadable tar"] == 3
    assert not marker.exists()


def test_large_jpeg_is_decoded_at_reduced_scale_but_not_below_the_target():
    full = decode_image(_jpeg(7, size=512))
    reduced = decode_image(_jpeg(7, size=512), draft_size=100)
    assert full.size == (512, 512) and reduced.size == (128, 128) and reduced.mode == "RGB"


@pytest.mark.parametrize("data, reason", [
    (b"[1, 2]", "metadata not an object"),
    (b"{not json", "undecodable metadata"),
    (b'{"k": "\xff"}', "undecodable metadata"),
    (b'{"k": "' + b"x" * MAX_METADATA_BYTES + b'"}', "metadata too large"),
])
def test_metadata_decoder_accepts_only_bounded_json_objects(data, reason):
    assert decode_metadata(b'{"py/object": "os.system", "n": 1}') == {"py/object": "os.system", "n": 1}
    with pytest.raises(BadSample, match=reason):
        decode_metadata(data)


def _tokenize(text, length=16):
    ids = list(text.encode())[:length]
    return ids + [0] * (length - len(ids))


class _AllAtOnce:
    def __init__(self, count):
        self.count = count

    def step_batches(self, step):
        return [list(range(self.count)), [1, 2]]  # the second: only bad samples (garbage, latin1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_both_readers_survive_hostile_shards(hostile, num_workers):
    shard, truncated, marker, num_keys = hostile
    transform = ImageTextTransform(8, _tokenize, 16)
    index = shard.parent / "index.json"
    index.write_text(json.dumps({"wids_version": 1, "shardlist": [{"url": "hostile.tar", "nsamples": num_keys}]}))
    poisson = PoissonReader(index, _AllAtOnce(num_keys), transform, num_workers=num_workers)
    batch, all_bad = list(poisson.micro_batches(0))  # one batch per micro-batch, even an empty one
    assert batch.images.shape == (3, 3, 8, 8) and all_bad.images.shape == (0, 3, 8, 8)
    assert all_bad.tokens.shape == (0, 16) and poisson.skipped == sum(EXPECTED_SKIPS.values()) + 2
    assert set(poisson.skipped_reasons) == set(EXPECTED_SKIPS)
    again = PoissonReader(index, _AllAtOnce(num_keys), transform, num_workers=num_workers)
    next(again.micro_batches(0))  # abandoned mid-step (an interrupted run), then read again whole
    list(again.micro_batches(0))
    assert dict(again.skipped_reasons) == dict(poisson.skipped_reasons)
    streaming = StreamingReader(
        [shard, truncated], transform, batch_size=4, shuffle_buffer=0, shard_shuffle=False, num_workers=num_workers // 2
    )
    stream = iter(streaming)
    sizes = [len(next(stream).tokens) for _ in range(3)]
    assert sizes == [1, 1, 2]  # chunks of 4 raw samples run across the two shards
    assert streaming.skipped >= sum(EXPECTED_SKIPS.values())
    assert not marker.exists()
