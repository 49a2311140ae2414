"""Where each sample of a shard set starts: one table for the whole set, memory-mapped.

Random access needs, per shard, the header offset of each sample's first
member. Finding them means reading every header of the shard (about 0.5 s for
a 10,000-sample shard), which every loader worker of every rank would otherwise
repeat. So an index `NAME.json` has a table `NAME.offsets` beside it: for each
shard in the index's order, the header offsets of its samples followed by the
shard's size in bytes (a staleness check), all raw little-endian int64,
concatenated. 8 bytes a sample: 1.9 GB at DP-Cap's 233.8M samples, which is
why the table is one file, memory-mapped read-only: every loader worker of
every rank on a node reads the same pages of the page cache instead of holding
a private copy (one mapping per process, not one per shard: a data set has more
shards than a process may keep files open).

Raw numbers, not .npy: nothing to parse, so a hostile table cannot make the
reader allocate or unpickle anything. A table whose length is not what the
index's counts imply is ignored; a shard whose block does not fit (another
size, offsets not increasing inside the file) is scanned instead; a wrong but
well-formed table can only make a sample unreadable or mislabelled, since
reading re-checks every header it is pointed at.

``python -m data.index_shards SHARDS`` writes a shard set's index and this table once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from data.tar_headers import walk
from data.tar_samples import member_key

log = logging.getLogger(__name__)

OFFSETS_SUFFIX = ".offsets"
NO_TABLE = -1  # the size recorded for a shard without usable offsets: it is scanned when read
_DTYPE = np.dtype("<i8")


def scan_sample_offsets(shard: str | Path) -> np.ndarray:
    """Header offset of each sample's first member, read from the shard's headers
    (`data.tar_headers`: a crafted shard costs bounded time and memory).

    Whatever goes wrong reading a shard (truncated, damaged, crafted) is logged as
    "unreadable shard PATH: reason" and yields the samples before the break."""
    starts: list[int] = []
    key = None
    try:
        with open(shard, "rb") as stream:
            for member in walk(stream):
                sample_key, _ = member_key(member)
                if sample_key is not None and sample_key != key:
                    starts.append(member.offset)
                    key = sample_key
    except MemoryError:
        raise  # the process, not the shard: bounded reads cannot cause it
    except Exception as exn:  # whatever a crafted shard provokes ends that shard, not the indexing
        log.warning("unreadable shard %s: %s; its later samples count as missing", shard, exn)
        if starts:
            starts.pop()  # the sample being read when the tar broke may be incomplete
    return np.array(starts, dtype=np.int64)


def scan_shards(paths: Sequence[str | Path], processes: int = 1) -> list[np.ndarray]:
    """:func:`scan_sample_offsets` of every shard, in order, on up to ``processes`` processes
    (reading headers is Python-bound: processes, not threads). A process that dies (killed
    for memory, say) is a ValueError, not a wait: a multiprocessing.Pool would wait forever
    for the work it lost."""
    paths = [str(p) for p in paths]
    processes = max(1, min(processes, len(paths)))
    if processes == 1:
        return [scan_sample_offsets(p) for p in paths]
    # fork: the children need nothing but this module, and start in milliseconds
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    tables: list[np.ndarray] = []
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        try:
            tables.extend(pool.map(scan_sample_offsets, paths, chunksize=max(1, len(paths) // (8 * processes))))
        except BrokenProcessPool as exn:
            raise ValueError(
                f"a header-reading process died (killed for lack of memory?) while reading one of the shards "
                f"from {paths[len(tables)]} on ({len(paths) - len(tables)} of {len(paths)}); index them with one "
                "process (data.num_workers=1, or python -m data.index_shards --processes 1) to name it") from exn
    return tables


def table_path(index_path: str | Path) -> Path:
    """The table beside an index: ``NAME.json`` -> ``NAME.offsets``."""
    return Path(index_path).with_suffix(OFFSETS_SUFFIX)


def write_table(path: str | Path, blocks: Iterable[tuple[np.ndarray, int]]) -> None:
    """Write ``(offsets, shard size)`` per shard, in order, as one table: under a name of its
    own, then renamed, so a reader never sees a partial table and two writers never mix."""
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp_path, "wb") as f:
            for offsets, size in blocks:
                f.write(np.append(np.asarray(offsets, dtype=_DTYPE), size).astype(_DTYPE).tobytes())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def read_blocks(path: str | Path, counts: Sequence[int]) -> Iterable[tuple[np.ndarray, int]]:
    """The ``(offsets, shard size)`` blocks of a table written for shards of ``counts`` samples
    (views of a read-only mapping: a paper-scale table is not copied into memory)."""
    table = np.memmap(path, dtype=_DTYPE, mode="r") if os.path.getsize(path) else np.zeros(0, _DTYPE)
    if len(table) != sum(counts) + len(counts):
        raise ValueError(f"{path}: {len(table)} entries, expected {sum(counts) + len(counts)}")
    start = 0
    for count in counts:
        yield table[start: start + count], int(table[start + count])
        start += count + 1


class OffsetTable:
    """A table memory-mapped read-only; ``shard(s, path)`` gives shard ``s``'s offsets once
    they fit the shard file (checked on first use, per process)."""

    def __init__(self, path: str | Path, counts: Sequence[int]):
        self.path = Path(path)
        expected = (sum(counts) + len(counts)) * _DTYPE.itemsize
        size = self.path.stat().st_size  # OSError if missing
        if size != expected:
            raise ValueError(f"{self.path} is {size} bytes, the index implies {expected}")
        self._table = np.memmap(self.path, dtype=_DTYPE, mode="r") if expected else np.zeros(0, _DTYPE)
        self._starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64) + 1)])

    def shard(self, s: int, shard_path: str) -> np.ndarray | None:
        """Shard ``s``'s offsets (a view of the mapping), or None with a warning if its block
        does not fit the file at ``shard_path`` (changed since the table was written)."""
        block = self._table[self._starts[s]: self._starts[s + 1]]
        offsets, recorded = block[:-1], int(block[-1])
        if recorded == NO_TABLE:
            return None
        try:
            size = os.path.getsize(shard_path)
        except OSError:
            return None  # the reader reports the unreadable shard
        if recorded != size or not _increasing_within(offsets, size):
            log.warning("ignoring the offsets of %s in %s: they do not fit the shard (rewritten since?); "
                        "scanning it instead", shard_path, self.path)
            return None
        return offsets


def _increasing_within(offsets: np.ndarray, size: int) -> bool:
    if not len(offsets):
        return True
    return bool(offsets[0] >= 0 and offsets[-1] < size and np.all(np.diff(offsets) > 0))
