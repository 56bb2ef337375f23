"""Corpora: synthetic ground truth, files, JSONL(.gz), the shared corpus, bad inputs."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from moelab.config import DataConfig
from moelab.data.corpus import CORPORA, cap_by_domain, load_corpus, split_long
from moelab.data.document import Document
from moelab.data.synthetic import GENERATORS, synthetic_documents
from moelab.errors import UserError

from helpers import SHARED_CORPUS


def test_synthetic_domains_have_the_structure_they_claim() -> None:
    rng = random.Random(0)
    for line in GENERATORS["arithmetic"](rng).splitlines():
        expr, result = line.split(" = ")
        assert re.fullmatch(r"[0-9 +*-]+", expr)
        assert eval(expr) == int(result)
    for line in GENERATORS["brackets"](rng).splitlines():
        stack = []
        for ch in line:
            if ch in "([{<":
                stack.append(")]}>"["([{<".index(ch)])
            else:
                assert stack.pop() == ch
        assert not stack
    for line in GENERATORS["lists"](rng).splitlines():
        task, rest = line.split(": ")
        xs, ys = (list(map(int, s.split())) for s in rest.split(" -> "))
        assert ys == (sorted(xs) if task == "sort" else xs[::-1])


def test_synthetic_is_seeded_and_labelled() -> None:
    a, b = synthetic_documents(3, seed=5), synthetic_documents(3, seed=5)
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.text for d in a] != [d.text for d in synthetic_documents(3, seed=6)]
    assert {d.labels["domain"] for d in a} == set(GENERATORS)
    assert all({"domain", "lang", "source"} <= set(d.labels) for d in a)


def test_builtin_corpus_has_code_prose_and_synthetic(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    cfg = DataConfig(max_bytes_per_domain=30_000, synthetic_docs=5)
    docs = load_corpus(cfg)
    domains = {d.labels["domain"] for d in docs}
    assert {"code", "prose", *GENERATORS} <= domains
    code = next(d for d in docs if d.labels["domain"] == "code")
    assert code.labels["lang"] == "python" and ("def " in code.text or "import" in code.text)
    assert list((tmp_path / "corpus").glob("builtin-*.jsonl.gz"))  # cached
    again = load_corpus(cfg)
    assert [d.text for d in again] == [d.text for d in docs]


def test_txt_folder_and_jsonl_gz(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n")
    folder = tmp_path / "data"
    (folder / "code").mkdir(parents=True)
    (folder / "code" / "x.py").write_text("print(1)\n")
    (folder / "notes.txt").write_text("some notes\n")
    (folder / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "uno", "lang": "es", "domain": "quotes"}) + "\n")
        f.write("{broken\n")
        f.write(json.dumps({"text": "dos", "lang": "es", "domain": "quotes"}) + "\n")

    docs = load_corpus(DataConfig(corpus=str(tmp_path / "a.txt")))
    assert [d.text for d in docs] == ["hello world\n"]
    with pytest.warns(UserWarning, match=r"1 binary files.*1 non-UTF-8 files"):
        docs = load_corpus(DataConfig(corpus=str(folder)))
    assert sorted(d.labels["domain"] for d in docs) == ["code", "text"]
    with pytest.warns(UserWarning, match="1 unreadable JSON lines"):
        docs = load_corpus(DataConfig(corpus=str(tmp_path / "c.jsonl.gz")))
    assert [d.text for d in docs] == ["uno", "dos"] and docs[0].labels["lang"] == "es"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no text"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "hi"}\n') and p / "x.jsonl", "needs a 'text' field"),
    ],
)
def test_bad_corpora_raise_user_errors(tmp_path, make, message) -> None:
    with pytest.raises(UserError, match=message):
        load_corpus(DataConfig(corpus=str(make(tmp_path))))


def test_unknown_corpus_name() -> None:
    with pytest.raises(UserError, match="unknown corpus 'nonsense'"):
        load_corpus(DataConfig(corpus="nonsense"))
    assert "builtin" in CORPORA and "synthetic" in CORPORA


def test_split_long_cuts_at_lines() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    parts = split_long(text, limit=500)
    assert "".join(parts) == text and all(len(p) <= 500 for p in parts)


def _doc(i: int, domain: str, lang: str, size: int = 10) -> Document:
    return Document(f"{domain}-{lang}-{i}", "x" * size, {"domain": domain, "lang": lang})


def test_cap_spreads_over_languages_stored_one_after_another() -> None:
    """A corpus stored language after language must not lose its later languages to the cap."""
    docs = [_doc(i, "code", "python") for i in range(50)] + [_doc(i, "code", "go") for i in range(50)]
    docs += [_doc(i, "prose", lang) for lang in ("en", "de", "ja") for i in range(20)]
    kept = cap_by_domain(docs, max_bytes=200)
    by = {}
    for d in kept:
        key = (d.labels["domain"], d.labels["lang"])
        by[key] = by.get(key, 0) + len(d.text)
    assert by == {("code", "python"): 100, ("code", "go"): 100, ("prose", "en"): 70, ("prose", "de"): 70, ("prose", "ja"): 60}
    assert [docs.index(d) for d in kept] == sorted(docs.index(d) for d in kept)  # original order kept


def test_cap_balances_bytes_and_lets_small_buckets_run_out() -> None:
    docs = [_doc(0, "q", "zh", size=5)] + [_doc(i, "q", "en", size=10) for i in range(10)]
    docs += [_doc(i, "q", "ru", size=30) for i in range(3)]
    kept = cap_by_domain(docs, max_bytes=100)
    langs = [d.labels["lang"] for d in kept]
    assert langs.count("zh") == 1  # ran out, the others went on
    assert sum(len(d.text) for d in kept) >= 100 and sum(len(d.text) for d in kept) - 30 < 100
    assert abs(10 * langs.count("en") - 30 * langs.count("ru")) <= 30
    one_bucket = [_doc(i, "code", "python") for i in range(10)]
    assert cap_by_domain(one_bucket, 35) == one_bucket[:4]  # one bucket: the plain in-order cap


def test_folder_of_jsonl_skips_its_readme(tmp_path) -> None:
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "uno", "domain": "quotes"}) + "\n")
    (tmp_path / "README.md").write_text("# about this corpus\n")
    (tmp_path / "stats.json").write_text("{}")
    docs = load_corpus(DataConfig(corpus=str(tmp_path)))
    assert [d.text for d in docs] == ["uno"]


@pytest.mark.skipif(not (SHARED_CORPUS / "valid.jsonl.gz").exists(), reason="shared corpus absent")
def test_shared_corpus_loads_with_labels() -> None:
    docs = load_corpus(DataConfig(corpus=str(SHARED_CORPUS / "valid.jsonl.gz"), max_bytes_per_domain=50_000))
    assert {"code", "manual"} <= {d.labels["domain"] for d in docs}
    assert {"python", "en"} <= {d.labels["lang"] for d in docs}


@pytest.mark.skipif(not (SHARED_CORPUS / "train.jsonl.gz").exists(), reason="shared corpus absent")
def test_capped_shared_corpus_keeps_every_language_and_source() -> None:
    """The shared corpus is stored bucket by bucket; a cap far below its size still sees all of them."""
    docs = load_corpus(DataConfig(corpus=str(SHARED_CORPUS), max_bytes_per_domain=200_000))
    assert {d.labels["lang"] for d in docs} == {"python", "go", "en", "de", "fr", "es", "ru", "ja", "zh"}
    assert {d.labels["domain"] for d in docs} == {"code", "docs", "manual", "quotes"}
    assert len({d.labels["source"] for d in docs}) == 6


def test_hf_dataset_saved_to_disk(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha beta", "gamma", ""], "lang": ["en", "en", "en"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = load_corpus(DataConfig(corpus=f"hf:{tmp_path / 'ds'}"))
    assert [d.text for d in docs] == ["alpha beta", "gamma"] and docs[0].labels["lang"] == "en"
    with pytest.raises(UserError, match="cannot load HF dataset"):
        load_corpus(DataConfig(corpus="hf:/nonexistent/dataset"))
