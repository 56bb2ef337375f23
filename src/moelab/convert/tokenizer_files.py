"""The tokenizer beside a written model folder: the source's files, plus a ``tokenizer.json`` made from a
sentencepiece ``tokenizer.model`` when that is all the source has.

Why: every conversion keeps the vocabulary, so a written folder is usable by ``generate``, ``serve``,
``quantize`` or ``train --init`` only with the source's tokenizer beside it, and moelab reads
tokenizers from ``tokenizer.json`` (the ``tokenizers`` format). Many released models (Llama 2,
Mistral, Mixtral) ship a sentencepiece ``tokenizer.model`` without one; transformers converts it
(offline: ``local_files_only``) when ``sentencepiece`` and ``protobuf`` are installed (both are in
the dev extra; ``pip install sentencepiece protobuf`` otherwise). Without them the conversion is
skipped with a warning, and loading such a folder names what to install (:data:`SENTENCEPIECE_HINT`).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from moelab.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
SENTENCEPIECE_HINT = "pip install sentencepiece protobuf"


def can_convert_sentencepiece() -> bool:
    """Whether transformers, sentencepiece and protobuf are importable (what the conversion needs)."""
    try:
        import google.protobuf  # noqa: F401
        import sentencepiece  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def sentencepiece_to_json(folder: str | Path) -> str:
    """The ``tokenizer.json`` text of the sentencepiece tokenizer of ``folder``: its ``tokenizer.model``,
    with ``tokenizer_config.json`` or ``config.json`` naming the tokenizer class. UserError saying what
    to install when the libraries are missing, or why transformers could not convert it."""
    p = Path(folder)
    if not can_convert_sentencepiece():
        raise UserError(
            f"{p} has a sentencepiece tokenizer.model and no tokenizer.json; reading it needs sentencepiece and "
            f"protobuf: {SENTENCEPIECE_HINT} (then `moelab convert` also writes the tokenizer.json)"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        return tok.backend_tokenizer.to_str()
    except Exception as exc:  # transformers raises many kinds here (unknown class, damaged file)
        raise UserError(f"cannot turn {p / 'tokenizer.model'} into a tokenizer.json: {exc}") from None


def copy_tokenizer(src: str | Path, dst: str | Path, to: str) -> list[str]:
    """Copy the tokenizer files of folder ``src`` beside a model written to ``dst``; return their names.

    A source with ``tokenizer.model`` and no ``tokenizer.json`` gets one written from it (named
    ``tokenizer.json`` in the result); when that cannot be done, a warning says why. moelab's bytes tokenizer file is not a
    Hugging Face file, so a ``to="hf"`` export leaves it out rather than write a ``tokenizer.json``
    that ``AutoTokenizer`` cannot read.
    """
    from moelab.data.tokenizer import is_bytes_tokenizer_file

    src, dst = Path(src), Path(dst)
    if not src.is_dir() or src.resolve() == dst.resolve():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if not f.is_file():
            continue
        if to == "hf" and name == "tokenizer.json" and is_bytes_tokenizer_file(f):
            continue
        shutil.copyfile(f, dst / name)
        copied.append(name)
    if "tokenizer.model" in copied and not (src / "tokenizer.json").is_file():
        try:
            text = sentencepiece_to_json(src)
        except UserError as exc:  # the weights are fine: write them, and say why the tokenizer.json is missing
            warnings.warn(f"{exc}; the written folder has no tokenizer.json", UserWarning, stacklevel=2)
        else:
            (dst / "tokenizer.json").write_text(text, encoding="utf-8")
            copied.insert(0, "tokenizer.json")
    return copied


__all__ = ["SENTENCEPIECE_HINT", "TOKENIZER_FILES", "can_convert_sentencepiece", "copy_tokenizer", "sentencepiece_to_json"]
