"""Cutting texts into documents: long texts at line breaks, a single text file at its paragraphs.

Why documents are cut at all: the split is by document and batches mix documents, so one huge
text would put everything in one split and fill whole batches with one source. Two rules:

- :func:`split_long` (every corpus): a text over ``MAX_DOC_CHARS`` is cut at line breaks into
  pieces of at most that size. Existing corpora depend on it bit for bit; it never changes.
- :func:`paragraph_pieces` (a corpus given as one text file, e.g. a novel or a log): the file is
  cut at blank lines into paragraphs, and consecutive paragraphs are grouped into pieces of at
  most ``PIECE_CHARS`` characters. A paragraph is never cut unless it alone is longer than that;
  then it is cut at line breaks (:func:`split_long`), and a single line still longer at its last
  space before the limit (or at the limit when it has none). Joining the pieces gives the file back
  (less blank lines where a cut fell).
"""

from __future__ import annotations

from collections.abc import Iterable

from moelab.data.document import Document

MAX_DOC_CHARS = 16_000  # longer texts are cut at line breaks: keeps batches mixed and the split fine-grained
PIECE_CHARS = 4_000  # a single text file becomes documents of about this size: many, for a validation split


def split_long(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ~``limit`` characters at line breaks."""
    if len(text) <= limit:
        return [text]
    return _pack(text.splitlines(keepends=True), limit)


def _pack(parts: Iterable[str], limit: int) -> list[str]:
    """Consecutive ``parts`` joined greedily into pieces of at most ``limit`` characters (a part longer
    than ``limit`` stays whole, alone in its piece)."""
    pieces: list[str] = []
    cur: list[str] = []
    size = 0
    for part in parts:
        if size + len(part) > limit and cur:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(part)
        size += len(part)
    if cur:
        pieces.append("".join(cur))
    return pieces


def documents_of(doc_id: str, text: str, labels: dict[str, str], split: str | None = None) -> list[Document]:
    """``text`` as one document, or as ``doc_id#i`` pieces when :func:`split_long` cuts it."""
    parts = split_long(text)
    if len(parts) == 1:
        return [Document(doc_id, text, labels, split)]
    return [Document(f"{doc_id}#{i}", p, labels, split) for i, p in enumerate(parts)]


def paragraphs(text: str) -> list[str]:
    """``text`` cut after each run of blank lines (lines of only whitespace); ``"".join`` gives it back."""
    out: list[str] = []
    cur: list[str] = []
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        if not blank and cur and not cur[-1].strip():  # a non-blank line after a blank one opens a paragraph
            out.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        out.append("".join(cur))
    return out


def _cut_line(line: str, limit: int) -> list[str]:
    """A line longer than ``limit`` cut at its last space before each limit, or at the limit."""
    out = []
    while len(line) > limit:
        at = line.rfind(" ", 0, limit) + 1 or limit  # keep the space at the end of the piece
        out.append(line[:at])
        line = line[at:]
    return [*out, line] if line else out


def _fit(paragraph: str, limit: int) -> list[str]:
    """A paragraph as pieces of at most ``limit`` characters: itself, its lines, or cut lines."""
    if len(paragraph) <= limit:
        return [paragraph]
    return [cut for part in split_long(paragraph, limit) for cut in _cut_line(part, limit)]


def paragraph_pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """Consecutive paragraphs of ``text`` grouped greedily into pieces of at most ``limit`` characters.

    Pieces of only whitespace (blank lines where a cut fell) are dropped; joining the pieces gives
    ``text`` less those.
    """
    pieces = _pack((part for para in paragraphs(text) for part in _fit(para, limit)), limit)
    return [p for p in pieces if p.strip()]
