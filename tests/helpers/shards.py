"""Shards as other tools write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import webdataset as wds


def write_like_img2dataset(folder: Path, samples: Iterable[tuple[bytes, str, dict]], per_shard: int) -> None:
    """LAION-style shards as img2dataset writes them: webdataset.ShardWriter, key.jpg + key.txt +
    key.json for each (jpeg, caption, metadata) in ``samples``, keys 000000000 on, in
    folder/00000.tar on (``per_shard`` samples each)."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (jpeg, caption, metadata) in enumerate(samples):
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg, "txt": caption, "json": json.dumps(metadata).encode()})
