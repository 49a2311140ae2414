"""The BERT uncased WordPiece tokenizer shipped in models/assets."""

import functools
import hashlib
import pickle

import pytest

from models.tokenizer import VOCAB_FILE, Tokenizer, load_tokenizer


def test_vocab_file_and_license_note():
    assert hashlib.md5(VOCAB_FILE.read_bytes()).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    notice = (VOCAB_FILE.parent / "NOTICE").read_text()
    assert "Apache License" in notice and VOCAB_FILE.name in notice


def test_special_ids_and_size():
    tok = load_tokenizer()
    assert load_tokenizer() is tok  # cached
    assert tok.vocab_size == 30522
    assert tok.encode("hello world", max_length=4) == [101, 7592, 2088, 102]
    assert tok.encode("Hello, World!", max_length=8) == [101, 7592, 1010, 2088, 999, 102, 0, 0]


def test_truncation_keeps_sep_last_and_padding():
    tok = load_tokenizer()
    ids = tok.encode("a photo of a cat on a mat", max_length=5)
    assert len(ids) == 5 and ids[0] == 101 and ids[-1] == 102
    assert tok.encode("", max_length=4) == [101, 102, 0, 0]
    assert tok.encode_batch(["hello world", "a cat"], max_length=6) == [
        tok.encode("hello world", 6), tok.encode("a cat", 6),
    ]
    with pytest.raises(ValueError, match="max_length"):
        tok.encode("hello", max_length=1)


def test_decode_stops_at_sep_and_skips_specials():
    tok = load_tokenizer()
    assert tok.decode([101, 7592, 2088, 102, 2088, 0]) == "hello world"
    assert tok.decode(tok.encode("A Dog, unbelievable!", 20)) == "a dog, unbelievable!"


@pytest.mark.parametrize(
    "text",
    ["Héllo WÖRLD", "a photo of a 3-legged dog; running!!", "unaffable naïve café", "東京 tower", " spaces\tand\nlines "],
)
def test_matches_transformers_bert_tokenizer(text):
    """Same ids as transformers' (slow, pure Python) BertTokenizer on the same vocab file."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer(str(VOCAB_FILE), do_lower_case=True)
    expected = ref(text, max_length=32, padding="max_length", truncation=True)["input_ids"]
    assert Tokenizer().encode(text, 32) == expected


def test_picklable_for_loader_workers():
    encode = pickle.loads(pickle.dumps(functools.partial(load_tokenizer().encode, max_length=6)))
    assert encode("hello world") == [101, 7592, 2088, 102, 0, 0]
