"""Reading a wids `index.json` (the shard list) without trusting it.

An index comes with the data, from outside, yet it says which files to open:
a shard URL is accepted only as a relative path that stays inside the
index's folder (no absolute path, no `..`), so an index cannot point a reader
at files elsewhere on the machine. The check is on the path as written, not
on where symbolic links lead: links are put in the folder by whoever owns it.
Sample counts must be non-negative integers, since readers number samples by
them.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath


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
    return [(_shard_path(index_path, url), _sample_count(index_path, url, count)) for url, count in entries]


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
