"""Benchmark (not a test): decoded, resized, normalised images per second per CPU core.

  python -m benchmarks.data_reader [--count 2000] [--source-size 256] [--img-size 224]
                                   [--content synthetic|noise] [--augment]

Writes 256x256 JPEG shards to a temporary folder, then times one process
reading them the way the readers do (tar -> safe decode -> bicubic resize ->
normalise -> tokenize; with --augment, ViP's random crop and flip first), so
the figure is per core. `noise` content is
incompressible and decodes slower than the flat synthetic scenes; photos lie
between. Target: >= 400 images/s/core.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from data.decode import SkipCounter, decode_sample
from data.shards import ShardLimits, write_shards
from data.sources import Example, synthetic_examples
from data.tar_samples import iter_samples
from data.transform import CropFlip, ImageTextTransform


def _noise_examples(count: int, size: int):
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
        yield Example(image, f"noise image number {i}")


def _tokenize(text: str, length: int = 40) -> list[int]:
    ids = list(text.encode())[:length]
    return ids + [0] * (length - len(ids))


def run(count: int, source_size: int, img_size: int, content: str, augment: bool = False) -> float:
    """Images/s of one process over `count` samples."""
    with tempfile.TemporaryDirectory() as tmp:
        examples = (
            synthetic_examples(count, seed=0, size=source_size) if content == "synthetic"
            else _noise_examples(count, source_size)
        )
        index = write_shards(examples, tmp, ShardLimits(max_count=500, jpeg_quality=90))
        paths = sorted(str(p) for p in index.parent.glob("*.tar"))
        transform = ImageTextTransform(img_size, _tokenize, 40, CropFlip(seed=0) if augment else None)
        skips = SkipCounter()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        done = 0
        for number, (_, members) in enumerate(iter_samples(paths, skips)):
            transform(*decode_sample(members, draft_size=transform.decode_size), (0, number))
            done += 1
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    if done != count or skips.total:
        raise RuntimeError(f"benchmark read {done} of {count} samples, skipped {dict(skips)}")
    print(f"{content}{' (crop+flip)' if augment else ''}: {done} images {source_size}px -> {img_size}px in {wall:.2f} s wall, {cpu:.2f} s CPU: "
          f"{done / wall:.0f} images/s wall, {done / cpu:.0f} images/s per CPU-second")
    return done / cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_reader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="images to write and read")
    parser.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--img-size", type=int, default=224, help="model input side")
    parser.add_argument("--content", choices=["synthetic", "noise", "both"], default="both")
    parser.add_argument("--augment", action="store_true", help="ViP's random resized crop and flip")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # one core: the per-core figure
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, Pillow {Image.__version__}")
    for content in (["synthetic", "noise"] if args.content == "both" else [args.content]):
        run(args.count, args.source_size, args.img_size, content, args.augment)


if __name__ == "__main__":
    main()
