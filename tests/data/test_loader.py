"""Packing, shifted labels, per-token labels, the split and the resumable sampler."""

from __future__ import annotations

import pytest
import torch

from moelab.config import IGNORE_INDEX
from moelab.data.document import Document
from moelab.data.loader import Sampler, build_splits, eval_batches, pack, split_documents
from moelab.data.synthetic import synthetic_documents
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError


def _docs() -> list[Document]:
    return [
        Document("a", "abc", {"domain": "x", "lang": "en"}),
        Document("b", "defg", {"domain": "y", "lang": "de"}),
        Document("c", "hi", {"domain": "x", "lang": "en"}),
    ]


def test_pack_shifts_labels_and_keeps_per_token_labels() -> None:
    tok = BytesTokenizer()
    data = pack(_docs(), tok, seq_len=4)
    # stream: a b c EOS d e f g EOS h i EOS → 12 tokens, blocks of 5 → 2 blocks
    assert data.num_tokens == 12 and data.num_blocks == 2
    b = data.batch([0, 1])
    assert b.input_ids[0].tolist() == [ord("a"), ord("b"), ord("c"), tok.eos_id]
    assert b.labels[0].tolist() == [ord("b"), ord("c"), tok.eos_id, IGNORE_INDEX]  # after EOS: ignored
    assert b.input_ids[1].tolist() == [ord("e"), ord("f"), ord("g"), tok.eos_id]
    names = data.label_names
    assert [names["domain"][i] for i in b.label_ids["domain"][1].tolist()] == ["y"] * 4
    assert [names["lang"][i] for i in b.label_ids["lang"][0].tolist()] == ["en"] * 4
    assert b.doc_ids[1].tolist() == [1, 1, 1, 1]
    # labels never cross documents: every labelled position's target is in its input's document
    stream_doc = data.doc_N
    for blk in range(2):
        for s in range(4):
            if b.labels[blk, s] != IGNORE_INDEX:
                pos = blk * 5 + s
                assert stream_doc[pos] == stream_doc[pos + 1]


def test_split_is_by_document_and_covers_every_domain() -> None:
    docs = synthetic_documents(20, seed=0)
    train, val = split_documents(docs, 0.1, seed=0)
    assert not {d.id for d in train} & {d.id for d in val}
    assert len(train) + len(val) == len(docs)
    assert {d.labels["domain"] for d in val} == {d.labels["domain"] for d in docs}
    assert split_documents(docs, 0.1, seed=0)[1] == val
    assert split_documents(docs, 0.1, seed=1)[1] != val


def test_build_splits_shares_label_ids_and_rejects_tiny_data() -> None:
    splits = build_splits(synthetic_documents(10, seed=0), BytesTokenizer(), 32, 0.2, 0)
    assert splits.val.label_names["domain"][: len(splits.train.label_names["domain"])] == splits.train.label_names["domain"]
    with pytest.raises(UserError, match="fewer than one block"):
        build_splits(_docs() * 1, BytesTokenizer(), 64, 0.3, 0)


def test_sampler_is_deterministic_resumable_and_covers_epochs() -> None:
    a = Sampler(10, seed=3)
    first = a.next_indices(7) + a.next_indices(7)  # crosses an epoch boundary
    assert sorted(first[:10]) == list(range(10))
    b = Sampler(10, seed=3)
    b.next_indices(7)
    state = b.state_dict()
    c = Sampler(10, seed=0)
    c.load_state_dict(state)
    assert c.next_indices(7) == first[7:]
    assert Sampler(10, seed=4).next_indices(10) != first[:10]
    with pytest.raises(UserError, match="same data"):
        Sampler(11).load_state_dict(state)


def test_eval_batches_spread_over_the_split() -> None:
    data = pack(synthetic_documents(10, seed=0), BytesTokenizer(), 16)
    batches = eval_batches(data, 4, max_batches=2)
    assert len(batches) == 2 and all(b.input_ids.shape == (4, 16) for b in batches)
    docs_seen = torch.cat([b.doc_ids.flatten() for b in batches]).unique()
    assert docs_seen.max() > data.doc_N.max() // 2  # not only the first documents
    assert torch.equal(eval_batches(data, 4, 2)[1].input_ids, batches[1].input_ids)
