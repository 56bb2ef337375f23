"""Dense twins of an MoE configuration, and parameter counts.

A twin keeps everything but the MoE layers, which become dense FFNs of a chosen hidden size:
- ``iso_active``: hidden = K·F + S (S = shared experts' total hidden): the same active
  parameters and the same FFN FLOPs per token as the MoE, router aside.
- ``iso_total``: hidden = E·F + S: the same total parameters, router aside.
- ``iso_flop``: iso-active plus the router's matmul (2·D·E FLOPs per token) folded into the
  hidden size: the same forward FLOPs per token, rounded to the nearest integer hidden size.

Layers that were already dense keep their size (``layer_ffn_hidden`` is set when they differ).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from moelab.config import ConfigError, ModelConfig
from moelab.moe.layer import MoELayer
from moelab.nn.activations import up_multiplier

TWIN_KINDS = ("iso_active", "iso_total", "iso_flop")


def twin_hidden(cfg: ModelConfig, kind: str) -> int:
    """Dense FFN hidden size that stands in for each MoE layer of ``cfg``."""
    moe = cfg.moe
    if moe is None:
        raise ConfigError("dense_twin needs an MoE config: model.moe is null")
    shared = moe.num_shared_experts * moe.shared_expert_hidden
    if kind == "iso_active":
        return moe.top_k * moe.expert_hidden + shared
    if kind == "iso_total":
        return moe.num_experts * moe.expert_hidden + shared
    if kind == "iso_flop":
        # Dense FFN FLOPs per token: 2·(m+1)·D·h; router: 2·D·E → h grows by E/(m+1).
        m = up_multiplier(cfg.activation)
        return moe.top_k * moe.expert_hidden + shared + round(moe.num_experts / (m + 1))
    raise ConfigError(f"unknown twin kind {kind!r}: expected one of {', '.join(map(repr, TWIN_KINDS))}")


def dense_twin(cfg: ModelConfig, kind: str = "iso_active") -> ModelConfig:
    """The dense config that matches ``cfg`` by active parameters, total parameters or FLOPs."""
    hidden = twin_hidden(cfg, kind)
    per_layer = tuple(hidden if cfg.is_moe_layer(i) else cfg.ffn_hidden_at(i) for i in range(cfg.n_layers))
    if len(set(per_layer)) == 1:
        return replace(cfg, moe=None, ffn_hidden=hidden, layer_ffn_hidden=())
    return replace(cfg, moe=None, ffn_hidden=hidden, layer_ffn_hidden=per_layer)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts.

    ``total`` and ``active`` (used per token) exclude the embedding table, which is reported in
    ``embedding``; a tied LM head is the embedding and is not counted again, an untied one
    counts in ``total`` and ``active``. ``router`` is the part of ``active`` spent on router
    weights, which a dense twin lacks: an iso-active twin has ``active == moe.active - moe.router``.
    """

    total: int
    active: int
    embedding: int
    router: int

    @property
    def total_with_embedding(self) -> int:
        return self.total + self.embedding


def count_params(model: nn.Module) -> ParamCount:
    """Count total and per-token active parameters of a moelab model."""
    seen: set[int] = set()
    total = active = embedding = router = 0

    def unseen(p: nn.Parameter) -> bool:
        if id(p) in seen:
            return False
        seen.add(id(p))
        return True

    embed = getattr(model, "embed", None)
    if isinstance(embed, nn.Embedding):
        for p in embed.parameters():
            if unseen(p):
                embedding += p.numel()
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        E, K = module.cfg.num_experts, module.cfg.top_k
        for p in module.experts.parameters():
            if unseen(p):
                total += p.numel()
                active += p.numel() // E * K
        for p in module.router.parameters():
            if unseen(p):
                total += p.numel()
                active += p.numel()
                router += p.numel()
    for p in model.parameters():
        if unseen(p):
            total += p.numel()
            active += p.numel()
    return ParamCount(total=total, active=active, embedding=embedding, router=router)
