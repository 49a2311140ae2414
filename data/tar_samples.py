"""Sequential, safe reading of webdataset tar shards into raw samples.

A sample is the run of consecutive regular members sharing a key (the member
name up to the first dot of its base name, as wids and webdataset group them).
Only members with a known extension are read, and only up to a size cap
checked from the header; others are skipped unread. Headers are parsed by
`data.tar_headers`, not the interpreter's tarfile; whatever goes wrong while
reading a shard (a truncated, damaged or crafted tar) ends that shard, counted
as an "unreadable shard" and logged with its path and the reason, never the run.

Shards are plain tars. A compressed one (gzip, bzip2, xz, zstd) is refused
unread rather than decompressed on the fly: the size caps are checked against
what the headers claim, but a decompression bomb makes a small file expand to
terabytes that must all be decompressed just to be skipped, and random access
(the Poisson reader) cannot seek in a compressed stream anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from data.decode import KNOWN_EXTENSIONS, MAX_MEMBER_BYTES, SkipCounter
from data.tar_headers import BLOCK, TarMember, read_data, walk

log = logging.getLogger(__name__)

RawSample = tuple[str, dict[str, bytes]]
COMPRESSED_SHARD = "compressed shard, not a plain tar"
UNREADABLE_SHARD = "unreadable shard"
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_BAD = "__bad__"  # member-dict key marking a sample already known to be bad


def split_member_name(name: str) -> tuple[str, str] | tuple[None, None]:
    """(key, lower-case extension) of a tar member name: split at the first dot of its base
    name; (None, None) without one. String searches, no regular expression: a backtracking
    one takes time quadratic in a crafted name's length."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return None, None
    return name[:dot], name[dot + 1:].lower()


def member_key(member: TarMember) -> tuple[str, str] | tuple[None, None]:
    """(key, extension) of a regular member; (None, None) for links, folders and names without a dot."""
    return split_member_name(member.name) if member.regular else (None, None)


def compression_of(stream: BinaryIO) -> str | None:
    """The compression format of the file `stream` reads (from its start; the
    position is restored), or None for a plain tar or anything else. A tar
    header carrying the ustar magic is plain even if its first member's name
    happens to start like a compressed stream."""
    head = stream.read(BLOCK)
    stream.seek(0)
    if head[257:262] == b"ustar":
        return None
    return next((kind for magic, kind in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


def iter_tar_samples(path: str, skips: SkipCounter) -> Iterator[RawSample]:
    """(key, {extension: bytes}) for each usable sample of one tar file, in order.

    Samples with an oversized or duplicated member, or with nothing readable,
    are counted in `skips` here; content checks happen in `data.decode`.
    """
    key, members = None, {}
    try:
        with open(path, "rb") as stream:
            kind = compression_of(stream)
            if kind:
                skips.record(COMPRESSED_SHARD, f"{path} is {kind}-compressed: write plain .tar shards")
                return
            for member in walk(stream):
                sample_key, ext = member_key(member)
                if sample_key is None:
                    continue
                if sample_key != key:
                    yield from _finish(key, members, skips, path)
                    key, members = sample_key, {}
                if ext not in KNOWN_EXTENSIONS or _BAD in members:
                    continue  # unknown members are never read, let alone decoded
                if ext in members:
                    members[_BAD] = b"duplicate member"
                elif member.size > MAX_MEMBER_BYTES[ext]:
                    members[_BAD] = b"member too large"
                else:
                    members[ext] = read_data(stream, member)
    except MemoryError:
        raise  # the process, not the shard: bounded reads cannot cause it
    except Exception as exn:  # whatever a crafted shard provokes ends that shard, not the run
        log.warning("unreadable shard %s: %s; the rest of it is skipped", path, exn)
        skips[UNREADABLE_SHARD] += 1
        return
    yield from _finish(key, members, skips, path)


def iter_samples(paths: Iterable[str], skips: SkipCounter) -> Iterator[RawSample]:
    """Raw samples of several tar files, one after the other."""
    for path in paths:
        yield from iter_tar_samples(path, skips)


def _finish(key: str | None, members: dict[str, bytes], skips: SkipCounter, path: str) -> Iterator[RawSample]:
    if key is None:
        return
    if _BAD in members:
        skips.record(members[_BAD].decode(), f"{key} in {path}")
    elif not members:
        skips.record("no readable member", f"{key} in {path}")
    else:
        yield key, members
