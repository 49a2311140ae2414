"""CLI: index a shard set once (sample counts and offset table), so no job or worker scans it.

  python -m data.index_shards SHARDS [--processes N]

SHARDS is anything ``data.shards`` accepts: a folder of .tar shards (with or without
index.json), an index.json, a glob ('laion/*.tar') or a brace pattern
('laion/{00000..23380}.tar'). The index is written where the trainer looks for it
(``data.shard_sets``: beside the shards when that folder is writable); an index
already there that lists the same shards at the same sizes is kept.

A command of its own, above ``data.shard_sets`` and ``data.offset_tables``, so neither
of those imports a module that imports it.
"""

from __future__ import annotations

import argparse
import logging
import os

from data.shard_sets import index_shard_set


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.index_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="a folder of .tar shards (with or without index.json), an index.json, "
                        "a glob ('laion/*.tar') or a brace pattern ('laion/{00000..23380}.tar')")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="header-reading processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        index = index_shard_set(args.shards, processes=args.processes)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"index: {index.index_path} ({len(index.paths)} shards, {sum(index.counts):,} samples), "
          f"offsets: {index.offsets_path}")


if __name__ == "__main__":
    main()
