"""Corpora by name: the built-in corpus, synthetic domains, local files and HF datasets.

``load_corpus(data_cfg)`` turns ``data.corpus`` into a list of labelled :class:`Document`:
- ``builtin`` (default): built at first use from the Python standard library that every install
  has (source files → domain ``code``; their docstrings and comments, and any ``.rst``/``.txt``
  docs → domain ``prose``) plus the ``synthetic`` domains; cached as JSONL.gz under
  ``$MOELAB_CACHE`` (default ``~/.cache/moelab``).
- ``synthetic``: the seeded generators of :mod:`moelab.data.synthetic`.
- a path: a single text file (``.txt``, ``.md``, ...: cut at blank lines into documents of about
  ``PIECE_CHARS`` characters, :func:`moelab.data.pieces.paragraph_pieces`), a folder of files
  (one document per file), or ``.jsonl``/``.jsonl.gz`` whose ``data.text_field`` field (default
  ``text``) is the text (other string fields become labels).
- ``hf:NAME[:CONFIG]``: a HF ``datasets`` dataset from the local cache, or a folder saved with
  ``save_to_disk`` (``hf:/path``, or the plain path: such folders are recognised by their files);
  never downloads anything new on its own. A ``DatasetDict``'s own validation split is kept
  (:mod:`moelab.data.hf_datasets`).

Bad input never reaches the trainer: a missing path, an empty corpus or JSONL without the text
field raise :class:`UserError`; binary files, non-UTF-8 files and broken JSON lines are skipped,
counted and reported in one warning.
"""

from __future__ import annotations

import ast
import gzip
import heapq
import io
import json
import os
import random
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from moelab.cache import cache_dir
from moelab.config import DataConfig
from moelab.data.document import Document
from moelab.data.hf_datasets import is_saved_dataset
from moelab.data.hf_datasets import load_hf as load_hf  # re-exported: it lived here
from moelab.data.pieces import MAX_DOC_CHARS as MAX_DOC_CHARS  # re-exported: it lived here
from moelab.data.pieces import PIECE_CHARS, documents_of, paragraph_pieces
from moelab.data.pieces import split_long as split_long  # re-exported: it lived here
from moelab.data.synthetic import synthetic_documents
from moelab.errors import UserError
from moelab.registry import Registry

CorpusFn = Callable[[DataConfig], list[Document]]
CORPORA: Registry[CorpusFn] = Registry("corpus")

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")


class SkipCounter:
    """Counts skipped inputs by reason and warns once at the end."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: dict[str, int] = {}

    def skip(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def report(self) -> None:
        if self.counts:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
            warnings.warn(f"{self.what}: skipped {parts}", UserWarning, stacklevel=3)


def cap_by_domain(docs: list[Document], max_bytes: int) -> list[Document]:
    """Keep about ``max_bytes`` characters of each ``domain`` label, spread evenly over its sub-buckets.

    A domain's documents fall into buckets by their other labels (``lang``, ``source``, ...).
    Corpora are often stored bucket after bucket (all Python code, then all Go code), so keeping
    documents in file order until the cap is hit would silently drop every later language or
    source. Instead each pick takes the next document of the domain's bucket that holds the
    fewest characters so far (ties: the bucket seen first), until the domain reaches
    ``max_bytes``; a bucket that runs out stops competing. The kept documents keep their
    original order. With one bucket per domain this is the plain in-order cap.

    A corpus that brings its own split (documents with ``split`` set) is capped split by split, each
    at ``max_bytes``: its validation split, stored after the training documents, must not lose its
    place to them.
    """
    by_split: dict[str | None, list[int]] = {}
    for i, d in enumerate(docs):
        by_split.setdefault(d.split, []).append(i)
    kept: list[int] = []
    for idx in by_split.values():
        kept.extend(idx[j] for j in _cap_indices([docs[i] for i in idx], max_bytes))
    return [docs[i] for i in sorted(kept)]


def _cap_indices(docs: list[Document], max_bytes: int) -> list[int]:
    """Sorted indices of the documents :func:`cap_by_domain` keeps of one split."""
    buckets: dict[str, dict[tuple[tuple[str, str], ...], list[int]]] = {}
    for i, d in enumerate(docs):
        dom = d.labels.get("domain", "text")
        key = tuple(sorted((k, v) for k, v in d.labels.items() if k != "domain"))
        buckets.setdefault(dom, {}).setdefault(key, []).append(i)
    keep: list[int] = []
    for by_key in buckets.values():
        queues = list(by_key.values())
        heap = [(0, b, 0) for b in range(len(queues))]  # (characters taken, bucket, next position)
        used = 0
        while used < max_bytes and heap:
            taken, b, pos = heapq.heappop(heap)
            i = queues[b][pos]
            keep.append(i)
            used += len(docs[i].text)
            if pos + 1 < len(queues[b]):
                heapq.heappush(heap, (taken + len(docs[i].text), b, pos + 1))
    return sorted(keep)


# ----------------------------------------------------------------------------- files


def _decode(raw: bytes, skips: SkipCounter) -> str | None:
    if b"\x00" in raw[:8192]:
        skips.skip("binary files")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skips.skip("non-UTF-8 files")
        return None


def _read_jsonl(path: Path, skips: SkipCounter, source: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of a JSONL(.gz) file: ``text_field`` is the text, ``id`` the id, other str/int fields labels."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    skips.skip("unreadable JSON lines")
                    continue
                if not isinstance(rec, dict) or text_field not in rec:
                    raise UserError(
                        f"{path}:{lineno}: a JSONL corpus needs a {text_field!r} field in every record "
                        f"(found {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}): "
                        "set data.text_field to the field that holds the text"
                    )
                text = rec[text_field]
                if not isinstance(text, str) or not text.strip():
                    skips.skip("records with empty text")
                    continue
                labels = {k: str(v) for k, v in rec.items() if k not in (text_field, "id") and isinstance(v, (str, int))}
                labels.setdefault("source", source)
                yield from documents_of(str(rec.get("id", f"{source}:{lineno}")), text, labels)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz"))


def _pieces_of_file(name: str, text: str) -> list[Document]:
    """A corpus given as one text file: its paragraph pieces (ids ``name#i``, or ``name`` for one piece)."""
    pieces = paragraph_pieces(text)
    labels = {"domain": "text", "lang": "unknown", "source": name}
    if len(pieces) == 1:
        return [Document(name, pieces[0], labels)]
    return [Document(f"{name}#{i}", p, labels) for i, p in enumerate(pieces)]


def load_files(path: Path, text_field: str = "text") -> list[Document]:
    """Documents from a text file, a JSONL(.gz) file, or every such file under a folder.

    A single text file is the whole corpus, so it is cut at blank lines into documents of about
    ``PIECE_CHARS`` characters (a novel or a log becomes many documents, enough for a validation
    split); in a folder each file is one document (cut only past ``MAX_DOC_CHARS``), and a file's
    first sub-folder names its ``domain`` (``data/code/a.py`` → ``code``). A folder that holds JSONL
    files is a JSONL corpus: the other files beside them (a README, statistics) describe the data and
    are not read as documents. ``text_field`` names the JSONL field that holds the text.
    """
    if not path.exists():
        raise UserError(f"corpus path {str(path)!r} does not exist (give a .txt/.jsonl file, a folder, or a name)")
    skips = SkipCounter(f"corpus {path}")
    docs: list[Document] = []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    jsonl_only = len(files) > 1 and any(_is_jsonl(f) for f in files)
    for f in files:
        rel = f.name if f == path else str(f.relative_to(path))
        if _is_jsonl(f):
            docs.extend(_read_jsonl(f, skips, rel, text_field))
            continue
        if jsonl_only:  # documentation beside the data, by design: no warning
            continue
        if f != path and not f.name.endswith(TEXT_SUFFIXES):
            skips.skip("files with other suffixes")
            continue
        text = _decode(f.read_bytes(), skips)
        if text is None:
            continue
        if not text.strip():
            skips.skip("empty files")
            continue
        if f == path:
            docs.extend(_pieces_of_file(rel, text))
            continue
        parts = Path(rel).parts
        domain = parts[0] if len(parts) > 1 else "text"
        docs.extend(documents_of(rel, text, {"domain": domain, "lang": "unknown", "source": rel}))
    skips.report()
    return docs


# ----------------------------------------------------------------------------- registered corpora


@CORPORA.register("synthetic")
def synthetic_corpus(cfg: DataConfig) -> list[Document]:
    return synthetic_documents(cfg.synthetic_docs, seed=cfg.seed)


def _stdlib_files() -> list[Path]:
    """The standard library's ``.py``/``.rst``/``.txt`` files; tests, site-packages and demos pruned."""
    root = sysconfig.get_paths()["stdlib"]
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        out.extend(Path(dirpath) / f for f in filenames if f.endswith((".py", ".rst", ".txt")))
    return sorted(out)


def _prose_of(source: str) -> str:
    """Docstrings and comments of a Python source file, in file order."""
    pieces: list[tuple[int, str]] = []
    try:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    pieces.append((getattr(node, "lineno", 0), doc))
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if len(text) > 20 and not text.startswith(("!", "-*-", "noqa", "type:")):
                    pieces.append((tok.start[0], text))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return ""
    pieces.sort(key=lambda p: p[0])
    return "\n".join(t for _, t in pieces)


def build_stdlib_docs(max_bytes_per_domain: int, seed: int = 0) -> list[Document]:
    """``code`` and ``prose`` documents from the standard library, capped per domain."""
    files = _stdlib_files()
    random.Random(seed).shuffle(files)
    root = Path(sysconfig.get_paths()["stdlib"])
    skips = SkipCounter("built-in corpus")
    code: list[Document] = []
    prose: list[Document] = []
    sizes = {"code": 0, "prose": 0}
    for f in files:
        if min(sizes.values()) >= max_bytes_per_domain:
            break
        text = _decode(f.read_bytes(), skips)
        if not text or not text.strip():
            continue
        rel = str(f.relative_to(root))
        if f.suffix == ".py":
            if sizes["code"] < max_bytes_per_domain:
                new = documents_of(f"stdlib/{rel}", text, {"domain": "code", "lang": "python", "source": "stdlib"})
                code.extend(new)
                sizes["code"] += len(text)
            text, source = _prose_of(text), "stdlib-docstrings"
        else:
            source = "stdlib-docs"
        if text.strip() and sizes["prose"] < max_bytes_per_domain:
            prose.extend(documents_of(f"{source}/{rel}", text, {"domain": "prose", "lang": "en", "source": source}))
            sizes["prose"] += len(text)
    skips.report()
    return code + prose


def _cache_path(cfg: DataConfig) -> Path:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / "corpus" / f"builtin-{py}-{cfg.max_bytes_per_domain}-{cfg.synthetic_docs}-s{cfg.seed}-v1.jsonl.gz"


def write_jsonl_gz(docs: list[Document], path: Path) -> None:
    """Write documents atomically (temp file, then rename) so a crash never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text, **d.labels}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@CORPORA.register("builtin")
def builtin_corpus(cfg: DataConfig) -> list[Document]:
    path = _cache_path(cfg)
    if path.is_file():
        try:
            return list(_read_jsonl(path, SkipCounter("cached corpus"), "builtin"))
        except UserError:
            warnings.warn(f"cached corpus {path} is damaged; rebuilding it", UserWarning, stacklevel=2)
    docs = build_stdlib_docs(cfg.max_bytes_per_domain, cfg.seed) + synthetic_corpus(cfg)
    try:
        write_jsonl_gz(docs, path)
    except OSError as exc:
        warnings.warn(f"cannot cache the built-in corpus at {path}: {exc}", UserWarning, stacklevel=2)
    return docs


def load_corpus(cfg: DataConfig) -> list[Document]:
    """The documents ``data.corpus`` names, capped at ``data.max_bytes_per_domain`` per domain (and split,
    for a corpus that brings its own validation split: its documents carry ``split``)."""
    spec = cfg.corpus
    if spec in CORPORA:
        docs = CORPORA[spec](cfg)
    elif spec.startswith("hf:"):
        docs = load_hf(spec, cfg.text_field)
    elif is_saved_dataset(Path(spec).expanduser()):
        docs = load_hf(str(Path(spec).expanduser()), cfg.text_field)
    elif "/" in spec or "." in spec or Path(spec).exists():
        docs = load_files(Path(spec).expanduser(), cfg.text_field)
    else:
        raise UserError(
            f"unknown corpus {spec!r}: expected one of {', '.join(map(repr, CORPORA))}, a path, or hf:NAME[:CONFIG]"
        )
    docs = cap_by_domain(docs, cfg.max_bytes_per_domain)
    if not docs or not any(d.text.strip() for d in docs):
        raise UserError(f"corpus {spec!r} holds no text: nothing to train on")
    return docs


def require_two_pieces(cfg: DataConfig, docs: list[Document]) -> None:
    """Raise :class:`UserError` when a corpus given as one text file gives fewer than two documents.

    Why its own message: a run needs a training and a validation document, and the generic "too few
    documents" does not tell a user with one short file that it is cut at blank lines into pieces of
    ``PIECE_CHARS`` characters, nor how much text that takes (or that the per-domain cap kept one piece).
    """
    path = Path(cfg.corpus).expanduser()
    if len(docs) >= 2 or cfg.corpus in CORPORA or cfg.corpus.startswith("hf:") or not path.is_file() or _is_jsonl(path):
        return
    kept, size = sum(len(d.text) for d in docs), path.stat().st_size
    if size > max(cfg.max_bytes_per_domain, PIECE_CHARS):  # the file has more pieces: the cap kept one
        raise UserError(
            f"corpus {cfg.corpus!r}: data.max_bytes_per_domain={cfg.max_bytes_per_domain:,} keeps {len(docs)} "
            f"document ({kept:,} characters) of this {size:,}-byte file; a run needs 2, one to validate on: "
            f"raise data.max_bytes_per_domain above {PIECE_CHARS:,}, the size of one document of a single file"
        )
    raise UserError(
        f"corpus {cfg.corpus!r} is one text file of {kept:,} characters, which makes {len(docs)} document; a run "
        f"needs 2, one to validate on. A single file is cut at blank lines into documents of up to "
        f"{PIECE_CHARS:,} characters: give more than {PIECE_CHARS:,} characters of text, or a folder of "
        "text files (one document each)"
    )
