"""Writing examples into webdataset tar shards plus a wids index.

Each example becomes `{key}.jpg`, `{key}.txt` and, when it has metadata,
`{key}.json`, with keys numbered from 0 across shards. A shard is closed when
it holds `max_count` samples or the next sample would make the file exceed
`max_size` bytes (a single sample larger than that gets a shard of its own).
Shards and the index are written under temporary names and renamed when
complete, so a reader never sees a partial file. The offset table of the set
(`index.offsets`, see `data.offset_tables`) is written before the index, for
random access. The index is the format `widsindex create` writes (shard URLs
relative to the index file), so `wids.ShardListDataset(index_path)` reads it too.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from data.offset_tables import scan_sample_offsets, table_path, write_table
from data.sources import Example
from data.wids_index import INDEX_NAME

log = logging.getLogger(__name__)

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to a multiple of this on close


@dataclass(frozen=True)
class ShardLimits:
    max_count: int = 10_000
    max_size: int = 2**30  # bytes per shard file
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")
        if self.max_size < 3 * _RECORD:
            raise ValueError(f"max_size must be >= {3 * _RECORD} bytes, got {self.max_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


def write_shards(
    examples: Iterable[Example], out_dir: str | Path, limits: ShardLimits = ShardLimits(), prefix: str = "shard"
) -> Path:
    """Write `examples` as `<out_dir>/<prefix>-NNNNNN.tar` shards; return the index path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shardlist, blocks, shard = [], [], None
    for number, example in enumerate(examples):
        members = _encode(example, limits.jpeg_quality)
        sample_bytes = sum(_member_bytes(data) for data in members.values())
        if shard is not None and (
            shard.count >= limits.max_count or _file_bytes(shard.payload + sample_bytes) > limits.max_size
        ):
            shardlist.append(shard.close(blocks))
            shard = None
        if shard is None:
            shard = _OpenShard(out_dir / f"{prefix}-{len(shardlist):06d}.tar")
        shard.add(f"{number:09d}", members, sample_bytes)
    if shard is not None:
        shardlist.append(shard.close(blocks))
    if not shardlist:
        raise ValueError("no examples to write: the source is empty or every example was skipped")
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": prefix, "shardlist": shardlist}
    index_path = out_dir / INDEX_NAME
    write_table(table_path(index_path), blocks)
    _write_atomically(index_path, json.dumps(index, indent=2).encode())
    log.info("wrote %d samples in %d shards, index %s", sum(s["nsamples"] for s in shardlist), len(shardlist), index_path)
    return index_path


class _OpenShard:
    """One tar being written under a temporary name."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp_path = path.with_name(f".{path.name}.tmp")
        self.stream = open(self.tmp_path, "wb")
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0)
        self.count = 0
        self.payload = 0

    def add(self, key: str, members: dict[str, bytes], sample_bytes: int) -> None:
        self.writer.write({"__key__": key, **members})
        self.count += 1
        self.payload += sample_bytes

    def close(self, blocks: list) -> dict:
        """Finish the file, append its (offsets, size) to ``blocks``; its index entry."""
        self.writer.close()
        self.stream.close()
        md5 = hashlib.md5()
        with open(self.tmp_path, "rb") as f:
            for chunk in iter(lambda: f.read(2**20), b""):
                md5.update(chunk)
        os.replace(self.tmp_path, self.path)
        blocks.append((scan_sample_offsets(self.path), self.path.stat().st_size))
        return {
            "url": self.path.name,
            "nsamples": self.count,
            "filesize": self.path.stat().st_size,
            "md5sum": md5.hexdigest(),
        }


def _encode(example: Example, jpeg_quality: int) -> dict[str, bytes]:
    buffer = io.BytesIO()
    example.image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality)
    members = {"jpg": buffer.getvalue(), "txt": example.caption.encode("utf-8")}
    if example.metadata:
        members["json"] = json.dumps(example.metadata, sort_keys=True).encode("utf-8")
    return members


def _member_bytes(data: bytes) -> int:
    """Header plus data padded to whole blocks (USTAR names under 100 bytes need no extra header)."""
    return _BLOCK + -(-len(data) // _BLOCK) * _BLOCK


def _file_bytes(payload: int) -> int:
    """Size of a tar file holding `payload` member bytes: two end blocks, padded to a record."""
    return -(-(payload + 2 * _BLOCK) // _RECORD) * _RECORD


def _write_atomically(path: Path, data: bytes) -> None:
    tmp_path = path.with_name(f".{path.name}.tmp")
    tmp_path.write_bytes(data)
    os.replace(tmp_path, path)
