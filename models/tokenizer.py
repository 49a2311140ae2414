"""BERT uncased WordPiece tokenizer from the vocabulary shipped in models/assets
(no network). [CLS]=101 starts a caption (BOS), [SEP]=102 ends it (EOS),
[PAD]=0 fills it to a fixed length; the loss ignores PAD.

    tok = load_tokenizer()
    tok.encode("hello world", max_length=6)   # [101, 7592, 2088, 102, 0, 0]
    tok.decode([101, 7592, 2088, 102, 0, 0])  # "hello world"
"""

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import BertWordPieceTokenizer

VOCAB_FILE = Path(__file__).parent / "assets" / "bert-base-uncased-vocab.txt"
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
BOS_ID, EOS_ID = CLS_ID, SEP_ID
SPECIAL_IDS = frozenset({PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID})


class Tokenizer:
    """Captions <-> fixed-length id lists: ``[CLS] wordpieces [SEP] [PAD]...``."""

    def __init__(self, vocab_file: str | Path = VOCAB_FILE):
        # lowercase + accent stripping + Chinese-character splitting: bert-base-uncased's settings
        self._tok = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, max_length: int = 40) -> list[int]:
        """[CLS] text [SEP], truncated so that [SEP] stays last, padded with 0 to max_length."""
        return self.encode_batch([text], max_length)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int = 40) -> list[list[int]]:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        out = []
        for text in texts:  # one by one: the batch call starts a thread pool, unsafe in forked loader workers
            ids = [CLS_ID, *self.wordpieces(text)[: max_length - 2], SEP_ID]
            out.append(ids + [PAD_ID] * (max_length - len(ids)))
        return out

    def wordpieces(self, text: str) -> list[int]:
        """Ids of ``text`` alone, without [CLS], [SEP] or padding."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first [SEP] (a leading [CLS] and other specials skipped)."""
        kept = []
        for i in ids:
            i = int(i)
            if i == SEP_ID:
                break
            if i not in SPECIAL_IDS:
                kept.append(i)
        return self._tok.decode(kept)


@functools.cache
def load_tokenizer() -> Tokenizer:
    """The shared tokenizer (built once per process)."""
    return Tokenizer()
