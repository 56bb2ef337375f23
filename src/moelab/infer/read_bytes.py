"""The bytes one decode step reads per token, from the decode copy itself: the bandwidth bound's numerator.

Why from the model and not from ``moelab calc``'s formula: the decode copy stores each weight in the
layout its kernel reads (bf16, packed, int8, int4 with per-group scales), and those bytes are what a step
streams from memory. Per token, a step reads every weight outside the experts once per batch (the LM
head whole, the input embedding one row per token), the experts each row chose (at batch 1: K of E per
MoE layer; at batch B the distinct experts of the batch, estimated as E·(1 − (1 − K/E)^B), exact for
uniform routing), and each row's KV cache up to its position.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moelab.infer.packed import module_packed_bytes
from moelab.moe.layer import MoELayer


def _own_bytes(mod: nn.Module, seen: set[int] | None = None) -> int:
    """Bytes ``mod`` itself holds (parameters, buffers, packed weights); a tensor already in ``seen`` (a tied
    weight met under another module) is not counted again."""
    total = module_packed_bytes(mod)
    for t in (*mod._parameters.values(), *mod._buffers.values()):
        if t is None:
            continue
        ptr = t.untyped_storage().data_ptr()
        if seen is not None:
            if ptr in seen:
                continue
            seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class StepBytes:
    """Bytes a decode step reads, by part (``per_token``: what one token of a batch-``batch`` step costs)."""

    batch: int
    dense: float  # weights outside the routed experts, read once per step (input embedding: its rows)
    experts: float  # the routed experts' weights the step's rows choose (expected distinct experts)
    kv: float  # KV cache read per step at the context given

    @property
    def per_token(self) -> float:
        return (self.dense + self.experts + self.kv) / self.batch


def expected_distinct(num_experts: int, top_k: int, rows: int) -> float:
    """Distinct experts ``rows`` tokens choose when each picks ``top_k`` of ``num_experts`` uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** rows)


def step_bytes(model: nn.Module, batch: int, context: int, kv_bytes_per_position: float) -> StepBytes:
    """What one decode step of ``batch`` rows at ``context`` cached positions reads from ``model``'s storage
    (a decode copy: cast, packed or quantized); ``kv_bytes_per_position`` is the whole model's cache bytes
    for one position of one row."""
    experts_bytes, dense_bytes = 0.0, 0.0
    embed = getattr(model, "embed", None)
    head = getattr(model, "lm_head", None)
    tied = embed is not None and head is not None and getattr(head, "weight", None) is getattr(embed, "weight", None)
    inside_experts: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, MoELayer):  # its experts module may be packed, quantized or offloaded: its bytes count
            experts = layer.experts
            per_expert = sum(_own_bytes(m) for m in experts.modules()) / layer.cfg.num_experts
            experts_bytes += per_expert * expected_distinct(layer.cfg.num_experts, layer.cfg.top_k, batch)
            inside_experts.update(id(m) for m in experts.modules())
    seen: set[int] = set()
    for mod in model.modules():
        if id(mod) in inside_experts or (mod is embed and tied):  # a tied embedding is read whole as the head
            continue
        if mod is embed:
            dense_bytes += _own_bytes(mod, seen) / embed.num_embeddings * batch  # type: ignore[union-attr]
            continue
        dense_bytes += _own_bytes(mod, seen)
    return StepBytes(batch, dense_bytes, experts_bytes, kv_bytes_per_position * context * batch)


__all__ = ["StepBytes", "expected_distinct", "step_bytes"]
