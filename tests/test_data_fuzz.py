"""Fuzzing the shard readers: structured mutations of real shards, written by the project's
own writer, against the index scan, the random-access reader and the sequential one (iter_samples).

Mutations: sizes (negative and huge base-256, huge or non-octal octal), type flags,
names (long, dotless, binary), inserted pax headers (long paths up to and over the cap,
huge or malformed record lengths, bad sizes, GNU.sparse values, global headers), GNU
long names and links, checksums, random byte flips, truncation, and offsets in an index
(pointing anywhere, including at a header planted inside a member's data). Each case
reads a folder of the mutated shard and an untouched one, under a deadline (an interval
timer) and an address-space limit, and must end with no exception escaping and the
untouched shard's samples read intact by every reader.

The cases run in one subprocess (this file run as a script) so that the limits bind it
alone; it prints a JSON report: how many cases of each family ran, and the failures.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

from data.tar_headers import BLOCK
from tests.helpers.processes import REPO
from tests.helpers.tars import base256, dotted_path, extended, pax_record, with_checksum

CASE_SECONDS = 2.0  # a case reads two 10 KB shards a few times: milliseconds
EXTRA_MEMORY = 1 << 30  # what the cases may add to the process's address space, all together
MAX_FAILURES = 25  # then stop: a broken reader would otherwise time out case after case
MIN_CASES = 2000


def test_fuzzed_shards_never_stall_crash_or_spoil_the_other_shards(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nfuzz: {report['cases']} cases in {report['seconds']:.0f} s: {report['families']}")
    assert report["failures"] == []
    assert report["cases"] >= MIN_CASES and min(report["families"].values()) >= 50


# ---------------------------------------------------------------- the cases

class CaseTimeout(BaseException):
    """Raised by the interval timer: a BaseException, so no reader's `except Exception` hides it."""


def _header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # our own, well-formed shard
        return [info.offset for info in tar]


def _put(data: bytes, header: int, start: int, value: bytes, fix: bool = True) -> bytes:
    """``value`` written at ``start`` of the header at byte ``header``, its checksum fixed or not."""
    block = data[header:header + BLOCK]
    block = block[:start] + value + block[start + len(value):]
    return data[:header] + (with_checksum(block) if fix else block) + data[header + BLOCK:]


def _insert(data: bytes, at: int, piece: bytes) -> bytes:
    return data[:at] + piece + data[at:]


SIZE_FIELDS = [
    base256(-1), base256(-BLOCK), base256(-2 * BLOCK), base256(-(2**87)), base256(2**87 - 1), base256(2**40),
    base256(0), base256(7), b"77777777777\0", b"00000000000\0", b"1\0", b"777\0", b"abc\0", b"1_0\0", b"8\0",
    b"-1\0", b"   \0", b"\xff" * 12, b"0x10\0", b" 12 \0", b"\0" * 12,
]
TYPE_FLAGS = [bytes([c]) for c in b"0123456789gxLKSVMNDAz \0\xff"]
NAMES = [
    b"noextension", b"a.b.c.JPG", b"dir/", b"/abs.jpg", b".jpg", b"x/.txt", b"\xff\xfe.jpg", b"a\nb.jpg",
    b"." * 99, b"/" * 99, b"../x.jpg", b"x" * 100, b"000000001.jpg", b"000000001.txt", b"k.pyd", b"k.JSON",
]
LONG_PATHS = [dotted_path(1024), dotted_path(16 * 1024), dotted_path(60 * 1024), b"p/" * 30000 + b"x.jpg",
              b"q.jpg" + b"\0" * 8]
PAX_PAYLOADS = (
    [pax_record(b"path", path) for path in LONG_PATHS]
    + [pax_record(b"path", b"u" * (64 * 1024) + b".jpg")]  # over the cap with its record
    + [pax_record(b"size", value) for value in (b"abc", b"-5", b"99999999999999", b"0", b"5", b"1" * 5000, b"")]
    + [b"9" * 5000 + b" path=x\n", b"0 a=\n", b"99 a=b\n", b"7 abc\n\n", b"5 =b\n", b"6 a=b\n" * 10000,
       b"1" * 60000, b"30 path=x.jpg\n" + b"\0" * 100, b"\0" * 512, b"20 path=\xff\xfe.jpg\n"]
    + [pax_record(b"GNU.sparse." + key, value) for key, value in (
        (b"map", b"0,zero,1"), (b"map", b"0,1"), (b"size", b"xyz"), (b"major", b"1"), (b"name", b"evil.jpg"),
        (b"numblocks", b"-1"), (b"offset", b"a"))]
    + [pax_record(b"hdrcharset", b"BINARY") + pax_record(b"path", b"\xff.jpg"), pax_record(b"linkpath", b"x" * 9000)]
)
GNU_PAYLOADS = [b"short.jpg\0", b"noterminator.txt", dotted_path(60 * 1024), b"n" * (64 * 1024 + 1), b"\0" * 600,
                b"0000000001.jpg\0"]


def cases(base: bytes, rng: random.Random):
    """(family, description, shard bytes, offsets an index gives for it or None)."""
    headers = _header_offsets(base)
    size = len(base)
    for h in headers:
        for field in SIZE_FIELDS:
            for fix in (True, False) if field in SIZE_FIELDS[:3] else (True,):
                yield "size", f"header {h} size {field!r} fix={fix}", _put(base, h, 124, field, fix), None
        for flag in TYPE_FLAGS:
            yield "type", f"header {h} type {flag!r}", _put(base, h, 156, flag), None
        for name in NAMES:
            yield "name", f"header {h} name {name[:20]!r}", _put(base, h, 0, name[:100].ljust(100, b"\0")), None
        yield "name", f"header {h} ustar prefix", _put(base, h, 345, b"pre/fix" + b"\0" * 148), None
        yield "name", f"header {h} long prefix", _put(base, h, 345, b"." * 155), None
        for checksum in (b"000000\0 ", b"abcdef\0 ", b"\0" * 8, b" " * 8, b"\xff" * 8, b"7777777\0"):
            yield "checksum", f"header {h} checksum {checksum!r}", _put(base, h, 148, checksum, fix=False), None
        block = base[h:h + BLOCK]
        stored = int(block[148:154], 8)
        for delta in (1, -1, 256):
            yield ("checksum", f"header {h} checksum off by {delta}",
                   _put(base, h, 148, b"%06o\0 " % (stored + delta), fix=False), None)
    places = [headers[0], headers[1], headers[len(headers) // 2], headers[-1], size - 2 * BLOCK]
    for at in places:
        for kind in (b"x", b"g"):
            for number, payload in enumerate(PAX_PAYLOADS):
                yield "pax", f"{kind!r} payload {number} before {at}", _insert(base, at, extended(kind, payload)), None
            claims = extended(kind, pax_record(b"path", b"c.jpg"))
            lying = claims[:124] + b"%011o\0" % (2**20) + claims[136:]  # claims 1 MiB, holds 512 bytes
            yield "pax", f"{kind!r} claiming 1 MiB before {at}", _insert(base, at, with_checksum(lying[:BLOCK])
                                                                          + lying[BLOCK:]), None
        for kind in (b"L", b"K"):
            for number, payload in enumerate(GNU_PAYLOADS):
                yield "gnu", f"{kind!r} payload {number} before {at}", _insert(base, at, extended(kind, payload)), None
            yield "gnu", f"{kind!r} twice before {at}", _insert(base, at, 2 * extended(kind, b"twice.jpg\0")), None
    for number in range(2000):
        h = rng.choice(headers)
        mutated = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            mutated[h + rng.randrange(BLOCK)] = rng.randrange(256)
        fix = rng.random() < 0.7
        mutated = bytes(mutated)
        yield ("flip", f"flip {number} in header {h} fix={fix}",
               _put(mutated, h, 0, mutated[h:h + 100], fix) if fix else mutated, None)
    for cut in list(range(0, size, BLOCK)) + sorted(rng.sample(range(size), 200)):
        yield "truncate", f"cut at {cut}", base[:cut], None
    # offsets an index gives: anywhere, and at a crafted header planted in a member's padded data
    planted = bytearray(base)
    hideout = headers[1] + BLOCK  # the data block of the second member (under 512 bytes: its padding is ours)
    loop = with_checksum(b"loop.jpg".ljust(124, b"\0") + base256(-BLOCK) + bytes(BLOCK - 136))  # points at itself
    planted[hideout:hideout + BLOCK] = loop
    candidates = sorted(set(headers) | {0, hideout, 1, BLOCK + 7, size - BLOCK, size - 1, size, size + BLOCK,
                                        -BLOCK} | set(range(0, size, BLOCK)))
    for number in range(800):
        offsets = sorted(rng.sample(candidates, 4))
        shard = bytes(planted) if number % 2 else base
        yield "offsets", f"offsets {offsets} planted={number % 2}", shard, offsets


# ---------------------------------------------------------------- running them

def _samples_by_tarfile(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The expected samples of an untouched shard, read by tarfile (it is our own, well formed)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def _check(case_dir: Path, shard: bytes, offsets, good: Path, expected, shipped: Path) -> None:
    """Every reader over [mutated, untouched]: no exception escapes; the untouched shard's
    samples come out whole, through the index scan, two indexes and the stream. (The
    mutated shard held as many samples as the untouched one before its mutation.)"""
    import numpy as np

    from data.decode import BadSample, SkipCounter
    from data.offset_tables import scan_sample_offsets, write_table
    from data.tar_index import TarIndex
    from data.tar_samples import iter_samples

    mutated = case_dir / "a.tar"
    mutated.write_bytes(shard)
    found = scan_sample_offsets(mutated)
    good_offsets = scan_sample_offsets(good)
    table = case_dir / "index.offsets"
    if offsets is None:  # an index built by the scan, then the one shipped with the unmutated shard
        write_table(table, [(found, len(shard)), (good_offsets, good.stat().st_size)])
        indexes = [TarIndex.of([mutated, good], [len(found), len(expected)], table),
                   TarIndex.of([mutated, good], [len(expected), len(expected)], shipped)]
    else:  # an index whose offsets point anywhere (some past the end: such a table is scanned instead)
        write_table(table, [(np.array(offsets), len(shard)), (good_offsets, good.stat().st_size)])
        indexes = [TarIndex.of([mutated, good], [len(offsets), len(expected)], table)]
    for index in indexes:
        first_good = len(index) - len(expected)
        for i in range(first_good):
            try:
                index.members(i)
            except BadSample:
                pass
        got = [index.members(first_good + i) for i in range(len(expected))]
        assert got == [members for _, members in expected], "the untouched shard read wrong at random"
    streamed = list(iter_samples([str(mutated), str(good)], SkipCounter()))
    assert streamed[-len(expected):] == expected, "the untouched shard streamed wrong"


def _on_alarm(signum, frame):
    raise CaseTimeout(f"still running after {CASE_SECONDS} s")


def main(folder: Path) -> None:
    import logging

    from data.shards import ShardLimits, write_shards
    from data.sources import synthetic_examples

    logging.disable(logging.CRITICAL)  # thousands of unreadable shards, each logged
    written = folder / "written"
    write_shards(synthetic_examples(8, 0, 16), written, ShardLimits(max_count=4))
    base, good = (written / "shard-000000.tar").read_bytes(), written / "shard-000001.tar"
    expected = _samples_by_tarfile(good)
    case_dir = folder / "case"
    case_dir.mkdir()
    used = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + EXTRA_MEMORY, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _on_alarm)
    families: dict[str, int] = {}
    failures: list[str] = []
    start = time.monotonic()
    for family, description, shard, offsets in cases(base, random.Random(0)):
        families[family] = families.get(family, 0) + 1
        began = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            _check(case_dir, shard, offsets, good, expected, written / "index.offsets")
            took = time.monotonic() - began
            if took > CASE_SECONDS:  # a loop in C code, which the timer cannot interrupt
                raise CaseTimeout(f"took {took:.1f} s")
        except BaseException as exn:  # noqa: BLE001 - every escape is the finding
            if isinstance(exn, KeyboardInterrupt):
                raise
            failures.append(f"{family}: {description}: {traceback.format_exception_only(exn)[-1].strip()}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if len(failures) >= MAX_FAILURES:
            break
    print(json.dumps({"cases": sum(families.values()), "families": families, "failures": failures,
                      "seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
