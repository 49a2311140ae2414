"""The shards ``data.shards`` names, and their index: counts and offsets, built once, cached.

``data.shards`` may be

- a folder with an ``index.json`` (written by ``data.write_shards`` or ``widsindex
  create``): the shards it lists, in its order;
- a folder of ``.tar`` files without one: every ``*.tar`` in it, sorted;
- a glob (``laion/*.tar``): its matches, sorted;
- a brace pattern (``laion/{00000..23380}.tar``, how img2dataset names its shards), in
  the pattern's order; pieces may be globs. Names that do not exist are left out with a
  warning: a download that failed leaves a gap.

Each shard must be named once, whichever form names it: two names of one file
(``a.tar`` and ``./a.tar``, a symbolic or hard link to another shard, a pattern
matching a name twice) are refused, naming both, since N (and epsilon with it)
would count their examples twice.

Shards from any webdataset writer work (``webdataset.ShardWriter``, img2dataset, tarp):
a sample is a run of members sharing a key, in any member order.

Reading needs an index: a sample count per shard and the offset table
(``data.offset_tables``). Both come from reading every header once, so they are
built once, in parts (one per rank, each on several processes, then merged by
one), and cached: beside the shards when that folder is writable (``index.json``
for a folder, ``index-<digest>.json`` for a pattern, the digest naming the shard
list), else in a fallback folder (the trainer's run folder). Every file appears
under its final name only once complete. A cached index is used only if it lists
the same shards at the same sizes, and it never decides which files are opened:
the shard paths always come from ``data.shards``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.offset_tables import NO_TABLE, OFFSETS_SUFFIX, read_blocks, scan_shards, table_path, write_table
from data.wids_index import INDEX_NAME, read_shard_list, refuse_duplicates

log = logging.getLogger(__name__)

FORMS = ("a folder of .tar shards (with or without index.json), a glob ('laion/*.tar') "
         "or a brace pattern ('laion/{00000..23380}.tar')")


@dataclass(frozen=True, kw_only=True)
class ShardSet:
    """The shards named by a ``data.shards`` value."""

    spec: str
    paths: list[str]  # as data.shards names them (relative paths stay relative)
    root: Path  # absolute: the folder every shard lies under; index urls are relative to it
    whole_folder: bool = False  # data.shards is a folder: its index is index.json
    listed_by: Path | None = None  # the index.json that named them (its counts are taken as given)
    listed_counts: list[int] | None = None

    @property
    def urls(self) -> list[str]:
        return [Path(os.path.relpath(os.path.abspath(p), self.root)).as_posix() for p in self.paths]

    @property
    def digest(self) -> str:
        """Names the shard list: another list is another index."""
        return hashlib.sha256("\n".join(os.path.abspath(p) for p in self.paths).encode()).hexdigest()[:16]

    @property
    def beside(self) -> Path:
        """The folder an index beside the shards lies in (absolute)."""
        return (self.listed_by.parent if self.listed_by else self.root).absolute()

    def index_dir(self, fallback: Path | None) -> Path:
        """Where a new index goes: beside the shards if that folder is writable, else ``fallback``."""
        return self.beside if fallback is None or os.access(self.beside, os.W_OK) else Path(fallback)

    def files_in(self, folder: Path) -> tuple[Path, Path]:
        """(counts, offset table) of this shard set's index in ``folder``: beside the shards
        index.json (a whole folder, or the listing index) or index-<digest>.json; elsewhere
        always index-<digest>.json (the digest names the shard list)."""
        folder = Path(folder)
        here = folder.absolute() == self.beside
        if self.listed_by is not None:
            return self.listed_by, table_path(self.listed_by) if here else \
                folder / f"index-{self.digest}{OFFSETS_SUFFIX}"
        index = folder / (INDEX_NAME if here and self.whole_folder else f"index-{self.digest}.json")
        return index, table_path(index)


@dataclass(frozen=True, kw_only=True)
class ShardIndex:
    """An indexed shard set: what data.tar_index.TarIndex.of reads."""

    paths: list[str]
    counts: list[int]
    index_path: Path  # the counts (wids format)
    offsets_path: Path  # the offset table


def resolve(spec: str | Path) -> ShardSet:
    """The shards ``spec`` names (see the module docstring); ValueError if none."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and (path / INDEX_NAME).is_file():
        path = path / INDEX_NAME
    if path.is_file() and path.suffix == ".json":
        listed = read_shard_list(path)
        paths = [p for p, _ in listed]
        unlisted = {p.absolute() for p in path.parent.glob("*.tar")} - {Path(p).absolute() for p in paths}
        if unlisted:
            log.warning("%s lists %d shards; %d other .tar files beside it are not read (delete it to "
                        "index them all)", path, len(paths), len(unlisted))
        return ShardSet(spec=spec, paths=paths, root=path.parent.absolute(), listed_by=path,
                        listed_counts=[c for _, c in listed])
    if path.is_dir():
        paths = sorted(str(p) for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not paths:
            raise ValueError(f"data.shards={spec}: no .tar files (and no {INDEX_NAME}) in this folder; give {FORMS}")
        refuse_duplicates(paths, f"data.shards={spec}")
        return ShardSet(spec=spec, paths=paths, root=path.absolute(), whole_folder=True)
    paths = _expand(spec)
    if not paths:
        raise ValueError(f"data.shards={spec}: no .tar files match; give {FORMS}")
    refuse_duplicates(paths, f"data.shards={spec}")
    root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]))
    return ShardSet(spec=spec, paths=paths, root=root)


def _expand(spec: str) -> list[str]:
    from braceexpand import braceexpand

    pieces = list(braceexpand(spec))
    if len(pieces) == 1 and not glob.has_magic(spec):
        return [spec] if Path(spec).is_file() else []
    found, missing = [], []
    for piece in pieces:
        if glob.has_magic(piece):
            found += sorted(p for p in glob.glob(piece) if Path(p).is_file())
        elif Path(piece).is_file():
            found.append(piece)
        else:
            missing.append(piece)
    if missing and found:
        log.warning("data.shards=%s: %d of the %d names it expands to do not exist (first: %s); "
                    "using the %d that do", spec, len(missing), len(pieces), missing[0], len(found))
    return found


# --------------------------------------------------------------------------- cached indices

def cached_index(shards: ShardSet, fallback: Path | None = None) -> ShardIndex | None:
    """The index of ``shards`` if one was built before (beside them, or in ``fallback``)."""
    folders = [shards.beside] + ([Path(fallback)] if fallback is not None else [])
    for folder in folders:
        index_path, offsets = shards.files_in(folder)
        # a listing index's counts are given; only its table is ours
        counts = shards.listed_counts if shards.listed_by is not None else _cached_counts(index_path, shards)
        if counts is not None and _fits(offsets, counts):
            return ShardIndex(paths=shards.paths, counts=list(counts), index_path=index_path, offsets_path=offsets)
    return None


def _cached_counts(index_path: Path, shards: ShardSet) -> list[int] | None:
    """Counts from an index we wrote, if it lists exactly these shards at their current sizes."""
    try:
        entries = json.loads(index_path.read_text())["shardlist"]
        if [e["url"] for e in entries] != shards.urls:
            return None
        if any(e["filesize"] != os.path.getsize(p) for e, p in zip(entries, shards.paths)):
            return None
        counts = [e["nsamples"] for e in entries]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return counts if all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) else None


def _fits(offsets: Path, counts: list[int]) -> bool:
    try:
        return offsets.stat().st_size == (sum(counts) + len(counts)) * 8
    except OSError:
        return False


# --------------------------------------------------------------------------- building one

def parts_dir(shards: ShardSet, folder: Path, job: str) -> Path:
    """Where the ranks of ``job`` leave their parts of a new index of ``shards`` (a folder of
    its own: two jobs indexing the same shards at once never read each other's parts)."""
    return Path(folder) / f".index-{shards.digest}.parts-{job}"


def scan_part(shards: ShardSet, folder: Path, rank: int, world_size: int, processes: int = 1,
              job: str = "") -> None:
    """Rank ``rank``'s part of the index: shards rank, rank + world_size, ..., read on
    ``processes`` processes, written to the parts folder under final names when complete.
    ``job`` names the indexing job (the same on every rank of it, unique among jobs)."""
    mine = shards.paths[rank::world_size]
    tables = scan_shards(mine, processes)
    out = parts_dir(shards, folder, job)
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / f"part-{rank:05d}{OFFSETS_SUFFIX}",
                ((table, os.path.getsize(path)) for table, path in zip(tables, mine)))
    _write_json(out / f"part-{rank:05d}.json", {"counts": [len(t) for t in tables]})


def merge_parts(shards: ShardSet, folder: Path, world_size: int, job: str = "") -> ShardIndex:
    """One process: the parts of all ranks of ``job`` -> the offset table, then the index
    (last, so a reader that finds the index finds the table complete); the parts are removed."""
    src = parts_dir(shards, folder, job)
    parts = []
    for rank in range(world_size):
        counts = json.loads((src / f"part-{rank:05d}.json").read_text())["counts"]
        parts.append(list(read_blocks(src / f"part-{rank:05d}{OFFSETS_SUFFIX}", counts)))
    blocks = [parts[s % world_size][s // world_size] for s in range(len(shards.paths))]
    index_path, offsets = shards.files_in(folder)
    if shards.listed_by is not None:
        counts = shards.listed_counts
        write_table(offsets, [_as_listed(block, listed, path)
                              for block, listed, path in zip(blocks, counts, shards.paths)])
    else:
        counts = [len(table) for table, _ in blocks]
        write_table(offsets, blocks)
        _write_json(index_path, {
            "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": Path(shards.spec).name,
            # urls are relative to this folder when the index lies beside the shards (a wids
            # index then); in a fallback folder they are relative to shards_root
            "shards_root": str(shards.root),
            "shardlist": [{"url": url, "nsamples": n, "filesize": size}
                          for url, n, (_, size) in zip(shards.urls, counts, blocks)]})
    shutil.rmtree(src, ignore_errors=True)
    return ShardIndex(paths=shards.paths, counts=list(counts), index_path=index_path, offsets_path=offsets)


def _as_listed(block: tuple[np.ndarray, int], listed: int, path: str) -> tuple[np.ndarray, int]:
    """A shard's block with exactly the sample count its index claims: a shard with fewer
    samples gets no table (it is scanned when read, and its missing samples skipped)."""
    offsets, size = block
    if len(offsets) < listed:
        log.warning("%s holds %d samples, its index says %d: the missing ones will be skipped "
                    "(rewrite the index)", path, len(offsets), listed)
        return np.zeros(listed, dtype=np.int64), NO_TABLE
    return offsets[:listed], size


def index_shard_set(spec: str | Path, fallback: Path | None = None, processes: int = 1) -> ShardIndex:
    """One process: the cached index of ``spec``'s shards, or a new one, built on ``processes``."""
    shards = resolve(spec)
    found = cached_index(shards, fallback)
    if found is not None:
        return found
    folder, job = shards.index_dir(fallback), f"pid{os.getpid()}"
    scan_part(shards, folder, 0, 1, processes, job)
    return merge_parts(shards, folder, 1, job)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
