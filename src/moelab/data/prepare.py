"""Run data preparation: corpus → tokenizer → packed train/validation splits.

Why one function: the trainer, ``moelab eval`` and ``moelab compare`` must see exactly the same
tokens; compare prepares once and trains every twin on the result.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from moelab.config import DataConfig, RunConfig, replace
from moelab.data.corpus import load_corpus, require_two_pieces
from moelab.data.document import Document
from moelab.data.loader import DataSplits, build_splits
from moelab.data.tokenizer import BytesTokenizer, Tokenizer, load_tokenizer, train_bpe
from moelab.errors import UserError


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    splits: DataSplits
    num_documents: int


def build_tokenizer(data: DataConfig, train_docs: list[Document], vocab_size: int) -> Tokenizer:
    """``bytes``, a BPE trained on a seeded shuffle of the training documents, or a tokenizer.json path."""
    if data.tokenizer == "bytes":
        return BytesTokenizer()
    if data.tokenizer == "bpe":
        texts = [d.text for d in train_docs]
        random.Random(data.seed).shuffle(texts)  # documents are grouped by domain: mix before capping
        return train_bpe(texts, vocab_size, max_bytes=data.tokenizer_train_bytes)
    path = Path(data.tokenizer).expanduser()
    if not path.exists():
        raise UserError(f"data.tokenizer={data.tokenizer!r}: expected 'bpe', 'bytes' or a path to a tokenizer.json")
    return load_tokenizer(path)


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[RunConfig, PreparedData]:
    """Load, tokenise and split ``cfg.data``; return the config with ``model.vocab_size`` set to the tokenizer's."""
    from moelab.data.loader import split_documents

    docs = load_corpus(cfg.data)
    require_two_pieces(cfg.data, docs)
    if tokenizer is None:
        train_docs, _ = split_documents(docs, cfg.data.val_fraction, cfg.data.seed)
        tokenizer = build_tokenizer(cfg.data, train_docs, cfg.model.vocab_size)
    splits = build_splits(docs, tokenizer, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=tokenizer.vocab_size))
    return cfg, PreparedData(tokenizer, splits, len(docs))
