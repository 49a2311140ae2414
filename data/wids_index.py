"""Reading a wids `index.json` (the shard list) without trusting it.

An index comes with the data, from outside, yet it says which files to open:
a shard URL is accepted only as a relative path that stays inside the
index's folder (no absolute path, no `..`), so an index cannot point a reader
at files elsewhere on the machine. The check is on the path as written, not
on where symbolic links lead: links are put in the folder by whoever owns it.
Sample counts must be non-negative integers, since readers number samples by
them. A shard listed twice (under two spellings, through a symbolic link, or
as a hard link) is refused: its examples would count twice in N, and the
privacy accounting with them (`refuse_duplicates`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

INDEX_NAME = "index.json"  # a shard folder's index, as data.write_shards and `widsindex create` name it


def read_shard_list(index_path: str | Path) -> list[tuple[str, int]]:
    """(shard path, sample count the index claims) of each shard, in order.

    Raises ValueError naming the index and the bad entry."""
    index_path = Path(index_path)
    try:
        shards = json.loads(index_path.read_text())["shardlist"]
        entries = [(shard["url"], shard["nsamples"]) for shard in shards]
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise ValueError(f"{index_path} is not a readable wids index (write one with data.write_shards)") from exn
    if not entries:
        raise ValueError(f"{index_path} lists no shards")
    shards = [(_shard_path(index_path, url), _sample_count(index_path, url, count)) for url, count in entries]
    refuse_duplicates([path for path, _ in shards], str(index_path))
    return shards


def refuse_duplicates(paths: Sequence[str], source: str) -> None:
    """ValueError naming both paths if two of ``paths`` are one file: the same path once
    normalised and links resolved (``os.path.realpath``), or the same (device, inode), as
    a hard link is. A copy with its own bytes is another file; N counts each example
    once only if every shard is read once."""
    seen: dict[tuple, str] = {}
    for path in paths:
        identities = [("path", os.path.realpath(path))]
        try:
            status = os.stat(path)
            identities.append(("inode", status.st_dev, status.st_ino))
        except OSError:
            pass  # a missing shard is the reader's to report
        for identity in identities:
            if identity in seen:
                raise ValueError(f"{source}: {seen[identity]} and {path} are the same shard; each example "
                                 "must count once in N (it sets epsilon): name every shard once")
        seen.update((identity, path) for identity in identities)


def _shard_path(index_path: Path, url) -> str:
    relative = PurePosixPath(url) if isinstance(url, str) else None
    if relative is None or not url or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(
            f"{index_path}: shard url {url!r} is not a relative path inside {index_path.parent}: "
            "an index may only name shards in its own folder (move the shards there, or link them in)"
        )
    return str(index_path.parent / relative)


def _sample_count(index_path: Path, url: str, count) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{index_path}: nsamples of {url!r} must be a non-negative integer, got {count!r}")
    return count
