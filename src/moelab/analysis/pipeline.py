"""``moelab analyze``: every analysis of one checkpoint on one labelled corpus → analysis.json + report.html.

The pipeline (each step optional where its inputs are missing):
1. trace the MoE model's routing over ``max_tokens`` tokens of the corpus (streamed to
   ``OUT/trace``) → load metrics, specialisation (NMI with baselines), expert profiles;
2. drops towards the end: the same model evaluated with a capacity (``position`` and ``score``
   policies), one sequence per capacity group;
3. routing drift over ``checkpoints``;
4. gradient conflict on the MoE model and on the dense model (``dense``), same batches;
5. dense FFN activation sparsity of the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab.analysis.drift import drift_from_checkpoints
from moelab.analysis.drops import trace_drops, with_capacity
from moelab.analysis.gradient_conflict import gradient_conflict
from moelab.analysis.metrics import trace_metrics
from moelab.analysis.sparsity import ffn_sparsity
from moelab.analysis.specialization import expert_profiles, specialization
from moelab.analysis.trace import collect
from moelab.config import DataConfig
from moelab.data.loader import PackedData, eval_batches, pack
from moelab.data.tokenizer import Tokenizer
from moelab.errors import UserError


@dataclass(frozen=True)
class AnalyzeOptions:
    """What to analyse and how much. Token counts bound the cost of each pass."""

    data: str
    out: str = "analysis"
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
    extra: dict[str, Any] = field(default_factory=dict)


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


def analyze(model_path: str | Path, opts: AnalyzeOptions) -> dict[str, Any]:
    """Run the pipeline (module doc); write ``OUT/analysis.json`` and ``OUT/report.html``; return the dict."""
    from moelab.analysis.report import write_report
    from moelab.train.checkpoint import load_model, read_run_config, resolve_checkpoint

    ckpt = resolve_checkpoint(model_path)
    model, tokenizer = load_model(ckpt)
    run_cfg = read_run_config(ckpt)
    seq_len = opts.seq_len or run_cfg.data.seq_len
    data = load_data(opts.data, tokenizer, seq_len, opts.max_bytes_per_domain)
    out = Path(opts.out)
    result: dict[str, Any] = {
        "summary": {
            "checkpoint": str(ckpt),
            "data": opts.data,
            "tokens in corpus": data.num_tokens,
            "seq_len": seq_len,
            "model": "MoE" if model.cfg.moe is not None else "dense",
        }
    }
    dense_model = None
    if opts.dense:
        dense_model, _ = load_model(opts.dense)
        result["summary"]["dense checkpoint"] = str(resolve_checkpoint(opts.dense))
    elif model.cfg.moe is None:
        dense_model = model
    names = data.label_names.get("domain")
    conflict_batches = eval_batches(data, opts.batch_size, opts.conflict_batches)
    has_domain = "domain" in data.label_ids_N and torch.unique(data.label_ids_N["domain"]).numel() > 1

    if model.cfg.moe is not None:
        trace = collect(model, data, out / "trace", opts.batch_size, opts.max_tokens, progress=opts.progress)
        result["summary"]["tokens traced"] = trace.num_tokens
        result["metrics"] = trace_metrics(trace)
        result["specialization"] = specialization(trace, opts.n_shuffle, opts.n_boot)
        result["experts"] = expert_profiles(trace, decode=_decoder(tokenizer))
        for key, policy in (("drops", "position"), ("drops_score", "score")):
            with with_capacity(model, opts.capacity_factor, policy):
                t = collect(model, data, out / f"trace_{key}", 1, opts.drop_tokens, progress=opts.progress)
            result[key] = {"capacity_factor": opts.capacity_factor, "policy": policy, **trace_drops(t)}
        if opts.checkpoints:
            drift_batches = eval_batches(data, opts.batch_size, max(1, opts.drift_tokens // (opts.batch_size * seq_len)))
            result["drift"] = drift_from_checkpoints(opts.checkpoints, drift_batches, progress=opts.progress)
    if has_domain:
        result["gradient_conflict"] = {}
        if model.cfg.moe is not None:
            result["gradient_conflict"]["moe"] = gradient_conflict(model, conflict_batches, "domain", names)
        if dense_model is not None:
            result["gradient_conflict"]["dense"] = gradient_conflict(dense_model, conflict_batches, "domain", names)
    if dense_model is not None:
        with torch.no_grad():
            result["sparsity"] = ffn_sparsity(dense_model, conflict_batches)
    write_report(out, result, title=f"moelab analysis of {ckpt.name}")
    return result
