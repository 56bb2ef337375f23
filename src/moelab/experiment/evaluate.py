"""`moelab eval`: score a checkpoint on its run's validation split or on every document of a corpus.

Why here and not in the CLI: which objective a checkpoint may be evaluated with, which documents a
corpus gives and how the result is counted are decisions other callers (scripts, studies) need too;
cli.py only parses arguments and prints what :func:`evaluate_checkpoint` returns.

What is evaluated:
- no ``data``: the run's own validation split (the run's corpus and settings, its tokenizer), the
  blocks the trainer scored, so the loss matches the run's last ``val_loss``.
- ``data``: *every* document of that corpus. A path (file, folder) or ``hf:`` corpus is read whole,
  with no ``max_bytes_per_domain`` cap unless ``max_bytes_per_domain`` is given (then the same
  per-domain cap training applies, :func:`moelab.data.corpus.cap_by_domain`). A named corpus
  (``builtin``, ``synthetic``) is built as the run built it: its size *is* the run's
  ``data.max_bytes_per_domain`` / ``data.synthetic_docs``. For the causal objective the last, partial
  block is padded with EOS (positions that carry no loss), so no document's end is dropped.

The result counts what was used: ``documents`` (documents with at least one scored token),
``documents_in_corpus`` (all documents of the corpus, or of the validation split, before any cap or
``batches`` limit) and ``tokens`` (scored targets), with loss, perplexity and bits per byte overall
and per label value.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.checkpoint.folder import read_run_config, resolve_checkpoint
from moelab.config import DataConfig, RunConfig
from moelab.convert.load import load_model
from moelab.data.corpus import CORPORA, cap_by_domain, load_corpus
from moelab.data.document import Document
from moelab.data.loader import Batch, PackedData, build_splits, evenly_spaced, pack
from moelab.errors import UserError
from moelab.objectives import Objective, build_objective
from moelab.objectives.metrics import token_bytes
from moelab.train.evaluation import evaluate, evaluate_with_objective, resolve_precision
from moelab.train.objective_step import is_plain_causal

NO_CAP = sys.maxsize  # max_bytes_per_domain that keeps every document
PRINTED_LABELS = ("domain", "lang")  # label names the text output breaks down (JSON has them all)


def eval_objective(cfg: RunConfig, name: str | None = None) -> Objective:
    """The objective to evaluate a checkpoint of ``cfg`` with: ``name``, or the one it was trained with.

    An objective needs the model it trains: an encoder–decoder for span, a single stack with the
    objective's attention (causal, prefix, bidirectional) otherwise. Asking for one the checkpoint's
    model cannot run raises :class:`UserError` naming the objective to use instead.
    """
    trained = build_objective(cfg.train.objective)
    objective = build_objective(name) if name else trained
    if (objective.architecture == "encoder_decoder") != (trained.architecture == "encoder_decoder") or (
        trained.architecture != "encoder_decoder" and objective.attention != cfg.model.attention
    ):
        raise UserError(
            f"--objective {objective.name} needs a different model than this checkpoint's ({cfg.train.objective}, "
            f"attention={cfg.model.attention}): evaluate it with --objective {cfg.train.objective}"
        )
    return objective


def corpus_documents(
    spec: str, data: DataConfig, max_bytes_per_domain: int | None = None
) -> tuple[list[Document], int]:
    """``(documents to evaluate, documents in the corpus)`` for ``--data spec``.

    ``data`` is the run's data config: it sets how a named corpus is built. Paths and ``hf:`` corpora
    are read without a cap; ``max_bytes_per_domain`` then caps every corpus per domain.
    """
    if spec in CORPORA:
        docs = load_corpus(replace(data, corpus=spec))
    else:
        docs = load_corpus(replace(data, corpus=spec, max_bytes_per_domain=NO_CAP))
    in_corpus = len(docs)
    if max_bytes_per_domain is not None:
        docs = cap_by_domain(docs, max_bytes_per_domain)
    return docs, in_corpus


def pad_to_blocks(data: PackedData) -> PackedData:
    """``data`` with its stream padded by EOS to whole blocks of ``seq_len + 1``.

    Packing drops the tail that does not fill a block; padding keeps it. A padded position's input is
    EOS, so the loader gives it label ``-100`` and it counts nowhere; the document's own last target
    (its EOS) is a real token before the padding. Label and document streams repeat their last value.
    """
    extra = (-data.num_tokens) % (data.seq_len + 1)
    if extra == 0:
        return data

    def fill(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((extra,), value)])

    return PackedData(
        fill(data.tokens_N, data.eos_id),
        {k: fill(v, int(v[-1])) for k, v in data.label_ids_N.items()},
        fill(data.doc_N, int(data.doc_N[-1])),
        data.label_names,
        data.doc_names,
        data.seq_len,
        data.eos_id,
    )


class BlockBatches:
    """The batches :func:`moelab.data.loader.eval_batches` gives (all blocks, or ``max_batches·batch_size``
    evenly spaced), made one at a time as they are read: a whole corpus never sits in memory as batches."""

    def __init__(self, data: PackedData, batch_size: int, max_batches: int | None = None) -> None:
        total = data.num_blocks
        self.data, self.batch_size = data, batch_size
        self.idx = evenly_spaced(
            total, total if max_batches is None else min(total, max_batches * batch_size)
        )

    def __len__(self) -> int:
        return -(-len(self.idx) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, len(self.idx), self.batch_size):
            yield self.data.batch(self.idx[i : i + self.batch_size])


def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    batches: int | None = None,
    objective: str | None = None,
    max_bytes_per_domain: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint (or a run folder's newest complete one) at ``path``; a JSON-able dict.

    ``data``: a corpus (name, path, ``hf:``) to evaluate every document of; None = the run's validation
    split. ``batches``: at most this many batches of ``train.batch_size`` blocks, evenly spaced (None =
    all). ``objective``: evaluate with this objective (default: the training one). ``max_bytes_per_domain``:
    cap ``data`` per domain (only with ``data``). ``dtype``: load the weights in bf16/fp16/fp32 (default:
    as stored, fp32 for what training writes).

    Keys: ``checkpoint``, ``objective``, ``data``, ``split`` (``all`` | ``validation``),
    ``max_bytes_per_domain``, ``documents``, ``documents_in_corpus``, ``tokens``, ``bytes``, ``batches``,
    ``loss`` (nats per target), ``ppl``, ``bpb`` (bits per byte; None for objectives without bytes per
    target: mlm, span), ``loss_by``/``bpb_by``/``tokens_by`` (label name → value → number) and
    ``metrics`` (the objective's own). NaN becomes None.
    """
    if batches is not None and batches < 1:
        raise UserError(f"--batches {batches}: give at least 1 (or leave it out to evaluate every batch)")
    if max_bytes_per_domain is not None and max_bytes_per_domain < 1:
        raise UserError(f"--max-bytes-per-domain {max_bytes_per_domain}: give at least 1")
    if max_bytes_per_domain is not None and data is None:
        raise UserError(
            "--max-bytes-per-domain caps a --data corpus; the run's validation split is fixed by its run"
        )
    ckpt = resolve_checkpoint(path)
    cfg = read_run_config(ckpt)
    obj = eval_objective(cfg, objective)
    model, tok = load_model(ckpt, dtype=dtype)
    seq_len = cfg.data.seq_len
    if data is not None:
        docs, in_corpus = corpus_documents(data, cfg.data, max_bytes_per_domain)
        packed = pack(docs, tok, seq_len)
        if is_plain_causal(obj):
            packed = pad_to_blocks(packed)
        if packed.num_blocks == 0:
            raise UserError(f"corpus {data!r} has fewer than data.seq_len+1={seq_len + 1} tokens")
    else:
        packed = build_splits(load_corpus(cfg.data), tok, seq_len, cfg.data.val_fraction, cfg.data.seed).val
        in_corpus = len(packed.doc_names)
    bf16 = resolve_precision(cfg.train.precision, torch.device("cpu"))
    chosen = BlockBatches(packed, cfg.train.batch_size, batches)
    if is_plain_causal(obj):
        r = evaluate(model, chosen, packed.label_names, bf16, token_bytes_V=token_bytes(tok))
    else:
        obj.check_tokenizer(tok)
        r = evaluate_with_objective(model, chosen, obj, tok, bf16)
    result = {
        "checkpoint": str(ckpt),
        "objective": obj.name,
        "data": data if data is not None else cfg.data.corpus,
        "split": "all" if data is not None else "validation",
        "max_bytes_per_domain": max_bytes_per_domain,
        "documents": r.documents,
        "documents_in_corpus": in_corpus,
        "tokens": r.tokens,
        "bytes": r.num_bytes,
        "batches": len(chosen),
        "loss": r.loss,
        "ppl": r.ppl,
        "bpb": r.bpb,
        "loss_by": r.loss_by,
        "bpb_by": r.bpb_by,
        "tokens_by": r.tokens_by,
        "metrics": r.metrics,
    }
    return _finite(result)


def _finite(x: Any) -> Any:
    """``x`` with every NaN/inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def format_result(result: dict[str, Any]) -> str:
    """The text ``moelab eval`` prints: what was evaluated (documents, tokens), the headline numbers, and
    loss and bits per byte per domain and language."""
    where = (
        f"validation split of {result['data']}" if result["split"] == "validation" else str(result["data"])
    )
    cap = result.get("max_bytes_per_domain")
    scope = (
        f"capped at {cap:,} bytes per domain" if cap else "every document" if result["split"] == "all" else ""
    )
    lines = [
        f"{result['checkpoint']}: objective {result['objective']}",
        f"  data: {where}" + (f" ({scope})" if scope else ""),
        f"  documents {result['documents']:,} of {result['documents_in_corpus']:,}  tokens {result['tokens']:,}"
        + (f"  bytes {result['bytes']:,}" if result.get("bytes") is not None else ""),
        f"  loss {_num(result['loss'], '.4f')}  ppl {_num(result['ppl'], '.2f')}  bpb {_num(result['bpb'], '.4f')}"
        + "".join(
            f"  {k} {_num(v, '.4f')}"
            for k, v in result["metrics"].items()
            if k not in ("loss", "tokens", "bpb")
        ),
    ]
    for name in PRINTED_LABELS:
        per = result["loss_by"].get(name)
        if not per:
            continue
        bpb = result["bpb_by"].get(name, {})
        toks = result["tokens_by"].get(name, {})
        width = max(len(name) + 3, *(len(v) for v in per))
        lines.append(f"  {'by ' + name:<{width}}  {'loss':>7}  {'bpb':>7}  {'tokens':>10}")
        for value, loss in per.items():
            t = toks.get(value)
            lines.append(
                f"  {value:<{width}}  {_num(loss, '.4f'):>7}  {_num(bpb.get(value), '.4f'):>7}  "
                f"{'' if t is None else format(t, ','):>10}"
            )
    return "\n".join(lines)
