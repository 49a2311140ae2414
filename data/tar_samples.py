"""Sequential, safe reading of webdataset tar shards into raw samples.

A sample is the run of consecutive regular members sharing a key (the member
name up to the first dot of its base name, as wids and webdataset group them).
Only members with a known extension are read, and only up to a size cap
checked from the header; others are skipped unread. A truncated or unreadable
tar ends that shard, never the run.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator

from data.decode import KNOWN_EXTENSIONS, MAX_MEMBER_BYTES, SkipCounter

RawSample = tuple[str, dict[str, bytes]]
_NAME = re.compile(r"^((?:.*/)?[^/]*?)\.([^/]*)$")
_BAD = "__bad__"  # member-dict key marking a sample already known to be bad


def split_member_name(name: str) -> tuple[str, str] | tuple[None, None]:
    """(key, lower-case extension) of a tar member name, or (None, None) without a dot."""
    match = _NAME.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def member_key(info: tarfile.TarInfo) -> tuple[str, str] | tuple[None, None]:
    """(key, extension) of a regular member; (None, None) for links, folders and names without a dot."""
    return split_member_name(info.name) if info.isreg() else (None, None)


def iter_tar_samples(path: str, skips: SkipCounter) -> Iterator[RawSample]:
    """(key, {extension: bytes}) for each usable sample of one tar file, in order.

    Samples with an oversized or duplicated member, or with nothing readable,
    are counted in `skips` here; content checks happen in `data.decode`.
    """
    key, members = None, {}
    try:
        with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                sample_key, ext = member_key(info)
                if sample_key is None:
                    continue
                if sample_key != key:
                    yield from _finish(key, members, skips, path)
                    key, members = sample_key, {}
                if ext not in KNOWN_EXTENSIONS or _BAD in members:
                    continue  # unknown members are never read, let alone decoded
                if ext in members:
                    members[_BAD] = b"duplicate member"
                elif info.size > MAX_MEMBER_BYTES[ext]:
                    members[_BAD] = b"member too large"
                else:
                    members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as exn:
        skips.record("truncated or unreadable tar", f"in {path}: {exn}")
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
