"""Random access to the samples of an indexed shard set, safely decoded later.

The index gives the shards in order and their sample counts (a wids
`index.json`, or data.shard_sets' index of shards from any tool); global
index i is sample i - offset of its shard, where a shard's samples are its runs
of regular members sharing a key, the same grouping wids uses. Where each
sample starts comes from the set's offset table (`data.offset_tables`: one
file, memory-mapped, so all processes on a node share one copy), or, for a
shard without one, from scanning its headers (kept in this process).
Reading a sample parses its headers again from there (`data.tar_headers`, not
the interpreter's tarfile) and reads only members with a known extension under
the size caps; nothing else is ever read. Whatever goes wrong there makes the
sample a BadSample("unreadable shard"), never an exception that stops training
(it would stop it again at the same step after every resume). Reasons and log
lines name the shard, never the sample's index or offset: which samples the
sampler drew is as secret as its seed.
At most `max_open_files` shard files are open at once (least recently used
closed first): a data set has more shards than a process may open files.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

import numpy as np

from data.decode import KNOWN_EXTENSIONS, MAX_MEMBER_BYTES, BadSample
from data.offset_tables import OffsetTable, scan_sample_offsets, table_path
from data.tar_headers import read_data, reason_of, walk
from data.tar_samples import COMPRESSED_SHARD, UNREADABLE_SHARD, compression_of, member_key
from data.wids_index import read_shard_list

log = logging.getLogger(__name__)


class TarIndex:
    """`len(index)` samples; `index.members(i) -> {extension: bytes}` raises BadSample.

    `TarIndex(index.json)` reads a wids index (shards inside its folder only) and the
    table beside it (or `offsets`); `TarIndex.of(paths, counts, offsets)` an index
    built by data.shard_sets."""

    def __init__(self, index_path: str | Path, max_open_files: int = 64, offsets: str | Path | None = None):
        shards = read_shard_list(index_path)
        self._setup([path for path, _ in shards], [count for _, count in shards],
                    offsets if offsets is not None else table_path(index_path), max_open_files)

    @classmethod
    def of(cls, paths: list[str], counts: list[int], offsets: str | Path | None,
           max_open_files: int = 64) -> TarIndex:
        index = cls.__new__(cls)
        index._setup([str(p) for p in paths], list(counts), offsets, max_open_files)
        return index

    def _setup(self, paths: list[str], counts: list[int], offsets, max_open_files: int) -> None:
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        if len(paths) != len(counts):
            raise ValueError(f"{len(paths)} shards but {len(counts)} sample counts")
        self.max_open_files = max_open_files
        self.paths = paths
        self.starts = [0]
        for count in counts:
            self.starts.append(self.starts[-1] + count)
        self.offsets_path = None if offsets is None else str(offsets)
        self.__setstate__(self.__getstate__())

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):  # worker processes reopen files and map the table again, lazily
        return {"paths": self.paths, "starts": self.starts, "max_open_files": self.max_open_files,
                "offsets_path": self.offsets_path}

    def __setstate__(self, state):
        self.__dict__.update(state, _table_file=None, _table_opened=False, _tables={}, _gaps={},
                             _files=OrderedDict(), _pid=os.getpid())

    def sample_offset(self, index: int) -> tuple[int, int | None]:
        """(shard, header offset of sample ``index``), the offset None if the shard lacks it."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self.starts, index) - 1
        table = self._table(shard)
        inner = index - self.starts[shard]
        return shard, (int(table[inner]) if inner < len(table) else None)

    def shard_path(self, index: int) -> str:
        """The shard sample ``index`` lies in: what a log line about it may say."""
        return self.paths[bisect.bisect_right(self.starts, index) - 1]

    def members(self, index: int) -> dict[str, bytes]:
        shard, offset = self.sample_offset(index)
        if offset is None:
            raise BadSample(self._gaps[shard])
        try:
            return _read_sample(self._file(shard), offset)
        except BadSample:
            raise
        except MemoryError:
            raise  # the process, not the shard: bounded reads cannot cause it
        except Exception as exn:  # a vanished, truncated, damaged or crafted shard
            raise BadSample(UNREADABLE_SHARD, reason_of(exn)) from exn

    def _offset_table(self) -> OffsetTable | None:
        """The shared table, mapped on first use in this process (None: scan every shard)."""
        if not self._table_opened:
            self._table_opened = True
            if self.offsets_path is not None:
                counts = [b - a for a, b in zip(self.starts, self.starts[1:])]
                try:
                    self._table_file = OffsetTable(self.offsets_path, counts)
                except FileNotFoundError:
                    pass
                except (OSError, ValueError) as exn:
                    log.warning("ignoring offset table %s: %s; scanning shards instead", self.offsets_path, exn)
        return self._table_file

    def _table(self, shard: int) -> np.ndarray:
        if shard not in self._tables:
            path, count = self.paths[shard], self.starts[shard + 1] - self.starts[shard]
            kind = _compression(path)
            if kind:
                log.warning("%s is %s-compressed: random access needs plain .tar shards; its %d samples "
                            "are skipped", path, kind, count)
                table, self._gaps[shard] = np.zeros(0, dtype=np.int64), COMPRESSED_SHARD
            else:
                shared = self._offset_table()
                table = shared.shard(shard, path) if shared is not None else None
                if table is None:
                    table = scan_sample_offsets(path)
                    _hint_once(path)
                if len(table) < count:
                    log.warning("%s holds %d samples, its index says %d: the missing ones are skipped "
                                "(rewrite the index)", path, len(table), count)
                self._gaps[shard] = "sample missing from shard"
            self._tables[shard] = table
        return self._tables[shard]

    def _file(self, shard: int) -> BinaryIO:
        if self._pid != os.getpid():  # forked: file positions are shared with the parent
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= self.max_open_files:
            self._files.popitem(last=False)[1].close()
        self._files[shard] = open(self.paths[shard], "rb")
        return self._files[shard]


def _read_sample(stream: BinaryIO, offset: int) -> dict[str, bytes]:
    """{extension: bytes} of the sample whose first header is at ``offset``."""
    members: dict[str, bytes] = {}
    key = None
    for member in walk(stream, offset):
        sample_key, ext = member_key(member)
        if sample_key is None:
            continue
        if key is None:
            key = sample_key
        elif sample_key != key:
            break
        if ext not in KNOWN_EXTENSIONS:
            continue  # never read
        if ext in members:
            raise BadSample("duplicate member")
        if member.size > MAX_MEMBER_BYTES[ext]:
            raise BadSample("member too large")
        members[ext] = read_data(stream, member)
    if not members:
        raise BadSample("no readable member")
    return members


def _compression(path: str) -> str | None:
    try:
        with open(path, "rb") as stream:
            return compression_of(stream)
    except OSError:
        return None  # the scan reports an unreadable shard


_hinted = False


def _hint_once(path: str) -> None:
    global _hinted
    if not _hinted:
        log.info("no offset table for %s: scanned its headers (index the shards once with python -m "
                 "data.index_shards SHARDS to skip the scan in every worker)", path)
        _hinted = True
