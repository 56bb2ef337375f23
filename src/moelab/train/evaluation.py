"""Validation of a model on fixed batches: loss and bits per byte overall and per label value, expert load.

Why its own module: the trainer, ``moelab eval``, ``moelab compare`` and the studies must score a
model the same way; they all call these functions.

Bits per byte (``bpb``) = summed nats / ln 2 / UTF-8 bytes of the predicted tokens: unlike loss per
token it compares models with different tokenizers. It needs the ``[V]`` table of bytes per token
(:func:`moelab.objectives.metrics.token_bytes`); callers that evaluate often (the trainer) build it
once and pass it in.

Legend: B batch, S positions, V vocab, N scored positions of a batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moelab.config import IGNORE_INDEX
from moelab.data.loader import Batch
from moelab.hardware import bf16_is_fast
from moelab.model.transformer import Transformer
from moelab.moe.stats import RoutingStats
from moelab.objectives.metrics import byte_sums
from moelab.train import objective_step


@dataclass
class EvalResult:
    """Validation loss (and bits per byte) overall and per label value, and expert load per MoE layer.

    ``objective`` names the training objective; ``metrics`` holds its own numbers (e.g.
    ``masked_accuracy`` for mlm, ``target_loss`` for span and prefix; empty for causal).
    ``bpb``/``bpb_by`` are None/empty when no token-byte table was given (or the objective has no
    bytes per target, mlm and span); a value whose predicted tokens hold no bytes (only EOS) is NaN.
    ``documents`` counts the documents with at least one scored position in the batches.
    """

    loss: float
    tokens: int
    loss_by: dict[str, dict[str, float]] = field(default_factory=dict)  # label name → value → mean loss
    expert_load: dict[int, list[float]] = field(default_factory=dict)  # layer → share of assignments per expert
    objective: str = "causal"
    metrics: dict[str, float] = field(default_factory=dict)
    bpb: float | None = None  # bits per UTF-8 byte of the predicted tokens
    bpb_by: dict[str, dict[str, float]] = field(default_factory=dict)  # label name → value → bits per byte
    tokens_by: dict[str, dict[str, int]] = field(default_factory=dict)  # label name → value → scored tokens
    num_bytes: int | None = None  # UTF-8 bytes of the predicted tokens (with a token-byte table)
    documents: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


def resolve_precision(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16: ``bf16`` and ``bf16-master`` (bf16 weights: autocast casts the rest)
    yes, ``fp32`` no, ``auto`` where bf16 is fast."""
    return precision in ("bf16", "bf16-master") or (precision == "auto" and bf16_is_fast(device))


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def bits_per_byte(nats: float, num_bytes: float) -> float:
    """``nats / ln 2 / bytes``; NaN when there are no bytes."""
    return nats / math.log(2) / num_bytes if num_bytes else math.nan


def _note_documents(b: Batch, seen: set[int]) -> None:
    """Add the documents with at least one scored position (loader label not ``-100``) in ``b`` to ``seen``."""
    seen.update(b.doc_ids[b.labels != IGNORE_INDEX].unique().tolist())


def _noting_documents(batches: Iterable[Batch], seen: set[int]) -> Iterator[Batch]:
    for b in batches:
        _note_documents(b, seen)
        yield b


@torch.no_grad()
def evaluate(
    model: Transformer,
    batches: Iterable[Batch],
    label_names: dict[str, list[str]],
    bf16: bool = False,
    token_bytes_V: torch.Tensor | None = None,
) -> EvalResult:
    """Token-weighted validation loss, per-label-value losses and expert loads; with ``token_bytes_V``
    (``[V]`` UTF-8 bytes per token id, :func:`moelab.objectives.metrics.token_bytes`) also bits per byte
    overall and per label value. Sums are fp64 over all batches, divided once at the end. ``batches`` is
    read once, so a generator works (``moelab eval`` streams a whole corpus that way)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tb_V = token_bytes_V.to(device) if token_bytes_V is not None else None
    total, count, total_bytes = 0.0, 0, 0.0
    # label name → [nats, tokens, bytes] per value id: fp64 sums on the CPU (bincount, exact and deterministic)
    sums = {k: torch.zeros(3, len(v), dtype=torch.float64) for k, v in label_names.items()}
    routing = RoutingStats({})  # summed over batches
    has_moe = bool(model.moe_layers)
    seen: set[int] = set()
    for b in batches:
        _note_documents(b, seen)
        with autocast(device, bf16):
            out = model(b.input_ids.to(device), return_routing=has_moe)
        V = out.logits.shape[-1]
        labels = b.labels.to(device)
        nll = F.cross_entropy(out.logits.float().view(-1, V), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="none")
        mask = labels.view(-1) != IGNORE_INDEX
        nll_N = nll[mask].double().cpu()
        total += float(nll_N.sum())
        count += int(nll_N.numel())
        bytes_N = None
        if tb_V is not None:
            total_bytes += byte_sums(labels, tb_V)["bytes"]
            bytes_N = tb_V[labels.view(-1)[mask]].double().cpu()
        mask_cpu = mask.cpu()
        for name, ids_BS in b.label_ids.items():
            acc = sums[name]
            ids_N = ids_BS.reshape(-1).cpu()[mask_cpu]
            acc[0] += torch.bincount(ids_N, weights=nll_N, minlength=acc.shape[1])
            acc[1] += torch.bincount(ids_N, minlength=acc.shape[1]).double()
            if bytes_N is not None:
                acc[2] += torch.bincount(ids_N, weights=bytes_N, minlength=acc.shape[1])
        if has_moe:
            routing = routing + RoutingStats.from_routing(out.routing)
    model.train(was_training)
    loss_by: dict[str, dict[str, float]] = {}
    bpb_by: dict[str, dict[str, float]] = {}
    tokens_by: dict[str, dict[str, int]] = {}
    for name, acc in sums.items():
        nats, toks, nbytes = acc.cpu().tolist()
        present = [v for v in range(len(toks)) if toks[v] > 0]
        loss_by[name] = {label_names[name][v]: nats[v] / toks[v] for v in present}
        tokens_by[name] = {label_names[name][v]: int(toks[v]) for v in present}
        if tb_V is not None:
            bpb_by[name] = {label_names[name][v]: bits_per_byte(nats[v], nbytes[v]) for v in present}
    return EvalResult(
        loss=total / max(count, 1),
        tokens=count,
        loss_by=loss_by,
        expert_load=routing.load_shares(),
        bpb=bits_per_byte(total, total_bytes) if tb_V is not None else None,
        bpb_by=bpb_by,
        tokens_by=tokens_by,
        num_bytes=int(total_bytes) if tb_V is not None else None,
        documents=len(seen),
    )


def evaluate_with_objective(
    model, batches: Iterable[Batch], objective, tokenizer, bf16: bool = False, token_bytes_V: torch.Tensor | None = None
) -> EvalResult:
    """:func:`evaluate` for a non-causal objective: its loss, target count and own metrics (``bpb`` where
    the objective counts bytes of its targets: prefix; not mlm or span)."""
    device = next(model.parameters()).device
    seen: set[int] = set()
    batches = _noting_documents(batches, seen)
    metrics, loads = objective_step.evaluate_objective(
        model, batches, objective, tokenizer, lambda: autocast(device, bf16), token_bytes_V
    )
    return EvalResult(
        loss=metrics["loss"],
        tokens=int(metrics["tokens"]),
        expert_load=loads,
        objective=objective.name,
        metrics=metrics,
        bpb=metrics.get("bpb"),
        documents=len(seen),
    )
