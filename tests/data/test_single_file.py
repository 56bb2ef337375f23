"""A single text file as the corpus: cut at paragraphs into documents of a sensible size, enough for a
validation split; too little text gets one error that says how much is needed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moelab.config import DataConfig, RunConfig
from moelab.data.corpus import load_corpus
from moelab.data.pieces import PIECE_CHARS, paragraph_pieces, paragraphs
from moelab.data.prepare import prepare_data
from moelab.errors import UserError


def _novel(n: int = 60, seed: int = 0) -> tuple[str, list[str]]:
    """``(text, paragraphs)``: ``n`` paragraphs of 2-8 lines (~150-900 characters), blank lines between."""
    rng = random.Random(seed)
    paras = []
    for p in range(n):
        lines = [
            f"Chapter line {p}.{i}: " + " ".join(rng.choice(["the", "sea", "was", "calm", "and", "grey"]) for _ in range(12))
            for i in range(rng.randint(2, 8))
        ]
        paras.append("\n".join(lines) + "\n\n")
    return "".join(paras), paras


def _run(corpus: Path, **data) -> RunConfig:
    return RunConfig(data=DataConfig(corpus=str(corpus), tokenizer="bytes", seq_len=32, **data))


def test_single_text_file_becomes_documents_of_whole_paragraphs(tmp_path) -> None:
    text, paras = _novel(n=36)
    assert 3 * PIECE_CHARS < len(text) < 16_000  # several pieces, yet one document under the old rule
    (tmp_path / "novel.txt").write_text(text)
    docs = load_corpus(DataConfig(corpus=str(tmp_path / "novel.txt")))
    assert len(docs) >= 4
    assert "".join(d.text for d in docs) == text
    assert all(len(d.text) <= PIECE_CHARS for d in docs)
    assert min(len(d.text) for d in docs[:-1]) > PIECE_CHARS - max(map(len, paras))  # grouped up to the size
    for d in docs:  # never cut inside a paragraph: each document is a run of whole paragraphs
        assert paragraphs(d.text) == paras[paras.index(paragraphs(d.text)[0]) :][: len(paragraphs(d.text))]
    assert [d.id for d in docs] == [f"novel.txt#{i}" for i in range(len(docs))]
    assert all(d.labels == {"domain": "text", "lang": "unknown", "source": "novel.txt"} for d in docs)


def test_long_paragraphs_are_cut_at_lines_then_at_spaces() -> None:
    lines = "".join(f"a line of a very long paragraph number {i}\n" for i in range(300))  # ~13k, no blank line
    spaced = " ".join(f"word{i}" for i in range(2000)) + "\n"  # one line of ~15k characters
    solid = "x" * 9_000 + "\n"  # one line, no space at all
    text = "Short opening.\n\n" + lines + "\n" + spaced + "\n" + solid
    pieces = paragraph_pieces(text)
    assert "".join(pieces) == text
    assert all(len(p) <= PIECE_CHARS for p in pieces)
    assert pieces[0].startswith("Short opening.\n\na line")  # a short paragraph joins the next one's first lines
    in_lines = [p for p in pieces if "very long paragraph" in p]
    assert all(p.endswith("\n") for p in in_lines[:-1])  # cut at line breaks
    in_spaced = [p for p in pieces if "word" in p and "very long" not in p]
    assert len(in_spaced) >= 4 and all(p.endswith(" ") for p in in_spaced[:-1])  # cut after a space, not in a word
    assert sum(p.count("x") for p in pieces) == 9_000 and max(p.count("x") for p in pieces) == PIECE_CHARS


def test_single_file_gives_a_run_with_a_validation_split(tmp_path) -> None:
    text, _ = _novel(n=120, seed=1)
    (tmp_path / "log.md").write_text(text)
    _, data = prepare_data(_run(tmp_path / "log.md"))
    train, val = data.splits.train.doc_names, data.splits.val.doc_names
    assert val and not set(train) & set(val)
    assert len(train) + len(val) == data.num_documents == len(paragraph_pieces(text)) >= 8


def test_too_small_file_says_how_much_text_is_needed(tmp_path) -> None:
    (tmp_path / "short.txt").write_text("One paragraph.\n\nAnd another one, still short.\n")
    with pytest.raises(UserError, match=r"short\.txt' is one text file of 46 characters.*more than 4,000 characters"):
        prepare_data(_run(tmp_path / "short.txt"))


def test_a_cap_that_keeps_one_piece_of_a_file_is_named(tmp_path) -> None:
    (tmp_path / "novel.txt").write_text(_novel(n=36)[0])
    with pytest.raises(UserError, match=r"data\.max_bytes_per_domain=1,000 keeps 1 document.*raise data\.max_bytes"):
        prepare_data(_run(tmp_path / "novel.txt", max_bytes_per_domain=1_000))


def test_a_folder_of_text_files_keeps_one_document_per_file(tmp_path) -> None:
    """Existing behaviour: in a folder each file is one document, however many paragraphs it has."""
    texts = {name: _novel(n=25, seed=i)[0] for i, name in enumerate(["a.txt", "b.md"])}
    assert all(PIECE_CHARS < len(t) < 16_000 for t in texts.values())
    for name, t in texts.items():
        (tmp_path / name).write_text(t)
    docs = load_corpus(DataConfig(corpus=str(tmp_path)))
    assert {d.id: d.text for d in docs} == texts
