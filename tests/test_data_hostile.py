"""Hostile shards, images and indexes: nothing crashes, nothing executes, nothing
outside the index's folder is opened, bad samples are skipped and counted, and
the good samples around them still come through."""

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
from data.decode import (MAX_DECODED_BYTES, MAX_IMAGE_PIXELS, BadSample, decode_image,
                         to_rgb)
from data.loader import SAMPLED, PoissonReader
from data.shard_sets import index_shard_set
from data.tar_index import TarIndex
from data.transform import ImageTextTransform
from tests.helpers.payloads import WritesMarker
from tests.helpers.samples import FixedBatches, batch_captions, byte_tokens, encoded, jpeg


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): `rows` are the raw scanlines."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's first line)."""
    return _png(width, height, 8, 2, b"\0" * 64)


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
    payload = pickle.dumps(WritesMarker(str(marker)))
    members = [
        ("good0.jpg", jpeg(0)), ("good0.txt", b"good zero"),
        ("garbage.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("garbage.txt", b"caption"),
        ("latin1.jpg", jpeg(1)), ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("empty.jpg", jpeg(2)), ("empty.txt", b"  \n"),
        ("huge.jpg", jpeg(3)), ("huge.txt", b"x" * (10 * 2**20)),
        ("nocaption.jpg", jpeg(4)),
        ("bomb.png", _png_claiming(60000, 60000)), ("bomb.txt", b"bomb"),
        ("good1.jpg", jpeg(5)), ("good1.pyd", payload), ("good1.txt", b"good one"),
        ("onlypickle.pickle", payload), ("onlypickle.pth", payload),
        ("exe.exe", b"MZ\x90\x00"), ("exe.txt", b"program"),
        ("symlink.jpg", (tarfile.SYMTYPE, "/etc/passwd")), ("symlink.txt", b"followed a symlink"),
        ("hardlink.jpg", (tarfile.LNKTYPE, "good0.jpg")), ("hardlink.txt", b"followed a hard link"),
        ("good2.jpg", jpeg(6)), ("good2.json", b'{"k": 1}'), ("good2.txt", "good two \u00e9".encode()),
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
    assert reader.skipped_reasons["unreadable shard"] == 3
    assert not marker.exists()


def test_large_jpeg_is_decoded_at_reduced_scale_but_not_below_the_target():
    full = decode_image(jpeg(7, size=512))
    reduced = decode_image(jpeg(7, size=512), draft_size=100)
    assert full.size == (512, 512) and reduced.size == (128, 128) and reduced.mode == "RGB"




class _AllAtOnce:
    def __init__(self, count):
        self.count = count

    def step_batches(self, step):
        return [list(range(self.count)), [1, 2]]  # the second: only bad samples (garbage, latin1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_poisson_reader_survives_hostile_shards(hostile, num_workers):
    shard, _, marker, num_keys = hostile
    transform = ImageTextTransform(8, byte_tokens, 16)
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
    assert not marker.exists()


# ---- images stored in other modes, animated, or claiming too many pixels ----

def _palette_with_transparent_index() -> bytes:
    """Left half palette index 0 (transparent), right half index 1 (opaque orange)."""
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    return encoded(image, "PNG", transparency=0)


def _sixteen_bit(values, colour_type: int) -> bytes:
    """8 x 8 16-bit PNG, every pixel `values` (grey: 1 value, RGB: 3, RGBA: 4)."""
    pixels = np.broadcast_to(np.array(values, dtype=">u2"), (8, 8, len(values)))
    return _png(8, 8, 16, colour_type, b"".join(b"\0" + row.tobytes() for row in pixels))


WHITE = (255, 255, 255)
# (how it is stored, bytes, pixel at (0, 0), pixel at (7, 7)); transparency shows as white
NON_RGB_IMAGES = [
    ("L", lambda: encoded(Image.new("L", (8, 8), 100), "PNG"), (100,) * 3, (100,) * 3),
    ("1", lambda: encoded(Image.new("1", (8, 8), 1), "PNG"), WHITE, WHITE),
    ("LA transparent", lambda: encoded(Image.new("LA", (8, 8), (100, 0)), "PNG"), WHITE, WHITE),
    ("LA opaque", lambda: encoded(Image.new("LA", (8, 8), (100, 255)), "PNG"), (100,) * 3, (100,) * 3),
    ("P with a transparent index", _palette_with_transparent_index, WHITE, (200, 100, 50)),
    ("L with tRNS", lambda: encoded(Image.new("L", (8, 8), 100), "PNG", transparency=100), WHITE, WHITE),
    ("RGBA transparent red", lambda: encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), WHITE, WHITE),
    ("RGBA half red", lambda: encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG"), (255, 127, 127),
     (255, 127, 127)),
    ("RGBA WebP transparent", lambda: encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "WEBP", lossless=True),
     WHITE, WHITE),
    ("CMYK JPEG red", lambda: encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100),
     (255, 0, 0), (255, 0, 0)),
    ("I;16 grey 40000", lambda: _sixteen_bit([40000], 0), (156,) * 3, (156,) * 3),  # 40000 >> 8
    ("16-bit RGB", lambda: _sixteen_bit([65535, 32768, 255], 2), (255, 128, 0), (255, 128, 0)),
    ("16-bit RGBA transparent", lambda: _sixteen_bit([65535, 0, 0, 0], 6), WHITE, WHITE),
]


@pytest.mark.parametrize("stored, data, first, last", NON_RGB_IMAGES, ids=[case[0] for case in NON_RGB_IMAGES])
def test_non_rgb_images_become_the_rgb_they_show(stored, data, first, last):
    """Pillow's convert("RGB") would show a transparent pixel's stored colour
    (red, or black for the WebP) and clip 16-bit grey 40000 to 255."""
    image = decode_image(data())
    assert image.mode == "RGB" and image.size == (8, 8)
    for where, expected in (((0, 0), first), ((7, 7), last)):
        assert np.abs(np.subtract(image.getpixel(where), expected)).max() <= 1, (stored, where)  # JPEG, blending round


def test_modes_no_decoder_produces_are_refused():
    with pytest.raises(BadSample, match="unsupported image mode F"):
        to_rgb(Image.new("F", (4, 4)))


def _animation(fmt: str) -> tuple[bytes, int]:
    """A red, blue, green animation whose last frame's data is destroyed (chunk
    sizes kept): decoding every frame fails, decoding the first does not."""
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = bytearray(encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **options))
    frame_chunk = b"ANMF" if fmt == "WEBP" else b"fdAT"
    at = data.rfind(frame_chunk)
    if fmt == "WEBP":  # RIFF: tag, little-endian size, 16 bytes of frame header, the frame's VP8L chunk header
        size = int.from_bytes(data[at + 4:at + 8], "little")
        start, end = at + 8 + 16 + 8 + 5, at + 8 + size
    else:  # PNG: big-endian size before the tag, then the frame's sequence number
        size = int.from_bytes(data[at - 4:at], "big")
        start, end = at + 4 + 4, at + 4 + size
    data[start:end] = np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    return bytes(data), len(frames)


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_images_give_their_first_frame_and_decode_no_other(fmt):
    data, frames = _animation(fmt)
    image = decode_image(data)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0)
    animation = Image.open(io.BytesIO(data))
    assert animation.n_frames == frames
    with pytest.raises(OSError):  # the control: the last frame really is undecodable
        animation.seek(frames - 1)
        animation.load()


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(jpeg(0, size=8))
    at = data.find(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "WEBP", lossless=True))
    at = data.find(b"VP8L") + 9  # after the tag, size and signature: 14 bits width - 1, 14 bits height - 1
    bits = int.from_bytes(data[at:at + 4], "little") & ~((1 << 28) - 1)
    data[at:at + 4] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("data", [
    _jpeg_claiming(65000, 65000), _jpeg_claiming(9000, 8000),  # 72 M pixels, over MAX_IMAGE_PIXELS (67 M)
    _webp_claiming(16384, 16384), _webp_claiming(9000, 8000), _png_claiming(8193, 8193),
], ids=["jpeg 65000^2", "jpeg 9000x8000", "webp 16384^2", "webp 9000x8000", "png 8193^2"])
def test_pixel_count_bombs_are_refused_from_their_header(data):
    with pytest.raises(BadSample, match="image too large"):
        decode_image(data)


def test_odd_images_among_good_samples_lose_nothing_else(tmp_path):
    """Every case above in one shard, between good samples, through both readers:
    the convertible ones come through, the rest are counted by reason."""
    members = [("good0.jpg", jpeg(0)), ("good0.txt", b"good0")]
    for number, (_, data, _, _) in enumerate(NON_RGB_IMAGES):
        members += [(f"mode{number:02d}.png", data()), (f"mode{number:02d}.txt", b"mode")]
    members += [("anim.webp", _animation("WEBP")[0]), ("anim.txt", b"anim"),
                ("gif.jpg", encoded(Image.new("RGB", (8, 8)), "GIF")), ("gif.txt", b"gif"),
                ("bomb.jpg", _jpeg_claiming(65000, 65000)), ("bomb.txt", b"bomb"),
                ("good1.jpg", jpeg(1)), ("good1.txt", b"good1")]
    _write_tar(tmp_path / "odd.tar", members)
    keys = len(members) // 2
    converted = ["good0"] + ["mode"] * len(NON_RGB_IMAGES) + ["anim", "good1"]
    expected_skips = {"undecodable image": 1, "image too large": 1}  # the GIF is not an accepted format

    reader = read_samples([tmp_path / "odd.tar"])
    assert [caption for _, caption in reader] == converted
    assert dict(reader.skipped_reasons) == expected_skips

    (tmp_path / "index.json").write_text(json.dumps({"shardlist": [{"url": "odd.tar", "nsamples": keys}]}))
    transform = ImageTextTransform(8, byte_tokens, 16)
    poisson = PoissonReader(tmp_path / "index.json", FixedBatches([list(range(keys))]), transform)
    (batch,) = poisson.micro_batches(0)
    assert batch_captions(batch) == converted and dict(poisson.skipped_reasons) == expected_skips


# ---- archives: compressed "tars", and indexes that lie ----

def _plain_tar(folder, name: str, captions: list[str]) -> bytes:
    """A shard `name` with one good sample per caption; returns its bytes."""
    stem = name.split(".")[0]
    _write_tar(folder / name, [(n, d) for i, c in enumerate(captions)
                               for n, d in ((f"{stem}{i}.jpg", jpeg(i)), (f"{stem}{i}.txt", c.encode()))])
    return (folder / name).read_bytes()


def _gzip_bomb(decompressed_mib: int = 64) -> bytes:
    """A gzip stream of a tar whose one sample has a 64 MiB caption of zeros: ~64 KiB on disk."""
    header = tarfile.TarInfo("bomb.txt")
    header.size = decompressed_mib * 2**20
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    out = [packer.compress(header.tobuf())]
    zeros = bytes(2**20)
    out += [packer.compress(zeros) for _ in range(decompressed_mib)]
    return b"".join(out) + packer.flush()


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "gzip bomb"])
def test_compressed_shards_are_refused_unread_by_every_reader(tmp_path, kind):
    import bz2
    import gzip
    import lzma

    _plain_tar(tmp_path, "a.tar", ["a0", "a1"])
    packed = _plain_tar(tmp_path, "packed.tar", ["p0", "p1"])  # readable if decompressed
    compress = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress, "gzip bomb": lambda _: _gzip_bomb()}
    (tmp_path / "packed.tar").write_bytes(compress[kind](packed))
    _plain_tar(tmp_path, "b.tar", ["b0", "b1"])
    shards = [tmp_path / name for name in ("a.tar", "packed.tar", "b.tar")]
    refused = {"compressed shard, not a plain tar": 1}

    reader = read_samples(shards)
    assert [caption for _, caption in reader] == ["a0", "a1", "b0", "b1"] and dict(reader.skipped_reasons) == refused

    transform = ImageTextTransform(8, byte_tokens, 16)
    shardlist = [{"url": path.name, "nsamples": 2} for path in shards]
    (tmp_path / "index.json").write_text(json.dumps({"shardlist": shardlist}))
    poisson = PoissonReader(tmp_path / "index.json", FixedBatches([list(range(6))]), transform)
    (batch,) = poisson.micro_batches(0)
    assert batch_captions(batch) == ["a0", "a1", "b0", "b1"]
    assert dict(poisson.skipped_reasons) == {"compressed shard, not a plain tar": 2}  # both samples it lists


def test_a_tar_whose_first_name_starts_like_a_compressed_stream_is_still_read(tmp_path):
    _write_tar(tmp_path / "s.tar", [("BZh91AY.jpg", jpeg(0)), ("BZh91AY.txt", b"not bzip2")])
    assert [caption for _, caption in read_samples([tmp_path / "s.tar"])] == ["not bzip2"]


def test_index_claiming_more_samples_than_a_shard_holds(tmp_path, caplog):
    """The phantom samples are skipped with a reason; the next shard's samples keep their numbers."""
    _plain_tar(tmp_path, "a.tar", ["a0", "a1"])
    _plain_tar(tmp_path, "b.tar", ["b0", "b1"])
    shardlist = [{"url": "a.tar", "nsamples": 5}, {"url": "b.tar", "nsamples": 2}]
    (tmp_path / "index.json").write_text(json.dumps({"shardlist": shardlist}))
    poisson = PoissonReader(tmp_path / "index.json", FixedBatches([[0, 1, 2, 3, 4, 5, 6]]),
                            ImageTextTransform(8, byte_tokens, 16))
    assert poisson.num_examples == 7
    with caplog.at_level("WARNING", logger="data.tar_index"):
        (batch,) = poisson.micro_batches(0)
    assert batch_captions(batch) == ["a0", "a1", "b0", "b1"]
    assert dict(poisson.skipped_reasons) == {"sample missing from shard": 3}
    assert "a.tar holds 2 samples, its index says 5" in caplog.text


@pytest.mark.parametrize("url", [
    "../outside/o.tar", "inside/../../outside/o.tar", "ABSOLUTE", "", None, ["o.tar"],
])
def test_index_may_only_name_shards_inside_its_folder(tmp_path, url):
    """Every shard named here exists and is a good tar: only the check stops a reader from opening it."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "data" / "inside").mkdir(parents=True)
    _plain_tar(tmp_path / "outside", "o.tar", ["secret"])
    _plain_tar(tmp_path / "data" / "inside", "ok.tar", ["fine"])
    url = str(tmp_path / "outside" / "o.tar") if url == "ABSOLUTE" else url
    index = tmp_path / "data" / "index.json"
    index.write_text(json.dumps({"shardlist": [{"url": "inside/./ok.tar", "nsamples": 1}, {"url": url, "nsamples": 1}]}))
    for open_index in (TarIndex, index_shard_set):
        with pytest.raises(ValueError, match="not a relative path inside"):
            open_index(index)
    index.write_text(json.dumps({"shardlist": [{"url": "inside/./ok.tar", "nsamples": 1}]}))
    assert TarIndex(index).members(0)["txt"] == b"fine"  # a subfolder is inside


@pytest.mark.parametrize("count", [-1, 2.5, "2", True, None])
def test_index_sample_counts_must_be_non_negative_integers(tmp_path, count):
    _plain_tar(tmp_path, "a.tar", ["a0", "a1"])
    (tmp_path / "index.json").write_text(json.dumps({"shardlist": [{"url": "a.tar", "nsamples": count}]}))
    with pytest.raises(ValueError, match="nsamples of 'a.tar' must be a non-negative integer"):
        TarIndex(tmp_path / "index.json")


# ---- what a decode may cost, and what a skipped sample's log line may say

def test_decoded_bytes_are_capped_as_well_as_pixels():
    """Under the pixel cap, four bytes a pixel (RGBA, or 16-bit colour) would take 256 MB
    decoded: refused from the header. Three bytes a pixel (RGB) at as many pixels pass that
    check (and fail decoding here, the data being a stub)."""
    assert 8000 * 8000 <= MAX_IMAGE_PIXELS and 8000 * 8000 * 4 > MAX_DECODED_BYTES
    for bit_depth in (8, 16):
        with pytest.raises(BadSample, match="image too large"):
            decode_image(_png(8000, 8000, bit_depth, 6, b"\0" * 64))  # colour type 6: RGBA
    with pytest.raises(BadSample, match="undecodable image"):
        decode_image(_png(8000, 8000, 8, 2, b"\0" * 64))  # RGB


def test_sixteen_bit_grey_is_scaled_without_an_eight_byte_copy_per_pixel():
    """to_rgb worked on int64 copies: 8 bytes a pixel each, over 1 GiB at the pixel cap."""
    import tracemalloc

    image = Image.fromarray(np.full((1024, 1024), 40000, dtype=np.uint16))
    assert image.mode == "I;16"
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.getpixel((5, 5)) == (156, 156, 156)
    assert peak < 8 * 1024 * 1024, peak


def test_poisson_log_lines_never_name_the_drawn_sample(hostile, monkeypatch, caplog):
    """Which samples the sampler drew is as secret as its seed: a skipped sample's log line
    says the reason, not the index, its shard, nor the offset it was read at (the shard
    itself is named once, when the index is built from every shard)."""
    from collections import Counter

    import data.decode
    from data.offset_tables import scan_sample_offsets, table_path, write_table

    shard, truncated, _, num_keys = hostile
    index = shard.parent / "index.json"
    # the table shipped with the full shard, for the truncated copy too: its last sample is cut
    offsets, cut = scan_sample_offsets(shard), truncated.stat().st_size
    kept = offsets[offsets < cut]
    write_table(table_path(index), [(offsets, shard.stat().st_size), (kept, cut)])
    index.write_text(json.dumps({"shardlist": [{"url": "hostile.tar", "nsamples": num_keys},
                                               {"url": "truncated.tar", "nsamples": len(kept)}]}))
    monkeypatch.setattr(data.decode, "_SEEN_IN_PROCESS", Counter())  # every reason's first skip is logged
    reader = PoissonReader(index, FixedBatches([list(range(num_keys + len(kept)))]),
                           ImageTextTransform(8, byte_tokens, 16))
    with caplog.at_level("WARNING", logger="data.decode"):
        list(reader.micro_batches(0))
    lines = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert {line.split("(")[1].split(")")[0] for line in lines} == set(reader.skipped_reasons)
    assert "unreadable shard" in reader.skipped_reasons
    for line in lines:
        assert SAMPLED in line and shard.name not in line and truncated.name not in line, line
        where = line.split(") ", 1)[1].split(";")[0]  # between the reason and the count
        assert not any(word.isdigit() for word in where.replace(":", " ").split()) and "byte" not in where, line
