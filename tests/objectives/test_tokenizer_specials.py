"""Mask and sentinel tokens are appended; saved tokenizers (old and new) load unchanged."""

from __future__ import annotations

import json

import pytest

from moelab.data.synthetic import synthetic_documents
from moelab.data.tokenizer import MASK, BytesTokenizer, load_tokenizer, sentinel_token, train_bpe
from moelab.objectives import build_objective

TEXT = "def f(x):\n    return x + 1  # größer ✓\n"


def test_bytes_tokenizer_gains_appended_specials_and_saves_them(tmp_path) -> None:
    plain = BytesTokenizer()
    plain.save(tmp_path / "old")
    old_json = (tmp_path / "old" / "tokenizer.json").read_text()
    assert "extra_specials" not in old_json  # the format of tokenizers without objective tokens is unchanged

    tok = BytesTokenizer()
    build_objective("mlm").prepare_tokenizer(tok)
    build_objective("span", num_sentinels=5).prepare_tokenizer(tok)
    assert tok.vocab_size == 259 + 1 + 5
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (256, 257, 258, 259)
    assert tok.sentinel_ids() == [264, 263, 262, 261, 260]  # <extra_id_0> on top, counting down (T5 layout)
    assert tok.special_ids() == list(range(256, 265))
    assert tok.encode(TEXT) == list(TEXT.encode())

    build_objective("span", num_sentinels=5).prepare_tokenizer(tok)  # idempotent
    assert tok.vocab_size == 265

    tok.save(tmp_path / "new")
    again = load_tokenizer(tmp_path / "new")
    assert (again.vocab_size, again.mask_id, again.sentinel_ids()) == (265, 259, tok.sentinel_ids())
    # An old file still loads as the 259-token tokenizer.
    old = load_tokenizer(tmp_path / "old")
    assert old.vocab_size == 259 and old.mask_id is None and old.sentinel_ids() == []
    assert json.loads(old_json)["moelab_tokenizer"] == "bytes"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    docs = synthetic_documents(30, seed=2)
    tok = train_bpe((d.text for d in docs), vocab_size=320)
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(folder / "before")
    return tok, folder


def test_bpe_tokenizer_gains_specials_without_moving_ids(bpe_dir) -> None:
    _, folder = bpe_dir
    tok = load_tokenizer(folder / "before")
    ids_before = tok.encode(TEXT)
    vocab_before = tok.tok.get_vocab()
    assert tok.mask_id is None and tok.sentinel_ids() == []

    build_objective("span", num_sentinels=4).prepare_tokenizer(tok)
    build_objective("mlm").prepare_tokenizer(tok)
    assert tok.vocab_size == 320 + 5
    assert tok.sentinel_ids() == [323, 322, 321, 320] and tok.mask_id == 324
    assert {k: v for k, v in tok.tok.get_vocab().items() if v < 320} == vocab_before
    assert tok.encode(TEXT) == ids_before
    assert set(tok.special_ids()) == {0, 1, 2, 320, 321, 322, 323, 324}

    tok.save(folder / "after")
    again = load_tokenizer(folder / "after")
    assert again.vocab_size == 325 and again.mask_id == 324 and again.sentinel_ids() == tok.sentinel_ids()
    assert again.encode(TEXT) == ids_before
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(folder / "after" / "tokenizer.json"))  # still a standard HF file
    assert hf.token_to_id(MASK) == 324 and hf.token_to_id(sentinel_token(0)) == 323
    # The tokenizer saved before the objective tokens is untouched and loads as it was.
    assert load_tokenizer(folder / "before").vocab_size == 320


def test_check_tokenizer_names_the_fix() -> None:
    from moelab.errors import UserError

    with pytest.raises(UserError, match="prepare_tokenizer"):
        build_objective("mlm").check_tokenizer(BytesTokenizer())
