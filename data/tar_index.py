"""Random access to the samples of a wids-indexed shard set, safely decoded later.

The index (`index.json`, the wids format) gives the shards in order and their
sample counts; global index i is sample i - offset of its shard, where a
shard's samples are its runs of regular members sharing a key, the same
grouping wids uses. Member positions come from one header scan per shard,
done lazily and cached (every shard's table stays cached, like wids with
lru_size >= number of shards). Members are read with pread, only for known
extensions and under the size caps, so nothing else in a shard is ever read.
At most `max_open_files` shard files are open at once (least recently used
closed first): a data set has more shards than a process may open files.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
import json
import logging
import os
import tarfile
from pathlib import Path

from data.decode import KNOWN_EXTENSIONS, MAX_MEMBER_BYTES, BadSample
from data.tar_samples import split_member_name

log = logging.getLogger(__name__)

# One sample's members: {extension: (data offset, size)}.
MemberTable = list[dict[str, tuple[int, int]]]
_TOO_LARGE = "__too_large__"  # table entry marking a sample with an oversized member


class TarIndex:
    """`len(index)` samples; `index.members(i) -> {extension: bytes}` raises BadSample."""

    def __init__(self, index_path: str | Path, max_open_files: int = 64):
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.max_open_files = max_open_files
        index_path = Path(index_path)
        try:
            spec = json.loads(index_path.read_text())
            shards = spec["shardlist"]
            self.paths = [str(index_path.parent / shard["url"]) for shard in shards]
            counts = [int(shard["nsamples"]) for shard in shards]
        except (OSError, ValueError, KeyError, TypeError) as exn:
            raise ValueError(f"{index_path} is not a readable wids index (write one with data.write_shards)") from exn
        if not counts:
            raise ValueError(f"{index_path} lists no shards")
        self.starts = [0]
        for count in counts:
            self.starts.append(self.starts[-1] + count)
        self._tables: dict[int, MemberTable] = {}
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently used first
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):  # worker processes reopen files and rescan lazily
        return {"paths": self.paths, "starts": self.starts, "max_open_files": self.max_open_files}

    def __setstate__(self, state):
        self.__dict__.update(state, _tables={}, _files=OrderedDict(), _pid=os.getpid())

    def members(self, index: int) -> dict[str, bytes]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self.starts, index) - 1
        table = self._table(shard)
        inner = index - self.starts[shard]
        if inner >= len(table):
            raise BadSample("sample missing from shard")
        if not table[inner]:
            raise BadSample("no readable member")
        if _TOO_LARGE in table[inner]:
            raise BadSample("member too large")
        try:
            fd = self._file(shard)
            return {ext: os.pread(fd, size, offset) for ext, (offset, size) in table[inner].items()}
        except OSError as exn:  # the shard vanished or failed since it was scanned
            raise BadSample("unreadable shard") from exn

    def _table(self, shard: int) -> MemberTable:
        if shard not in self._tables:
            self._tables[shard] = _scan(self.paths[shard])
        return self._tables[shard]

    def _file(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are left to the parent
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= self.max_open_files:
            os.close(self._files.popitem(last=False)[1])
        self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._files[shard]


def _scan(path: str) -> MemberTable:
    """Member positions of each sample; a bad sample gets an empty dict (decoding then rejects it)."""
    table: MemberTable = []
    key = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member_key, ext = split_member_name(info.name)
                if member_key is None:
                    continue
                if member_key != key:
                    table.append({})
                    key = member_key
                sample = table[-1]
                if ext not in KNOWN_EXTENSIONS:
                    continue  # never read
                if info.size > MAX_MEMBER_BYTES[ext]:
                    sample[_TOO_LARGE] = (0, 0)
                sample[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as exn:
        log.warning("shard %s is truncated or unreadable (%s); its later samples count as missing", path, exn)
        if table:
            table.pop()  # the sample being read when the tar broke may be incomplete
    return table


def indexed_sample_count(index_path: str | Path) -> int:
    """Number of samples a wids index lists: the `num_examples` of the Poisson sampler."""
    return len(TarIndex(index_path))
