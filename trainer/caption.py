"""Caption images, or classify them zero-shot, with a trained DP-Cap.

    python -m trainer.caption CHECKPOINT IMAGE [IMAGE ...] [--config PRESET|FILE]
        [--labels zebra,dog,cat] [--method trie|loss] [--prompt "this is a photo of a"]

Without ``--labels`` every image gets a greedy caption (one encoder pass, KV
cache, batched); with them it gets the label whose caption "<prompt> <label>"
the model finds most likely ("loss": the training loss of each label, as the
original DP-Cap code scores them) or that constrained decoding after the prompt
reaches ("trie": cost grows with the labels' length, not their number). One
line per image, ``IMAGE<TAB>text``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import models
from trainer.common.build import build_tokenizer
from trainer.common.evaluation import describe
from trainer.common.inputs import image_file_pixels, transform
from trainer.common.weights import (
    add_model_arguments,
    load_trained_model,
    locate,
    pick_device,
    refuse_classifier,
)

PROMPT = models.dpcap.ZERO_SHOT_PROMPT


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.caption",
                                     description="Caption images, or classify them zero-shot, with a DP-Cap.")
    add_model_arguments(parser)
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP)")
    parser.add_argument("--labels", default=None, help="comma-separated class names: classify instead of caption")
    parser.add_argument("--method", choices=("trie", "loss"), default="trie", help="zero-shot scoring")
    parser.add_argument("--prompt", default=PROMPT, help="text before the label (zero-shot)")
    parser.add_argument("--max-length", type=int, default=None, help="caption tokens (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        labels = None
        if args.labels is not None:
            labels = [name.strip() for name in args.labels.split(",") if name.strip()]
            if not labels:
                raise ValueError(f"--labels {args.labels!r}: no class names")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        device = pick_device(args.device)
        cfg, weights = locate(args.checkpoint, args.config)
        refuse_classifier(cfg, args.checkpoint)
        if not cfg.is_captioner:
            raise ValueError(f"{args.checkpoint} holds a {cfg.model.name}, not a DP-Cap: it cannot caption")
        to_pixels = transform(cfg, None)
        pixels = [image_file_pixels(Path(f), to_pixels) for f in args.images]  # every file checked first
        model = load_trained_model(cfg, weights).to(device)
        tokenizer = build_tokenizer(cfg)
        lines = []
        for i in range(0, len(pixels), args.batch_size):
            batch = torch.stack(pixels[i: i + args.batch_size]).to(device)
            texts = describe(model, tokenizer, batch, labels, args.method, args.prompt, args.max_length)
            lines += [f"{name}\t{text}" for name, text in zip(args.images[i: i + args.batch_size], texts)]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file, Python would not import trainer/ as the trainer package
        sys.exit("run it as a module: python -m trainer.caption ...")
    sys.exit(main())
