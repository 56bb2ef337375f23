"""``data.text_field``: the JSONL field / HF column read as text; errors name it and what the data has."""

from __future__ import annotations

import json

import pytest

from moelab.config import ConfigError, DataConfig, RunConfig, apply_overrides
from moelab.data.corpus import load_corpus
from moelab.errors import UserError


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


RECORDS = [{"body": f"post number {i}", "title": f"t{i}", "domain": "forum"} for i in range(4)]


def test_jsonl_reads_the_named_field_and_keeps_the_others_as_labels(tmp_path) -> None:
    docs = load_corpus(DataConfig(corpus=_jsonl(tmp_path / "posts.jsonl", RECORDS), text_field="body"))
    assert [d.text for d in docs] == [r["body"] for r in RECORDS]
    assert docs[1].labels == {"title": "t1", "domain": "forum", "source": "posts.jsonl"}  # body is not a label


def test_missing_field_names_it_and_the_fields_found(tmp_path) -> None:
    path = _jsonl(tmp_path / "posts.jsonl", RECORDS)
    with pytest.raises(UserError, match=r"needs a 'content' field.*\['body', 'domain', 'title'\].*data\.text_field"):
        load_corpus(DataConfig(corpus=path, text_field="content"))
    with pytest.raises(UserError, match=r"needs a 'text' field.*'body'"):  # the default is still 'text'
        load_corpus(DataConfig(corpus=path))


def test_hf_dataset_reads_the_named_column(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": ["alpha beta", "gamma"], "lang": ["en", "de"]}).save_to_disk(str(tmp_path / "ds"))
    docs = load_corpus(DataConfig(corpus=f"hf:{tmp_path / 'ds'}", text_field="content"))
    assert [d.text for d in docs] == ["alpha beta", "gamma"] and docs[1].labels["lang"] == "de"
    assert "content" not in docs[0].labels
    with pytest.raises(UserError, match=r"no 'text' column \(columns: content, lang\).*data\.text_field"):
        load_corpus(DataConfig(corpus=f"hf:{tmp_path / 'ds'}"))


def test_text_field_is_validated_and_set_from_the_command_line() -> None:
    assert DataConfig().text_field == "text"
    for bad in ("", "  "):
        with pytest.raises(ConfigError, match=r"data\.text_field"):
            DataConfig(text_field=bad)
    assert apply_overrides(RunConfig(), ["data.text_field=body"]).data.text_field == "body"  # --set data.text_field=body


def test_builtin_cache_is_read_whatever_the_text_field(tmp_path, monkeypatch) -> None:
    """The built-in corpus caches its own JSONL with a ``text`` field; a run's text_field must not break it."""
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    cfg = DataConfig(max_bytes_per_domain=5_000, synthetic_docs=2, text_field="body")
    built = load_corpus(cfg)
    assert list((tmp_path / "corpus").glob("builtin-*.jsonl.gz"))
    assert [d.text for d in load_corpus(cfg)] == [d.text for d in built]  # read back from the cache
