"""Tokenizers: round trips, special ids, save/load, BPE training."""

from __future__ import annotations

import json

import pytest

from moelab.data.synthetic import synthetic_documents
from moelab.data.tokenizer import BytesTokenizer, load_tokenizer, train_bpe
from moelab.errors import UserError

TEXT = "def f(x):\n    return x + 1  # größer ✓ 数字\n"


def test_bytes_tokenizer_ids_are_utf8_bytes() -> None:
    tok = BytesTokenizer()
    assert tok.encode(TEXT) == list(TEXT.encode("utf-8"))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == 259 and {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    assert tok.decode([*tok.encode("ab"), tok.eos_id]) == "ab"


def test_bytes_tokenizer_save_load(tmp_path) -> None:
    path = BytesTokenizer().save(tmp_path)
    assert path.name == "tokenizer.json"
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, BytesTokenizer) and tok.encode("hé") == [104, 195, 169]


@pytest.fixture(scope="module")
def bpe():
    docs = synthetic_documents(40, seed=1)
    return train_bpe((d.text for d in docs), vocab_size=400)


def test_bpe_round_trip_and_specials(bpe, tmp_path) -> None:
    assert bpe.vocab_size == 400
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT  # byte-level: anything round-trips, even unseen characters
    assert len(bpe.encode("sort: 1 2 3 -> 1 2 3")) < len("sort: 1 2 3 -> 1 2 3")  # merges learned
    bpe.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == ids and again.eos_id == 1
    # a standard HF file: the tokenizers library itself reads it
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(TEXT).ids == ids


def test_bpe_needs_room_for_bytes() -> None:
    with pytest.raises(UserError, match="vocab_size >= 259"):
        train_bpe(["abc"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a HF tokenizer"):
        load_tokenizer(tmp_path)
