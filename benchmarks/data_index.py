"""Benchmark (not a test): resident memory of loader workers reading a paper-scale index.

  python -m benchmarks.data_index [--samples 233804767] [--per-shard 10000] [--workers 8]
                                  [--private] [--dir DIR]

Writes a simulated shard set of ``--samples`` samples: sparse shard files (the
right sizes, no data: the offsets are what is measured), its index.json and its
offset table (data.offset_tables: 8 bytes a sample), then starts a DataLoader
with ``--workers`` worker processes, as the Poisson reader does, each of which
looks up a sample of every shard through data.tar_index.TarIndex: its first use
of a shard checks that shard's block of the table against the file, which reads
all of it, so every worker ends up touching the whole table (what a reader's
workers do within their first steps at paper scale, batches being spread over
all shards). While the workers are alive, it reads their RSS, PSS and USS
(private pages) from /proc/PID/smaps_rollup, and the same for the table's mapping
alone from /proc/PID/smaps. ``--private`` instead gives every worker its own copy
of the table (read into memory, as per-process tables were before), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from data.offset_tables import table_path, write_table
from data.tar_index import TarIndex

SAMPLE_BYTES = 1024  # the simulated distance between two samples' headers


def build(folder: Path, samples: int, per_shard: int) -> Path:
    """The simulated set's index.json (its table beside it); shard files are sparse."""
    counts = [per_shard] * (samples // per_shard) + ([samples % per_shard] if samples % per_shard else [])
    shardlist = []
    for s, count in enumerate(counts):
        path = folder / f"{s:05d}.tar"
        with open(path, "wb") as f:
            f.truncate((count + 1) * SAMPLE_BYTES)
        shardlist.append({"url": path.name, "nsamples": count})
    index = folder / "index.json"
    index.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shardlist}))
    write_table(table_path(index), ((np.arange(count, dtype=np.int64) * SAMPLE_BYTES, (count + 1) * SAMPLE_BYTES)
                                    for count in counts))
    return index


class _EveryShard(Dataset):
    """Item i: one worker looks up the first sample of every shard."""

    def __init__(self, index: TarIndex, private: str | None, workers: int):
        self.index, self.private, self.workers = index, private, workers

    def __len__(self) -> int:
        return self.workers

    def __getitem__(self, item: int) -> dict:
        start = time.perf_counter()
        if self.private:  # every worker's own copy of the whole table, kept while it lives
            self.copy = np.fromfile(self.private, dtype="<i8")
            total = int(self.copy[:: 512].sum())
        else:
            total = sum(self.index.sample_offset(first)[1] for first in self.index.starts[:-1])
        return {"pid": os.getpid(), "seconds": time.perf_counter() - start, "checksum": total}


def memory(pid: int, mapped: Path | None = None) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) in bytes from smaps_rollup; with ``mapped``,
    the same for that file's mapping alone (from smaps)."""
    def fields(lines) -> dict[str, int]:
        out = {}
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
        return out

    total = fields(Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines())
    out = {"rss": total["Rss"], "pss": total["Pss"], "uss": total["Private_Clean"] + total["Private_Dirty"]}
    if mapped is not None:
        lines, mine, table = Path(f"/proc/{pid}/smaps").read_text().splitlines(), False, []
        for line in lines:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                mine = line.rstrip().endswith(str(mapped))
            elif mine:
                table.append(line)
        t = fields(table)
        out |= {"table_rss": t.get("Rss", 0), "table_pss": t.get("Pss", 0)}
    return out


def run(samples: int, per_shard: int, workers: int, private: bool, folder: Path) -> dict:
    t0 = time.perf_counter()
    index_path = build(folder, samples, per_shard)
    built = time.perf_counter() - t0
    offsets = table_path(index_path).resolve()
    index = TarIndex(index_path)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: intended
    loader = DataLoader(_EveryShard(index, str(offsets) if private else None, workers), batch_size=None,
                        num_workers=workers)
    stream = iter(loader)
    results = [next(stream) for _ in range(workers)]
    per_worker = [memory(r["pid"], None if private else offsets) | {"seconds": r["seconds"]} for r in results]
    main = memory(os.getpid())
    del stream
    gib = 2 ** 30
    return {"samples": samples, "shards": len(index.paths), "workers": workers,
            "table_gib": offsets.stat().st_size / gib, "mode": "private copies" if private else "memory-mapped",
            "build_seconds": built, "main": {k: v / gib for k, v in main.items()},
            "workers_gib": [{k: (v / gib if k != "seconds" else v) for k, v in w.items()} for w in per_worker],
            "sum_pss_gib": sum(w["pss"] for w in per_worker) / gib,
            "sum_uss_gib": sum(w["uss"] for w in per_worker) / gib,
            "sum_rss_gib": sum(w["rss"] for w in per_worker) / gib}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=233_804_767, help="samples in the simulated set")
    parser.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=8, help="loader worker processes")
    parser.add_argument("--private", action="store_true", help="each worker reads its own copy of the table")
    parser.add_argument("--dir", default=None, help="where to write the simulated set (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = run(args.samples, args.per_shard, args.workers, args.private, Path(tmp))
    print(f"{platform.node()}: {r['samples']:,} samples in {r['shards']:,} shards, offset table "
          f"{r['table_gib']:.2f} GiB ({r['mode']}), written in {r['build_seconds']:.0f} s")
    print("process   RSS GiB  PSS GiB  USS GiB  table RSS  table PSS  seconds")
    for i, w in enumerate(r["workers_gib"]):
        print(f"worker {i}  {w['rss']:7.3f}  {w['pss']:7.3f}  {w['uss']:7.3f}  {w.get('table_rss', 0):9.3f}  "
              f"{w.get('table_pss', 0):9.3f}  {w['seconds']:7.1f}")
    m = r["main"]
    print(f"main      {m['rss']:7.3f}  {m['pss']:7.3f}  {m['uss']:7.3f}")
    print(f"workers together: RSS {r['sum_rss_gib']:.3f} GiB (shared pages counted in each), "
          f"PSS {r['sum_pss_gib']:.3f} GiB, USS {r['sum_uss_gib']:.3f} GiB")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
