"""Reading a corpus's own split must not move any existing corpus's split: existing runs keep, bit for bit,
the training and validation tokens they had (``moelab eval RUN`` rebuilds the validation split from them).

The expected ids and token digests were recorded with the code before corpora could bring their own split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moelab.config import DataConfig, RunConfig
from moelab.data.corpus import load_corpus
from moelab.data.document import Document
from moelab.data.loader import split_documents
from moelab.data.prepare import prepare_data


def _write_jsonl(path: Path) -> None:
    """30 records over three domains and two languages; record 3 is long enough to be cut into pieces."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(30):
            dom = ("news", "code", "chat")[i % 3]
            text = f"record {i} of {dom}: " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(40 + i)) + "\n"
            if i == 3:
                text = "".join(f"long line {j}\n" for j in range(3000))
            f.write(json.dumps({"text": text, "domain": dom, "lang": "en" if i % 2 else "de"}) + "\n")


def _digest(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def _prepared(corpus: str):
    cfg = RunConfig(
        data=DataConfig(corpus=corpus, tokenizer="bytes", seq_len=32, synthetic_docs=8, val_fraction=0.1, seed=3)
    )
    return prepare_data(cfg)[1].splits


def test_jsonl_split_is_unchanged(tmp_path) -> None:
    _write_jsonl(tmp_path / "c.jsonl")
    splits = _prepared(str(tmp_path / "c.jsonl"))
    assert splits.val.doc_names == ["c.jsonl:4#0", "c.jsonl:5", "c.jsonl:27"]
    assert len(splits.train.doc_names) == 29
    assert (_digest(splits.val.tokens_N), _digest(splits.train.tokens_N)) == ("3fecc690b06ebe4c", "780857c5909462ca")


def test_synthetic_split_is_unchanged() -> None:
    splits = _prepared("synthetic")
    assert splits.val.doc_names == [
        "synthetic/arithmetic/5", "synthetic/brackets/3", "synthetic/lists/2", "synthetic/records/1", "synthetic/zorbish/3"
    ]  # fmt: skip
    assert len(splits.train.doc_names) == 35
    assert (_digest(splits.val.tokens_N), _digest(splits.train.tokens_N)) == ("77e1dcbdb2899182", "20045c1fff7a1acc")


def _reference_split(docs: list[Document], val_fraction: float, seed: int) -> list[str]:
    """The hash split written out again: per domain, the ``max(1, round(f·n))`` ids of lowest
    sha256(f"{seed}:{id}"), in corpus order."""
    by_domain: dict[str, list[str]] = {}
    for d in docs:
        by_domain.setdefault(d.labels.get("domain", "text"), []).append(d.id)
    val: set[str] = set()
    for ids in by_domain.values():
        if len(ids) > 1:
            key = [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids]
            val.update(i for _, i in sorted(zip(key, ids))[: max(1, round(val_fraction * len(ids)))])
    return [d.id for d in docs if d.id in val]


def test_builtin_split_is_the_hash_split(tmp_path, monkeypatch) -> None:
    """The built-in corpus depends on the Python version, so it is checked against the split rule itself."""
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    docs = load_corpus(DataConfig(max_bytes_per_domain=20_000, synthetic_docs=6))
    assert all(d.split is None for d in docs) and {"code", "prose", "arithmetic"} <= {d.labels["domain"] for d in docs}
    for seed, frac in ((0, 0.05), (1, 0.2)):
        train, val = split_documents(docs, frac, seed)
        assert [d.id for d in val] == _reference_split(docs, frac, seed)
        assert [d.id for d in train] == [d.id for d in docs if d.id not in {v.id for v in val}]
