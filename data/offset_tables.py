"""Where each sample of a tar shard starts, saved next to the shard.

Random access needs, per shard, the header offset of each sample's first
member. Finding them means reading every header of the shard: about a second
for a 10,000-sample shard, which every loader worker of every rank would
otherwise repeat for every shard it touches. `write_shards` therefore saves
the offsets as `<shard>.offsets`: raw little-endian int64, the shard's size
appended as a staleness check. Raw numbers, not .npy: nothing to parse, so a
hostile table cannot make the reader allocate or unpickle anything; its size
must be exactly what the index's sample count implies. Readers load it whole
(not memory-mapped: a mapping keeps a file descriptor open, and a data set has
more shards than a process may open files). A missing, stale or malformed
table is ignored (the reader scans instead); a wrong one can only make a
sample unreadable or mislabelled, since reading re-checks every header it is
pointed at.

  python -m data.offset_tables INDEX.json   # tables for shards written by other tools
"""

from __future__ import annotations

import argparse
import logging
import os
import tarfile
from pathlib import Path

import numpy as np

from data.tar_samples import member_key
from data.wids_index import read_shard_list

log = logging.getLogger(__name__)

OFFSETS_SUFFIX = ".offsets"
_DTYPE = np.dtype("<i8")


def scan_sample_offsets(shard: str | Path) -> np.ndarray:
    """Header offset of each sample's first member, read from the shard's headers.

    A truncated or unreadable shard yields the samples before the break."""
    starts: list[int] = []
    key = None
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                sample_key, _ = member_key(info)
                if sample_key is not None and sample_key != key:
                    starts.append(info.offset)
                    key = sample_key
    except (tarfile.TarError, OSError, EOFError) as exn:
        log.warning("shard %s is truncated or unreadable (%s); its later samples count as missing", shard, exn)
        if starts:
            starts.pop()  # the sample being read when the tar broke may be incomplete
    return np.array(starts, dtype=np.int64)


def offsets_path(shard: str | Path) -> Path:
    return Path(f"{shard}{OFFSETS_SUFFIX}")


def write_offset_table(shard: str | Path, offsets: np.ndarray) -> None:
    """Save `offsets` for `shard` (written under a temporary name, then renamed)."""
    table = np.append(np.asarray(offsets, dtype=_DTYPE), os.path.getsize(shard)).astype(_DTYPE)
    path = offsets_path(shard)
    tmp_path = path.with_name(f".{path.name}.tmp")
    tmp_path.write_bytes(table.tobytes())
    os.replace(tmp_path, path)


def load_offset_table(shard: str | Path, nsamples: int) -> np.ndarray | None:
    """The saved offsets of `shard`, or None when there is no usable table."""
    path = offsets_path(shard)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size != (nsamples + 1) * _DTYPE.itemsize:
            raise ValueError(f"not {nsamples} samples long")
        table = np.fromfile(path, dtype=_DTYPE).astype(np.int64)
        size = os.path.getsize(shard)
        if table[-1] != size or not _increasing_within(table[:-1], size):
            raise ValueError("does not match the shard (rewritten since?)")
    except (OSError, ValueError) as exn:
        log.warning("ignoring offset table %s: %s", path, exn)
        return None
    return table[:-1]


def write_index_offset_tables(index_path: str | Path) -> list[str]:
    """Tables for every shard of a wids index; returns the shards whose sample count disagrees with it."""
    mismatched = []
    for path, count in read_shard_list(index_path):
        offsets = scan_sample_offsets(path)
        if len(offsets) == count:
            write_offset_table(path, offsets)
        else:
            mismatched.append(f"{path}: {len(offsets)} samples, index says {count}")
    return mismatched


def _increasing_within(offsets: np.ndarray, size: int) -> bool:
    if not len(offsets):
        return True
    return bool(offsets[0] >= 0 and offsets[-1] < size and np.all(np.diff(offsets) > 0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.offset_tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", help="a wids index.json (as written by data.write_shards or widsindex create)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mismatched = write_index_offset_tables(args.index)
    for line in mismatched:
        print(f"no table written (fix the index or the shard): {line}")
    print(f"offset tables written next to the shards of {args.index}; {len(mismatched)} shards without")


if __name__ == "__main__":
    main()
