"""Corpora by name: the built-in corpus, synthetic domains, local files and HF datasets.

``load_corpus(data_cfg)`` turns ``data.corpus`` into a list of labelled :class:`Document`:
- ``builtin`` (default): built at first use from the Python standard library that every install
  has (source files → domain ``code``; their docstrings and comments, and any ``.rst``/``.txt``
  docs → domain ``prose``) plus the ``synthetic`` domains; cached as JSONL.gz under
  ``$MOELAB_CACHE`` (default ``~/.cache/moelab``).
- ``synthetic``: the seeded generators of :mod:`moelab.data.synthetic`.
- a path: a ``.txt`` file, a folder of files, or ``.jsonl``/``.jsonl.gz`` with a ``text``
  field (other string fields become labels).
- ``hf:NAME[:CONFIG]``: a HF ``datasets`` dataset from the local cache, or ``hf:/path`` saved
  with ``save_to_disk``; never downloads anything new on its own.

Bad input never reaches the trainer: a missing path, an empty corpus or JSONL without ``text``
raise :class:`UserError`; binary files, non-UTF-8 files and broken JSON lines are skipped,
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
from moelab.data.synthetic import synthetic_documents
from moelab.errors import UserError
from moelab.registry import Registry

CorpusFn = Callable[[DataConfig], list[Document]]
CORPORA: Registry[CorpusFn] = Registry("corpus")

MAX_DOC_CHARS = 16_000  # longer texts are cut at line breaks: keeps batches mixed and the split fine-grained
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


def split_long(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ~``limit`` characters at line breaks."""
    if len(text) <= limit:
        return [text]
    pieces, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > limit and cur:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        pieces.append("".join(cur))
    return pieces


def _docs(doc_id: str, text: str, labels: dict[str, str]) -> list[Document]:
    parts = split_long(text)
    if len(parts) == 1:
        return [Document(doc_id, text, labels)]
    return [Document(f"{doc_id}#{i}", p, labels) for i, p in enumerate(parts)]


def cap_by_domain(docs: list[Document], max_bytes: int) -> list[Document]:
    """Keep about ``max_bytes`` characters of each ``domain`` label, spread evenly over its sub-buckets.

    A domain's documents fall into buckets by their other labels (``lang``, ``source``, ...).
    Corpora are often stored bucket after bucket (all Python code, then all Go code), so keeping
    documents in file order until the cap is hit would silently drop every later language or
    source. Instead each pick takes the next document of the domain's bucket that holds the
    fewest characters so far (ties: the bucket seen first), until the domain reaches
    ``max_bytes``; a bucket that runs out stops competing. The kept documents keep their
    original order. With one bucket per domain this is the plain in-order cap.
    """
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
    return [docs[i] for i in sorted(keep)]


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


def _read_jsonl(path: Path, skips: SkipCounter, source: str) -> Iterator[Document]:
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
                if not isinstance(rec, dict) or "text" not in rec:
                    raise UserError(
                        f"{path}:{lineno}: a JSONL corpus needs a 'text' field in every record "
                        f"(found {sorted(rec) if isinstance(rec, dict) else type(rec).__name__})"
                    )
                if not isinstance(rec["text"], str) or not rec["text"].strip():
                    skips.skip("records with empty text")
                    continue
                labels = {k: str(v) for k, v in rec.items() if k not in ("text", "id") and isinstance(v, (str, int))}
                labels.setdefault("source", source)
                yield from _docs(str(rec.get("id", f"{source}:{lineno}")), rec["text"], labels)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz"))


def load_files(path: Path) -> list[Document]:
    """Documents from a ``.txt`` file, a JSONL(.gz) file, or every such file under a folder.

    In a folder, a file's first sub-folder names its ``domain`` (``data/code/a.py`` → ``code``).
    A folder that holds JSONL files is a JSONL corpus: the other files beside them (a README,
    statistics) describe the data and are not read as documents.
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
            docs.extend(_read_jsonl(f, skips, rel))
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
        parts = Path(rel).parts
        domain = parts[0] if len(parts) > 1 else "text"
        docs.extend(_docs(rel, text, {"domain": domain, "lang": "unknown", "source": rel}))
    skips.report()
    return docs


# ----------------------------------------------------------------------------- HF datasets


def load_hf(spec: str) -> list[Document]:
    """``hf:NAME[:CONFIG]`` (local cache only) or ``hf:/path/saved_with_save_to_disk``."""
    name = spec[3:]
    try:
        import datasets
    except ImportError:
        raise UserError("hf: corpora need the 'datasets' package: pip install datasets") from None
    try:
        if Path(name).exists():
            ds = datasets.load_from_disk(name)
        else:
            ds_name, _, config = name.partition(":")
            ds = datasets.load_dataset(ds_name, config or None, split="train")
    except Exception as exc:  # datasets raises many types; the user needs one line
        raise UserError(f"cannot load HF dataset {name!r} (offline: it must be cached or saved locally): {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" not in ds.column_names:
        raise UserError(f"HF dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    docs = []
    for i, rec in enumerate(ds):
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            continue
        labels = {k: str(v) for k, v in rec.items() if k != "text" and isinstance(v, (str, int))}
        labels.setdefault("source", name)
        docs.extend(_docs(f"{name}:{i}", rec["text"], labels))
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
                new = _docs(f"stdlib/{rel}", text, {"domain": "code", "lang": "python", "source": "stdlib"})
                code.extend(new)
                sizes["code"] += len(text)
            text, source = _prose_of(text), "stdlib-docstrings"
        else:
            source = "stdlib-docs"
        if text.strip() and sizes["prose"] < max_bytes_per_domain:
            prose.extend(_docs(f"{source}/{rel}", text, {"domain": "prose", "lang": "en", "source": source}))
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
    """The documents ``data.corpus`` names, capped at ``data.max_bytes_per_domain`` per domain."""
    spec = cfg.corpus
    if spec in CORPORA:
        docs = CORPORA[spec](cfg)
    elif spec.startswith("hf:"):
        docs = load_hf(spec)
    elif "/" in spec or "." in spec or Path(spec).exists():
        docs = load_files(Path(spec).expanduser())
    else:
        raise UserError(
            f"unknown corpus {spec!r}: expected one of {', '.join(map(repr, CORPORA))}, a path, or hf:NAME[:CONFIG]"
        )
    docs = cap_by_domain(docs, cfg.max_bytes_per_domain)
    if not docs or not any(d.text.strip() for d in docs):
        raise UserError(f"corpus {spec!r} holds no text: nothing to train on")
    return docs
