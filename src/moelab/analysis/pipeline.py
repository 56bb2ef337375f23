"""``moelab analyze``: every analysis of one model on one labelled split → analysis.json + report.html.

The pipeline (each step optional where its inputs are missing):
1. trace the MoE model's routing over ``max_tokens`` tokens (streamed to ``OUT/trace``) → load
   metrics, specialisation (baseline-corrected NMI with a document-resampling interval), expert
   profiles; the untrained (step-0) model is traced on the same tokens (``OUT/trace_step0``) and
   its specialisation sits beside the trained one's;
2. drops towards the end: the same model evaluated with a capacity (``position`` and ``score``
   policies), one sequence per capacity group;
3. routing drift over ``checkpoints``;
4. gradient conflict on the MoE model and on the dense model (``dense``), same batches;
5. dense FFN activation sparsity of the dense model.

Split by what the caller holds: :func:`analyze_moe` (steps 1–4 for the MoE) and
:func:`analyze_dense` (4–5 for the dense twin) take models *in memory* and a
:class:`PackedData` split, :func:`merge_analyses` joins their dicts, :func:`analyze_model` does
all three and writes the files (``moelab compare`` calls it with the models it just trained and
their validation split), and :func:`analyze` is the checkpoint-and-corpus front end of
``moelab analyze``.

``OUT`` follows :mod:`moelab.outputs`: a non-empty ``OUT`` is refused before anything is loaded
unless ``overwrite`` and it holds nothing but an earlier analysis (:data:`ANALYSIS_FOLDER`); the
whole folder (traces, ``analysis.json``, ``report.html``) is written into a temporary sibling and
renamed into place; ``OUT`` may not be, lie inside or hold the checkpoints it reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.analysis.drift import drift_from_checkpoints
from moelab.analysis.drops import trace_drops, with_capacity
from moelab.analysis.gradient_conflict import gradient_conflict
from moelab.analysis.metrics import trace_metrics
from moelab.analysis.sparsity import ffn_sparsity
from moelab.analysis.specialization import expert_profiles, specialization
from moelab.analysis.trace import TRACE_FOLDER, collect
from moelab.config import DataConfig
from moelab.data.loader import PackedData, eval_batches, pack
from moelab.data.tokenizer import Tokenizer
from moelab.errors import UserError
from moelab.outputs import TMP_PREFIX, OutputKind, check_output, first_foreign, staged_folder

REPORT_FILES = ("analysis.json", "report.html")
TRACE_DIRS = ("trace", "trace_step0", "trace_drops", "trace_drops_score")  # analyze_moe's traces in OUT
OVERWRITE_HINT = (
    "give another --out, or pass --overwrite to replace the earlier analysis there (its analysis.json, "
    "report.html and trace folders)"
)


def _foreign_in_analysis(entry: Path) -> Path | None:
    """The first path in ``entry`` (one entry of an analysis folder) that moelab did not write, or None."""
    if entry.is_symlink():
        return entry
    if entry.name.startswith(TMP_PREFIX) or (entry.name in REPORT_FILES and entry.is_file()):
        return None
    if entry.name in TRACE_DIRS and entry.is_dir():
        return first_foreign(entry, TRACE_FOLDER)
    return entry


ANALYSIS_FOLDER = OutputKind("analysis", _foreign_in_analysis)  # what `moelab analyze` writes into OUT


@dataclass(frozen=True)
class AnalyzeOptions:
    """What to analyse and how much. Token counts bound the cost of each pass.

    ``data`` is the corpus :func:`analyze` packs (callers with a split in memory leave it None);
    ``specialization_only`` traces and scores only the specialisation (trained and step-0 models),
    e.g. for a compare's extra seeds; ``n_shuffle``/``n_boot`` size the null and the resampling interval;
    ``overwrite`` lets :func:`analyze_model` replace an earlier analysis in ``out`` (nothing else).
    """

    data: str | None = None
    out: str = "analysis"
    overwrite: bool = False
    checkpoints: tuple[str, ...] = ()
    dense: str | None = None
    max_tokens: int = 65_536
    batch_size: int = 8
    capacity_factor: float = 1.0
    drop_tokens: int = 16_384
    conflict_batches: int = 4
    drift_tokens: int = 16_384
    max_bytes_per_domain: int = 2_000_000
    seq_len: int | None = None
    n_shuffle: int = 20
    n_boot: int = 20
    progress: bool = False
    specialization_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # load dtype of the checkpoints (bf16/fp16/fp32; None = as stored)


def load_data(spec: str, tokenizer: Tokenizer, seq_len: int, max_bytes_per_domain: int) -> PackedData:
    """The corpus ``spec`` (name, path or hf:…) packed with the checkpoint's tokenizer, all documents."""
    from moelab.data.corpus import load_corpus

    docs = load_corpus(DataConfig(corpus=spec, max_bytes_per_domain=max_bytes_per_domain))
    data = pack(docs, tokenizer, seq_len)
    if data.num_blocks == 0:
        raise UserError(f"corpus {spec!r} has {data.num_tokens} tokens, fewer than one block of {seq_len + 1}")
    return data


def _decoder(tokenizer: Tokenizer):
    """Token id → readable string; a byte-level piece that is not whole UTF-8 shows its bytes."""
    raw = getattr(getattr(tokenizer, "tok", None), "id_to_token", None)

    def decode(i: int) -> str:
        try:
            text = tokenizer.decode([i])
        except Exception:  # a special or unknown id: show the number
            return f"<{i}>"
        if "\ufffd" in text and raw is not None:
            piece = raw(i)
            if piece is not None:
                try:  # GPT-2 byte-to-unicode alphabet back to bytes
                    return "bytes:" + _byte_level_bytes(piece).hex(" ")
                except KeyError:
                    return piece
        return text

    return decode


def _byte_level_bytes(piece: str) -> bytes:
    """Undo the GPT-2 byte→unicode mapping of byte-level BPE pieces."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    inverse = {chr(c): b for b, c in zip(bs, cs)}
    return bytes(inverse[ch] for ch in piece)


def _has_domains(data: PackedData) -> bool:
    return "domain" in data.label_ids_N and torch.unique(data.label_ids_N["domain"]).numel() > 1


def _is_moe(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "moe", None) is not None


def _documents(data: PackedData) -> int:
    return int(torch.unique(data.doc_N).numel()) if data.doc_N.numel() else 0


def analyze_moe(
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    data: PackedData,
    opts: AnalyzeOptions,
    out: str | Path | None = None,
    initial_model: torch.nn.Module | None = None,
    step0_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The MoE part of the pipeline on a model in memory and a packed split (e.g. a run's validation data).

    Returns ``{"summary", "specialization", "metrics", "experts", "drops", "drops_score",
    "gradient_conflict": {"moe": …}}`` (+ ``"drift"`` with ``opts.checkpoints``). With
    ``initial_model`` (the untrained model, see :mod:`moelab.analysis.step0`) it is traced on the
    same tokens and every specialisation entry gets ``step0`` and ``gain``; ``step0_info`` (how it
    was built) is stored as ``specialization["step0_model"]``. ``opts.specialization_only`` stops
    after the specialisation. Traces go under ``out`` (default ``opts.out``); nothing is read from disk.
    """
    if not _is_moe(model):
        raise UserError("analyze_moe needs an MoE model (model.cfg.moe is None): use analyze_dense")
    out = Path(opts.out if out is None else out)
    trace = collect(model, data, out / "trace", opts.batch_size, opts.max_tokens, progress=opts.progress)
    docs = np.unique(trace.array("doc")[trace.array("valid").astype(bool)]) if "doc" in trace.names() else []
    result: dict[str, Any] = {"summary": {"tokens traced": trace.num_tokens, "documents traced": len(docs)}}
    initial_trace = None
    if initial_model is not None:
        initial_trace = collect(initial_model, data, out / "trace_step0", opts.batch_size, opts.max_tokens,
                                progress=opts.progress)
    spec = specialization(trace, opts.n_shuffle, opts.n_boot, initial=initial_trace)
    if initial_model is not None or step0_info is not None:  # built, or skipped with its reason
        spec["step0_model"] = step0_info or {"source": "given by the caller"}
        result["summary"]["step-0 model"] = spec["step0_model"].get("note", spec["step0_model"]["source"])
    result["specialization"] = spec
    if opts.specialization_only:
        return result
    result["metrics"] = trace_metrics(trace)
    result["experts"] = expert_profiles(trace, decode=_decoder(tokenizer) if tokenizer is not None else None)
    for key, policy in (("drops", "position"), ("drops_score", "score")):
        with with_capacity(model, opts.capacity_factor, policy):
            t = collect(model, data, out / f"trace_{key}", 1, opts.drop_tokens, progress=opts.progress)
        result[key] = {"capacity_factor": opts.capacity_factor, "policy": policy, **trace_drops(t)}
    if opts.checkpoints:
        n = max(1, opts.drift_tokens // (opts.batch_size * data.seq_len))
        result["drift"] = drift_from_checkpoints(opts.checkpoints, eval_batches(data, opts.batch_size, n),
                                                 progress=opts.progress)
    if _has_domains(data):
        skip = _conflict_does_not_fit(model, data)
        if skip:
            result["summary"]["gradient conflict"] = skip
        else:
            batches = eval_batches(data, opts.batch_size, opts.conflict_batches)
            names = data.label_names.get("domain")
            result["gradient_conflict"] = {"moe": gradient_conflict(model, batches, "domain", names)}
    return result


def _conflict_does_not_fit(model: torch.nn.Module, data: PackedData) -> str | None:
    """Why gradient conflict is skipped (one FFN-sized gradient per domain does not fit in free memory,
    e.g. a released model at full size), or None when it fits."""
    from moelab.analysis.gradient_conflict import memory_needed
    from moelab.hardware import available_memory

    free = available_memory(next(model.parameters()).device)
    n_values = int(torch.unique(data.label_ids_N["domain"]).numel())
    need = memory_needed(model, n_values)
    if free is None or need <= free.bytes:
        return None
    return (f"skipped: {n_values} per-domain FFN gradients need {need / 2**30:.1f} GiB, "
            f"{free.bytes / 2**30:.1f} GiB free ({free.source})")  # fmt: skip


def analyze_dense(model: torch.nn.Module, data: PackedData, opts: AnalyzeOptions) -> dict[str, Any]:
    """The dense part: ``{"gradient_conflict": {"dense": …}, "sparsity": …}`` on the same batches an MoE gets.

    Gradient conflict needs a ``domain`` label with two or more values; sparsity needs dense FFNs.
    """
    batches = eval_batches(data, opts.batch_size, opts.conflict_batches)
    result: dict[str, Any] = {}
    if _has_domains(data):
        skip = _conflict_does_not_fit(model, data)
        if skip:
            result["summary"] = {"dense gradient conflict": skip}
        else:
            names = data.label_names.get("domain")
            result["gradient_conflict"] = {"dense": gradient_conflict(model, batches, "domain", names)}
    with torch.no_grad():
        result["sparsity"] = ffn_sparsity(model, batches)
    return result


def merge_analyses(moe: dict[str, Any] | None, dense: dict[str, Any] | None) -> dict[str, Any]:
    """One analysis dict from the MoE and dense parts: ``summary`` and ``gradient_conflict`` are merged
    (MoE first), every other key comes from the part that has it."""
    merged: dict[str, Any] = {}
    for part in (moe, dense):
        for key, value in (part or {}).items():
            if key in ("summary", "gradient_conflict") and key in merged:
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def analyze_model(
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    data: PackedData,
    opts: AnalyzeOptions,
    dense_model: torch.nn.Module | None = None,
    initial_model: torch.nn.Module | None = None,
    step0_info: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
    title: str = "moelab analysis",
    sources: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """Analyse models held in memory on ``data``; write ``opts.out``/analysis.json and report.html; return the dict.

    ``model`` is the MoE (or a dense model alone: then only its dense sections); ``dense_model`` its
    dense twin; ``initial_model`` the step-0 MoE. ``summary`` entries lead the report's summary.
    No checkpoint or corpus is read, so ``moelab compare`` can pass the run's own validation split.
    ``opts.out`` is written whole or not at all (module doc); ``sources`` are folders it must stay clear of.
    """
    from moelab.analysis.report import write_report

    with staged_folder(opts.out, ANALYSIS_FOLDER, overwrite=opts.overwrite, sources=sources,
                       hint=OVERWRITE_HINT) as tmp:  # fmt: skip
        staged = replace(opts, out=str(tmp))
        moe_part = dense_part = None
        if _is_moe(model):
            moe_part = analyze_moe(model, tokenizer, data, staged, initial_model=initial_model,
                                   step0_info=step0_info)  # fmt: skip
            if dense_model is not None and not opts.specialization_only:
                dense_part = analyze_dense(dense_model, data, staged)
        elif not opts.specialization_only:
            dense_part = analyze_dense(model, data, staged)
        head = dict(summary or {})
        for key, value in (("data", opts.data or "in memory"), ("tokens in corpus", data.num_tokens),
                           ("documents in corpus", _documents(data)), ("seq_len", data.seq_len),
                           ("model", "MoE" if _is_moe(model) else "dense")):
            head.setdefault(key, value)
        result = merge_analyses({"summary": head}, merge_analyses(moe_part, dense_part))
        write_report(tmp, result, title=title)
    return result


def _seq_len_of(path: Path, model: torch.nn.Module, opts: AnalyzeOptions) -> int:
    if opts.seq_len:
        return opts.seq_len
    from moelab.checkpoint.folder import is_model_folder, read_run_config, resolve_checkpoint

    if not is_model_folder(path):
        return read_run_config(resolve_checkpoint(path)).data.seq_len
    return min(DataConfig().seq_len, getattr(getattr(model, "cfg", None), "max_seq_len", DataConfig().seq_len))


def analyze(model_path: str | Path, opts: AnalyzeOptions) -> dict[str, Any]:
    """``moelab analyze``: load the checkpoint (and ``opts.dense``), rebuild its step-0 model, pack
    ``opts.data`` with its tokenizer, then :func:`analyze_model`. Returns the analysis dict."""
    from moelab.analysis.step0 import initial_model_for
    from moelab.checkpoint.folder import is_model_folder, resolve_checkpoint
    from moelab.convert.load import load_model

    if not opts.data:
        raise UserError("no corpus to analyse on: pass --data NAME_OR_PATH")
    path = Path(model_path)
    sources = [path, *([opts.dense] if opts.dense else []), *opts.checkpoints]
    # claim OUT before any slow work: what is there is refused now, not after the traces
    check_output(opts.out, ANALYSIS_FOLDER, overwrite=opts.overwrite, sources=sources, hint=OVERWRITE_HINT)
    model, tokenizer = load_model(path, dtype=opts.dtype)
    source = path if is_model_folder(path) else resolve_checkpoint(path)
    seq_len = _seq_len_of(path, model, opts)
    data = load_data(opts.data, tokenizer, seq_len, opts.max_bytes_per_domain)
    summary: dict[str, Any] = {"checkpoint": str(source)}
    initial_model = step0_info = None
    if _is_moe(model):
        initial_model, step0_info = initial_model_for(path, model)
    dense_model = None
    if opts.dense:
        dense_model, _ = load_model(opts.dense, dtype=opts.dtype)
        dense_path = Path(opts.dense)
        summary["dense checkpoint"] = str(dense_path if is_model_folder(dense_path) else resolve_checkpoint(dense_path))
    return analyze_model(model, tokenizer, data, opts, dense_model=dense_model, initial_model=initial_model,
                         step0_info=step0_info, summary=summary, title=f"moelab analysis of {source.name}",
                         sources=sources)  # fmt: skip
