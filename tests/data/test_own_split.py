"""HF ``DatasetDict`` corpora keep their own validation split, and ``save_to_disk`` folders work as plain paths.

The data is built here with ``datasets.Dataset.from_dict`` and ``save_to_disk``: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.config import DataConfig, RunConfig
from moelab.data.corpus import load_corpus
from moelab.data.document import TRAIN, VALIDATION, Document
from moelab.data.hf_datasets import choose_splits, is_saved_dataset
from moelab.data.loader import split_documents
from moelab.data.prepare import prepare_data
from moelab.errors import UserError

datasets = pytest.importorskip("datasets")

N_TRAIN, N_VAL = 40, 6


def _texts(kind: str, n: int) -> list[str]:
    return [f"{kind} record {i}: " + " ".join(f"{kind[:3]}{(i * j) % 11}" for j in range(30)) for i in range(n)]


def _save_dict(path: Path, val_name: str | None = "validation", **extra: list[str]) -> Path:
    """A DatasetDict of ``train`` (+ ``val_name``, + ``extra`` splits) saved with ``save_to_disk`` at ``path``."""
    splits = {"train": _texts("train", N_TRAIN), **({val_name: _texts("valid", N_VAL)} if val_name else {}), **extra}
    dd = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": t, "lang": ["en"] * len(t)}) for name, t in splits.items()}
    )
    dd.save_to_disk(str(path))
    return path


def _run(corpus: str, **data) -> RunConfig:
    return RunConfig(data=DataConfig(corpus=corpus, tokenizer="bytes", seq_len=32, **data))


def test_save_to_disk_dict_given_as_a_plain_path_keeps_its_validation_split(tmp_path) -> None:
    path = _save_dict(tmp_path / "ds", test=_texts("test", 3))
    for seed, val_fraction in ((0, 0.05), (7, 0.5)):  # the dataset's split, whatever the run's split settings
        _, data = prepare_data(_run(str(path), seed=seed, val_fraction=val_fraction))
        assert data.splits.val.doc_names == [f"{path}:validation:{i}" for i in range(N_VAL)]
        assert data.splits.train.doc_names == [f"{path}:{i}" for i in range(N_TRAIN)]  # and never the test split
    docs = load_corpus(DataConfig(corpus=str(path)))
    assert [d.text for d in docs if d.split == VALIDATION] == _texts("valid", N_VAL)
    assert {d.split for d in docs} == {TRAIN, VALIDATION} and docs[0].labels == {"lang": "en", "source": str(path)}
    assert load_corpus(DataConfig(corpus=f"hf:{path}")) == docs  # the hf: prefix reads the same documents


@pytest.mark.parametrize("val_name", ["valid", "val", "dev"])
def test_other_validation_split_names(tmp_path, val_name) -> None:
    path = _save_dict(tmp_path / "ds", val_name=val_name)
    train, val = split_documents(load_corpus(DataConfig(corpus=str(path))), 0.05, 0)
    assert [d.id for d in val] == [f"{path}:{val_name}:{i}" for i in range(N_VAL)] and len(train) == N_TRAIN


def test_choose_splits() -> None:
    assert choose_splits(["train", "validation", "test"]) == ("train", "validation")
    assert choose_splits(["train", "dev", "validation"]) == ("train", "validation")  # the preferred name wins
    assert choose_splits(["train", "test"]) == ("train", None)  # test is held out, never validated on
    assert choose_splits(["validation"]) == ("validation", None)  # one pool: split by hash
    assert choose_splits(["wiki", "valid"]) == ("wiki", "valid")  # no train: the first other split trains


def test_train_and_test_dict_is_split_by_hash_from_train(tmp_path) -> None:
    path = _save_dict(tmp_path / "ds", val_name=None, test=_texts("test", 3))
    docs = load_corpus(DataConfig(corpus=str(path)))
    assert [d.id for d in docs] == [f"{path}:{i}" for i in range(N_TRAIN)] and {d.split for d in docs} == {None}
    _, val = split_documents(docs, 0.1, 0)
    assert len(val) == 4 and all("train record" in d.text for d in val)


def test_cap_applies_to_each_split_on_its_own(tmp_path) -> None:
    path = _save_dict(tmp_path / "ds")
    cap = sum(map(len, _texts("train", 10)))  # a quarter of train, more than the whole validation split
    docs = load_corpus(DataConfig(corpus=str(path), max_bytes_per_domain=cap))
    assert [d.text for d in docs if d.split == VALIDATION] == _texts("valid", N_VAL)
    assert [d.text for d in docs if d.split == TRAIN] == _texts("train", 10)


def test_split_documents_keeps_a_marked_split_and_ignores_seed_and_fraction() -> None:
    docs = [Document(f"d{i}", "x", {"domain": "a"}, VALIDATION if i % 4 == 0 else TRAIN) for i in range(12)]
    for seed, frac in ((0, 0.1), (3, 0.9)):
        train, val = split_documents(docs, frac, seed)
        assert [d.id for d in val] == ["d0", "d4", "d8"] and len(train) == 9


def test_empty_validation_split_is_an_error(tmp_path) -> None:
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": _texts("train", 3)}),
         "validation": datasets.Dataset.from_dict({"text": ["", "  "]})}
    )  # fmt: skip
    dd.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"validation split 'validation' holds no text in column 'text'"):
        load_corpus(DataConfig(corpus=str(tmp_path / "ds")))


def test_saved_dataset_folders_are_recognised_without_prefix(tmp_path) -> None:
    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "one"))
    _save_dict(tmp_path / "dict")
    assert is_saved_dataset(tmp_path / "one") and is_saved_dataset(tmp_path / "dict")
    docs = load_corpus(DataConfig(corpus=str(tmp_path / "one")))
    assert [(d.id, d.text, d.split) for d in docs] == [(f"{tmp_path / 'one'}:0", "alpha", None),
                                                       (f"{tmp_path / 'one'}:1", "beta", None)]  # fmt: skip
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "state.json").write_text("{}")  # one of the marker files is not enough
    (texts / "notes.txt").write_text("plain notes\n")
    assert not is_saved_dataset(texts) and not is_saved_dataset(tmp_path / "one" / "state.json")
    with pytest.warns(UserWarning, match="1 files with other suffixes"):  # state.json: still a folder of texts
        assert [d.text for d in load_corpus(DataConfig(corpus=str(texts)))] == ["plain notes\n"]


def test_training_and_eval_use_the_datasets_validation_split(tmp_path, monkeypatch) -> None:
    """End to end: `moelab train` validates on the dataset's split and `moelab eval RUN` rebuilds exactly it."""
    from moelab.experiment.evaluate import evaluate_checkpoint

    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    path = _save_dict(tmp_path / "ds")
    argv = ["train", "--preset", "smoke", "--set", f"data.corpus={path}", "--set", "train.steps=2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if r["kind"] == "eval"][-1]
    result = evaluate_checkpoint(tmp_path / "run")
    assert result["documents_in_corpus"] == N_VAL  # the dataset's validation records, not a hash split of 46
    assert result["tokens"] == final["val_tokens"] and result["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
