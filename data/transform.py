"""Turning a decoded (image, caption) into model inputs: pixels and token ids."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTextTransform:
    """Bicubic resize to `img_size` x `img_size` (whole image, no crop: captions
    name positions), ImageNet normalisation, and `tokenize(caption)`, which must
    return exactly `text_length` ids (the trainer passes e.g.
    `lambda s: tokenizer.encode(s, text_length)`)."""

    def __init__(self, img_size: int, tokenize: Callable[[str], list[int]], text_length: int):
        if img_size < 1 or text_length < 1:
            raise ValueError(f"img_size and text_length must be >= 1, got {img_size}, {text_length}")
        self.img_size = img_size
        self.tokenize = tokenize
        self.text_length = text_length
        self._scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(3, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)

    def __call__(self, image: Image.Image, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float [3, img_size, img_size], long [text_length])."""
        size = (self.img_size, self.img_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        pixels = pixels.float().mul_(self._scale).sub_(self._shift)
        ids = self.tokenize(caption)
        if len(ids) != self.text_length:
            raise ValueError(
                f"tokenize returned {len(ids)} ids, expected text_length={self.text_length}: "
                "make it pad/truncate to text_length"
            )
        return pixels, torch.tensor(ids, dtype=torch.long)
