"""Tokenizers: byte-level BPE (trained with HF ``tokenizers``) and raw bytes.

Why two: BPE gives short sequences and a model-sized vocabulary for real runs; ``bytes`` needs
no training (ids 0–255 are the bytes themselves), so tests and smoke runs start instantly.

Special tokens (both kinds):
- ``BOS`` ``<|bos|>``: available for callers that want a start marker (the loader does not add it).
- ``EOS`` ``<|eos|>``: separates packed documents; a model learns to end a document with it.
- ``PAD`` ``<|pad|>``: fills ragged batches (generation, evaluation of short texts); never trained on.

BPE puts them at ids 0, 1, 2; the bytes tokenizer at 256, 257, 258 (vocab 259), so a byte's id
is its value. Both save as ``tokenizer.json``: a standard HF file for BPE (loadable by
``tokenizers`` and ``transformers``), a small moelab JSON for bytes.

Objective tokens (``moelab.objectives``): ``MASK`` ``<|mask|>`` (MLM) and the T5 sentinels
``<extra_id_i>`` (span corruption) are added on demand by :meth:`Tokenizer.add_special_tokens`,
always *appended* after the existing vocabulary, so no existing id moves and tokenizers saved
before (or without) them load exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from moelab.errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)
MASK = "<|mask|>"
_MASK_ALIASES = (MASK, "<mask>", "[MASK]")


def sentinel_token(i: int) -> str:
    """The i-th span-corruption sentinel, named as in T5 (``<extra_id_0>`` is the first span)."""
    return f"<extra_id_{i}>"


# Names other tokenizers use for the same roles, tried in order when loading a foreign tokenizer.json.
_ROLE_ALIASES = {
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]", "<bos>"),
    "eos": (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]", "<eos>"),
    "pad": (PAD, "<pad>", "[PAD]", "<|pad|>", "<|endoftext|>", "</s>"),
}


class Tokenizer:
    """What every moelab tokenizer offers: ``encode``/``decode`` and the special ids."""

    kind: str = "base"
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a folder to put it in)."""
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    # Objective special tokens (mask, sentinels). Subclasses implement the first two.
    def token_to_id(self, token: str) -> int | None:
        """Id of a special token by name, or None if this tokenizer lacks it."""
        raise NotImplementedError

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Append the missing ``tokens`` after the vocabulary (in the given order); return all their ids."""
        raise NotImplementedError

    @property
    def mask_id(self) -> int | None:
        return next((i for i in map(self.token_to_id, _MASK_ALIASES) if i is not None), None)

    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, … for as long as they exist."""
        ids: list[int] = []
        while (i := self.token_to_id(sentinel_token(len(ids)))) is not None:
            ids.append(i)
        return ids

    def special_ids(self) -> list[int]:
        """Every special id (BOS/EOS/PAD, mask, sentinels, any other added special), sorted."""
        raise NotImplementedError


def _target(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir() or p.suffix != ".json":
        p = p / "tokenizer.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0–255, then BOS/EOS/PAD at 256/257/258."""

    kind = "bytes"

    def __init__(self, extra_specials: Iterable[str] = ()) -> None:
        self.extra_specials: list[str] = list(extra_specials)
        self.vocab_size = 259 + len(self.extra_specials)
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258

    def token_to_id(self, token: str) -> int | None:
        names = [*SPECIALS, *self.extra_specials]
        return 256 + names.index(token) if token in names else None

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        for t in tokens:
            if self.token_to_id(t) is None:
                self.extra_specials.append(t)
        self.vocab_size = 259 + len(self.extra_specials)
        return [self.token_to_id(t) for t in tokens]  # type: ignore[misc]

    def special_ids(self) -> list[int]:
        return list(range(256, self.vocab_size))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        data: dict = {"moelab_tokenizer": "bytes", "version": 1, "specials": list(SPECIALS)}
        if self.extra_specials:  # absent when empty: the file stays what it always was
            data["extra_specials"] = self.extra_specials
        return json.dumps(data, indent=2)

    def save(self, path: str | Path) -> Path:
        p = _target(path)
        p.write_text(self.to_json() + "\n", encoding="utf-8")
        return p


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers.Tokenizer`` (any ``tokenizer.json``), with special ids resolved by role."""

    kind = "bpe"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = {role: _find_role(tok, names) for role, names in _ROLE_ALIASES.items()}
        if ids["eos"] is None:
            raise UserError(
                "tokenizer.json has no end-of-text token (looked for "
                f"{', '.join(_ROLE_ALIASES['eos'])}): add one, or train a tokenizer with data.tokenizer=bpe"
            )
        self.eos_id = ids["eos"]
        self.bos_id = ids["bos"] if ids["bos"] is not None else self.eos_id
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        from tokenizers import AddedToken

        missing = [t for t in tokens if self.tok.token_to_id(t) is None]
        if missing:
            self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        return [self.tok.token_to_id(t) for t in tokens]

    def special_ids(self) -> list[int]:
        added = self.tok.get_added_tokens_decoder()
        return sorted({i for i, t in added.items() if t.special} | {self.bos_id, self.eos_id, self.pad_id})

    def save(self, path: str | Path) -> Path:
        p = _target(path)
        p.write_text(self.to_json(), encoding="utf-8")
        return p


def _find_role(tok, names: tuple[str, ...]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, max_bytes: int | None = None) -> HFTokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (specials at ids 0, 1, 2).

    Byte-level means every string is encodable (the 256 byte symbols are always in the vocab),
    so ``vocab_size`` must be at least 259. ``max_bytes`` bounds the training text: BPE merges
    settle after a few MB, and this keeps training to seconds.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 259:
        raise UserError(
            f"a byte-level BPE tokenizer needs vocab_size >= 259 (256 bytes + 3 specials), got {vocab_size}: "
            "raise model.vocab_size or use data.tokenizer=bytes"
        )
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_capped(texts, max_bytes), trainer=trainer)
    return HFTokenizer(tok)


def _capped(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    used = 0
    for t in texts:
        if max_bytes is not None and used >= max_bytes:
            return
        used += len(t)
        yield t


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a folder holding one): moelab bytes or any HF tokenizer."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"tokenizer file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"tokenizer file {str(p)!r} is not valid JSON: {exc}") from None
    if _is_bytes_spec(data):
        return BytesTokenizer(data.get("extra_specials", ()))
    from tokenizers import Tokenizer as _Tok

    try:
        tok = _Tok.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise UserError(f"tokenizer file {str(p)!r} is not a HF tokenizer.json: {exc}") from None
    return HFTokenizer(tok)


def tokenizer_from_json(text: str) -> Tokenizer:
    """A tokenizer from the text of a ``tokenizer.json``."""
    data = json.loads(text)
    if _is_bytes_spec(data):
        return BytesTokenizer(data.get("extra_specials", ()))
    from tokenizers import Tokenizer as _Tok

    return HFTokenizer(_Tok.from_str(text))


def _is_bytes_spec(data: object) -> bool:
    """``data`` (a parsed ``tokenizer.json``) is moelab's bytes tokenizer, not a HF file."""
    return isinstance(data, dict) and data.get("moelab_tokenizer") == "bytes"


def is_bytes_tokenizer_file(path: str | Path) -> bool:
    """Whether the ``tokenizer.json`` at ``path`` is moelab's bytes tokenizer (a file that is not
    valid JSON is not)."""
    try:
        return _is_bytes_spec(json.loads(Path(path).read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


__all__ = [
    "BOS",
    "EOS",
    "MASK",
    "PAD",
    "BytesTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "is_bytes_tokenizer_file",
    "load_tokenizer",
    "sentinel_token",
    "tokenizer_from_json",
    "train_bpe",
]
