"""How text and images become model inputs: the tokenizer injected into data's
transform, the transform itself, and image files decoded for the tools.

Captions are tokenised with BERT WordPiece restricted to the words the
synthetic captions use (``CompactTokenizer``): the model's vocabulary shrinks
from 30,522 to about 150 rows, so the noise of DP-SGD is spread over about a
tenth of the parameters (a private model pays for every parameter it trains).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.common.config import JobConfig

if TYPE_CHECKING:
    from data.transform import ImageTextTransform


class CompactTokenizer:
    """BERT WordPiece over a closed word list; [PAD]=0, [CLS]=101, [SEP]=102 keep their ids.

    Same interface as models.tokenizer's (``encode``, ``wordpieces``, ``decode``,
    ``vocab_size``), so models' ``zero_shot(..., tokenizer=)`` and ``generate`` work.
    """

    def __init__(self, texts: Iterable[str]):
        from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer

        self.base = load_tokenizer()
        special = {PAD_ID, BOS_ID, EOS_ID}
        used = sorted({i for t in texts for i in self.base.wordpieces(t)} - special)
        first = max(special) + 1
        self.to_compact = {i: i for i in special} | {b: first + k for k, b in enumerate(used)}
        self.to_base = {c: b for b, c in self.to_compact.items()}
        self.vocab_size = first + len(used)

    def _map(self, ids: Sequence[int], text: str) -> list[int]:
        try:
            return [self.to_compact[i] for i in ids]
        except KeyError as e:
            raise ValueError(f"{text!r} has a word outside the compact vocabulary "
                             f"({self.base.decode([e.args[0]])!r})") from None

    def wordpieces(self, text: str) -> list[int]:
        return self._map(self.base.wordpieces(text), text)

    def encode(self, text: str, max_length: int) -> list[int]:
        return self._map(self.base.encode(text, max_length), text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.base.decode([self.to_base.get(int(i), 100) for i in ids])


def synthetic_tokenizer(seed: int) -> CompactTokenizer:
    """The compact vocabulary of data.synthetic's captions and zero-shot prompts."""
    from data import synthetic
    from models.dpcap import ZERO_SHOT_PROMPT

    captions = [synthetic.make_scene(seed, i).caption for i in range(2000)]
    words = [*synthetic.SHAPES, *(s + "s" for s in synthetic.SHAPES), *synthetic.COLOURS,
             *synthetic.TEXTURES, *synthetic.SIZES, *(p for p, _, _ in synthetic.POSITIONS),
             *synthetic.COUNT_WORDS.values(), ZERO_SHOT_PROMPT]
    return CompactTokenizer(captions + words)


def transform(cfg: JobConfig, tokenizer, *, training: bool = False) -> ImageTextTransform:
    """data/'s decode-side transform with the job's image size and (injected) tokenizer;
    training images are augmented if ``data.augment`` (evaluation images never are)."""
    from data.transform import CropFlip, ImageTextTransform

    length = cfg.data.text_length
    tokenize = (lambda s: [0] * length) if tokenizer is None else (lambda s: tokenizer.encode(s, length))
    augment = CropFlip(seed=cfg.seed) if training and cfg.data.augment else None
    return ImageTextTransform(cfg.img_size, tokenize, length, augment)


def image_file_pixels(file: Path, to_pixels: ImageTextTransform) -> torch.Tensor:
    """An image file as a model input [3, H, W]: decoded safely (data.decode: image
    formats only, size caps), resized and normalised as in training."""
    from data.decode import BadSample, decode_image

    try:
        image = decode_image(Path(file).read_bytes(), draft_size=to_pixels.decode_size)
    except BadSample as e:
        raise ValueError(f"{file}: {e.reason}; remove or replace it") from None
    except OSError as e:
        raise ValueError(f"{file}: cannot read it ({e.strerror or e})") from None
    return to_pixels(image, "")[0]
