"""Sample bytes and captions for the data tests: random images encoded, a byte tokenizer
whose tokens decode back to the caption, the captions a batch or an index holds."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def random_image(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(seed: int, size: int = 16) -> bytes:
    return encoded(random_image(seed, size), "JPEG")


def byte_tokens(text: str, length: int = 16) -> list[int]:
    """The caption's UTF-8 bytes as tokens, cut or padded with 0 to ``length``."""
    ids = list(text.encode())[:length]
    return ids + [0] * (length - len(ids))


def batch_captions(batch) -> list[str]:
    """The captions of a batch tokenized by byte_tokens."""
    return [bytes(t for t in row.tolist() if t).decode() for row in batch.tokens]


def index_captions(index) -> list[str]:
    """Every caption a data.tar_index.TarIndex holds, in order."""
    return [index.members(i)["txt"].decode() for i in range(len(index))]


class FixedBatches:
    """A batch source giving the same micro-batches at every step."""

    def __init__(self, micro_batches):
        self.micro_batches = micro_batches

    def step_batches(self, step):
        return self.micro_batches
