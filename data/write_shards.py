"""CLI: write webdataset shards and a wids index from a folder, a table or the synthetic generator.

  python -m data.write_shards OUT_DIR --folder IMAGES
  python -m data.write_shards OUT_DIR --table pairs.csv [--path-column path --caption-column caption]
  python -m data.write_shards OUT_DIR --synthetic 5000 --seed 0 --size 64 [--split heldout]

Folder: every image (.jpg/.jpeg/.png/.webp, recursive) with a same-named .txt
caption. Table: .csv/.tsv with a header row, or .jsonl objects; columns
`path` (relative to the table's folder, or absolute) and `caption` by default.
Images are re-encoded as JPEG; bad inputs are skipped and counted.
OUT_DIR must be empty or new: shards left there by an earlier run would lie
beside the new ones, and a set read without the new index.json (a glob, say)
would count them too. `--force` writes into it anyway.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data.decode import SkipCounter
from data.shards import ShardLimits, write_shards
from data.sources import folder_examples, synthetic_examples, table_examples
from data.synthetic import SPLITS


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.force:
        raise SystemExit(f"error: {out_dir} is not empty: write into a new folder, or pass --force "
                         "(shards of the same names are replaced, other files stay)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    skips = SkipCounter()
    if args.folder:
        examples = folder_examples(args.folder, skips)
    elif args.table:
        examples = table_examples(args.table, skips, args.path_column, args.caption_column)
    else:
        examples = synthetic_examples(args.synthetic, args.seed, args.size, args.split)
    limits = ShardLimits(max_count=args.max_count, max_size=args.max_size, jpeg_quality=args.jpeg_quality)
    index_path = write_shards(examples, args.out_dir, limits, prefix=args.prefix)
    print(f"index: {index_path}")
    print(f"skipped: {skips.total} {dict(skips)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.write_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for the .tar shards and index.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="folder of images with same-named .txt captions")
    source.add_argument("--table", help=".csv, .tsv or .jsonl of image path and caption")
    source.add_argument("--synthetic", type=int, metavar="N", help="write N procedural scenes")
    parser.add_argument("--path-column", default="path", help="table column holding the image path")
    parser.add_argument("--caption-column", default="caption", help="table column holding the caption")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: scene seed")
    parser.add_argument("--size", type=int, default=64, help="synthetic: image side in pixels")
    parser.add_argument("--split", choices=sorted(SPLITS), default="train", help="synthetic: split")
    parser.add_argument("--max-count", type=int, default=ShardLimits.max_count, help="samples per shard")
    parser.add_argument("--max-size", type=int, default=ShardLimits.max_size, help="bytes per shard file")
    parser.add_argument("--jpeg-quality", type=int, default=ShardLimits.jpeg_quality, help="JPEG quality 1-100")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    return parser


if __name__ == "__main__":
    main()
