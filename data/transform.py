"""Turning a decoded (image, caption) into model inputs: pixels and token ids."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class CropFlip:
    """MAE's (and ViP's) augmentation: a random crop of ``scale`` of the area and aspect
    ratio in ``ratio`` (torchvision's RandomResizedCrop), then a horizontal flip with
    probability 1/2. Random from (seed, sample words), so that a resumed run, or any
    loader worker, draws the same crop for the same example at the same step."""

    seed: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True  # False: crops only (digits, text: images that a mirror changes)

    def __call__(self, image: Image.Image, words: Sequence[int]) -> Image.Image:
        rng = np.random.default_rng([self.seed, *words])
        width, height = image.size
        box = (0, 0, width, height)  # torchvision's fallback is a centre crop; whole image here
        for _ in range(10):
            area = width * height * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                box = (left, top, left + w, top + h)
                break
        image = image.crop(box)
        flipped = rng.random() < 0.5  # drawn either way: the crops do not depend on ``flip``
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped and self.flip else image


class ImageTextTransform:
    """Bicubic resize to `img_size` x `img_size` (whole image, no crop, unless
    `augment`: captions name positions), ImageNet normalisation, and
    `tokenize(caption)`, which must return exactly `text_length` ids (the trainer
    passes e.g. `lambda s: tokenizer.encode(s, text_length)`)."""

    def __init__(self, img_size: int, tokenize: Callable[[str], list[int]], text_length: int,
                 augment: CropFlip | None = None):
        if img_size < 1 or text_length < 1:
            raise ValueError(f"img_size and text_length must be >= 1, got {img_size}, {text_length}")
        self.img_size = img_size
        self.tokenize = tokenize
        self.text_length = text_length
        self.augment = augment
        self._scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(3, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)

    @property
    def decode_size(self) -> int:
        """The smallest side a JPEG may be draft-decoded to: large enough that even the
        smallest crop still covers `img_size` pixels."""
        if self.augment is None:
            return self.img_size
        return math.ceil(self.img_size / math.sqrt(self.augment.scale[0]))

    def __call__(self, image: Image.Image, caption: str,
                 words: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(float [3, img_size, img_size], long [text_length]). `words` name the sample
        (e.g. its step and index) and seed the augmentation, if any."""
        if self.augment is not None:
            image = self.augment(image, words)
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
