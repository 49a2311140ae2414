"""Where shard writers get (image, caption, metadata) examples from.

Three sources: a folder of images with same-named `.txt` captions, a table
(CSV, TSV or JSONL) of image path and caption, and the synthetic generator.
Unusable source rows are skipped, counted in the given `SkipCounter` and
logged once per reason, never fatal.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data.decode import BadSample, SkipCounter, decode_caption, decode_image
from data.synthetic import synthetic_example

FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass
class Example:
    image: Image.Image
    caption: str
    metadata: dict = field(default_factory=dict)


def folder_examples(root: str | Path, skips: SkipCounter) -> Iterator[Example]:
    """Every image under `root` (recursive, sorted) whose `<stem>.txt` caption sits next to it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES):
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            skips.record("missing caption", str(path))
            continue
        example = _load(path, caption_path.read_bytes(), skips)
        if example is not None:
            example.metadata["source"] = str(path.relative_to(root))
            yield example


def table_examples(
    table: str | Path, skips: SkipCounter, path_column: str = "path", caption_column: str = "caption"
) -> Iterator[Example]:
    """Rows of a .csv, .tsv (header row required) or .jsonl table; relative image
    paths are resolved against the table's folder."""
    table = Path(table)
    suffix = table.suffix.lower()
    if suffix not in TABLE_DELIMITERS and suffix != ".jsonl":
        raise ValueError(f"table {table} must end in .csv, .tsv or .jsonl")
    for row in _rows(table, suffix, skips):
        if not isinstance(row, dict) or not isinstance(row.get(path_column), str) or caption_column not in row:
            skips.record("row without path/caption columns", f"{table}: expected columns {path_column!r}, {caption_column!r}")
            continue
        image_path = table.parent / row[path_column]
        if not image_path.is_file():
            skips.record("missing image file", str(image_path))
            continue
        example = _load(image_path, str(row[caption_column]).encode("utf-8", "replace"), skips)
        if example is not None:
            example.metadata["source"] = row[path_column]
            yield example


def synthetic_examples(count: int, seed: int, size: int, split: str = "train") -> Iterator[Example]:
    """`count` procedural scenes (data.synthetic), metadata = the scene description."""
    for index in range(count):
        image, caption, metadata = synthetic_example(seed, index, size, split)
        yield Example(image, caption, metadata | {"seed": seed, "index": index, "split": split})


def _rows(table: Path, suffix: str, skips: SkipCounter) -> Iterator[object]:
    with open(table, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        if suffix == ".jsonl":
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        skips.record("undecodable table row", str(table))
        else:
            yield from csv.DictReader(f, delimiter=TABLE_DELIMITERS[suffix])


def _load(image_path: Path, caption_bytes: bytes, skips: SkipCounter) -> Example | None:
    try:
        caption = decode_caption(caption_bytes)
        image = decode_image(image_path.read_bytes())
    except BadSample as bad:
        skips.record(bad.reason, str(image_path))
        return None
    return Example(image, caption)
