"""Hugging Face ``datasets`` corpora: ``hf:NAME[:CONFIG]`` from the local cache, or a folder written by
``save_to_disk`` (given with or without the ``hf:`` prefix). Nothing is ever downloaded by moelab.

Which splits are read, and why:
- a ``Dataset`` is one pool of documents; the loader splits it by a seeded hash like any corpus.
- a ``DatasetDict`` trains on ``train`` (without one: its first split that is not a validation one).
  When it has a validation split, the first of ``VALIDATION_SPLITS`` it holds, that split *is* the
  validation split: the dataset's authors made it to be compared on, and a random cut of ``train``
  would make losses incomparable with anyone else's. Its documents are marked ``split`` (see
  :class:`~moelab.data.document.Document`) so that the trainer, ``moelab eval``, compare and the
  routing analysis all see exactly it. Without one, ``train`` is split by hash as before.
- a ``test`` split is never validated on (beside a ``train`` split it is not read at all): it stays
  held out for a final score, and a dict of ``train`` + ``test`` keeps the split it always had.

Document ids: ``NAME:i`` for the training split (unchanged from before validation splits were read,
so existing splits stay bit for bit), ``NAME:SPLIT:i`` for the validation split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.data.document import TRAIN, VALIDATION, Document
from moelab.data.pieces import documents_of
from moelab.errors import UserError

VALIDATION_SPLITS = ("validation", "valid", "val", "dev")  # in order of preference; never "test"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk``: a ``DatasetDict`` leaves
    ``dataset_dict.json``; a ``Dataset`` leaves ``state.json`` and ``dataset_info.json``."""
    if not path.is_dir():
        return False
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def choose_splits(names: list[str]) -> tuple[str, str | None]:
    """``(training split, validation split or None)`` of a ``DatasetDict`` whose splits are ``names``.

    A dict that holds only a validation split is read as one pool (it is the corpus, split by hash).
    """
    val = next((n for n in VALIDATION_SPLITS if n in names), None)
    train = "train" if "train" in names else next((n for n in names if n != val), None)
    if train is None:
        return names[0], None
    return train, val


def _open(name: str) -> Any:
    """The ``Dataset`` or ``DatasetDict`` at path ``name``, or ``NAME[:CONFIG]`` from the local cache."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: corpora and save_to_disk folders need the 'datasets' package: pip install datasets") from None
    try:
        if Path(name).exists():
            return datasets.load_from_disk(name)
        ds_name, _, config = name.partition(":")
        return datasets.load_dataset(ds_name, config or None)
    except Exception as exc:  # datasets raises many types; the user needs one line
        raise UserError(f"cannot load HF dataset {name!r} (offline: it must be cached or saved locally): {exc}") from None


def _documents(ds: Any, name: str, text_field: str, id_prefix: str, where: str, split: str | None) -> list[Document]:
    """Every record of ``ds`` with text in ``text_field`` as documents; other str/int columns become labels."""
    if text_field not in ds.column_names:
        raise UserError(
            f"HF dataset {name!r}{where} has no {text_field!r} column (columns: {', '.join(ds.column_names)}): "
            "set data.text_field to the column that holds the text"
        )
    docs: list[Document] = []
    for i, rec in enumerate(ds):
        text = rec[text_field]
        if not isinstance(text, str) or not text.strip():
            continue
        labels = {k: str(v) for k, v in rec.items() if k != text_field and isinstance(v, (str, int))}
        labels.setdefault("source", name)
        docs.extend(documents_of(f"{id_prefix}{i}", text, labels, split))
    return docs


def load_hf(spec: str, text_field: str = "text") -> list[Document]:
    """Documents of ``hf:NAME[:CONFIG]``, ``hf:/path`` or a plain ``save_to_disk`` folder path ``spec``.

    A ``DatasetDict`` with a validation split gives its training documents (``split="train"``)
    followed by its validation documents (``split="validation"``); otherwise ``split`` is None.
    """
    name = spec[3:] if spec.startswith("hf:") else spec
    ds = _open(name)
    import datasets  # _open has checked it is installed

    if isinstance(ds, datasets.DatasetDict):
        train_name, val_name = choose_splits(list(ds))
        if val_name is None:
            return _documents(ds[train_name], name, text_field, f"{name}:", f" (split {train_name!r})", None)
        train = _documents(ds[train_name], name, text_field, f"{name}:", f" (split {train_name!r})", TRAIN)
        val = _documents(ds[val_name], name, text_field, f"{name}:{val_name}:", f" (split {val_name!r})", VALIDATION)
        if not val:
            raise UserError(
                f"HF dataset {name!r}: its validation split {val_name!r} holds no text in column {text_field!r}"
            )
        return train + val
    return _documents(ds, name, text_field, f"{name}:", "", None)
