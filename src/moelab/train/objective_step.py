"""A training objective inside the trainer: the model it needs, its batches, its evaluation.

Why a module of its own: the trainer's loop (accumulation, balancing, clipping, skipping bad
steps, checkpoints) is the same for every objective; what changes is what the model is, what a
packed batch becomes before the forward pass, and what evaluation reports. ``causal`` keeps
the trainer's original path exactly (the loader's next-token labels straight into the decoder);
``prefix``, ``mlm`` and ``span`` go through :meth:`Objective.prepare` (docs/objectives.md).

Randomness: masking, span and prefix sampling draw from one CPU generator per trainer, seeded
by ``train.seed`` and saved in checkpoints; evaluation uses a fixed generator so every
evaluation sees the same masks, spans and prefixes.

Legend: B batch, S block length, V vocab.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from moelab.config import ModelConfig, RunConfig
from moelab.data.loader import Batch
from moelab.data.tokenizer import Tokenizer
from moelab.moe.stats import RoutingStats
from moelab.objectives import Objective, build_objective
from moelab.objectives.metrics import add_sums, token_bytes

EVAL_SEED = 1234  # every evaluation draws the same masks/spans/prefixes


def objective_of(cfg: RunConfig) -> Objective:
    return build_objective(cfg.train.objective)


def is_plain_causal(objective: Objective) -> bool:
    """The trainer's original next-token path (no :meth:`Objective.prepare` in between)."""
    return objective.name == "causal"


def model_config_for(model_cfg: ModelConfig, objective: Objective) -> ModelConfig:
    """The single-stack config an objective trains: its attention (prefix, bidirectional) set.
    Causal runs keep the config as given; an encoder–decoder is derived from it at build time."""
    if is_plain_causal(objective) or objective.attention is None:
        return model_cfg
    return replace(model_cfg, attention=objective.attention)


def build_model(model_cfg: ModelConfig, objective: Objective) -> nn.Module:
    """A :class:`Transformer` for decoder/encoder objectives, an :class:`EncoderDecoder` with
    T5's "same sizes in both stacks" (``EncoderDecoderConfig.from_model``) for ``span``."""
    from moelab.model.transformer import Transformer

    if objective.architecture == "encoder_decoder":
        from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

        return EncoderDecoder(EncoderDecoderConfig.from_model(model_cfg))
    return Transformer(model_config_for(model_cfg, objective))


def prepare_tokenizer(tokenizer: Tokenizer, objective: Objective) -> Tokenizer:
    """Add the objective's special tokens (mask, sentinels); idempotent, ids never move."""
    return tokenizer if is_plain_causal(objective) else objective.prepare_tokenizer(tokenizer)


def forward(
    model: nn.Module,
    objective: Objective,
    batch: Batch,
    tokenizer: Tokenizer,
    generator: torch.Generator,
    device: torch.device,
    return_routing: bool,
) -> Any:
    """One micro-batch through the objective: ``ModelOutput`` with ``total_loss``."""
    if is_plain_causal(objective):
        return model(batch.input_ids.to(device), labels=batch.labels.to(device), return_routing=return_routing)
    ob = objective.prepare(batch.input_ids, batch.labels, tokenizer, generator).to(device)
    return model(**ob.model_inputs(), return_routing=return_routing)


@torch.no_grad()
def evaluate_objective(
    model: nn.Module,
    batches: list[Batch],
    objective: Objective,
    tokenizer: Tokenizer,
    autocast_ctx,
    token_bytes_V: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[int, list[float]]]:
    """The objective's metrics over ``batches`` (``summarize``: ``loss``, ``tokens`` and its own,
    e.g. ``masked_accuracy``) and the expert load per MoE layer. ``token_bytes_V`` (the tokenizer's
    :func:`token_bytes`) saves rebuilding that table on every call."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(EVAL_SEED)
    tb = token_bytes(tokenizer) if token_bytes_V is None else token_bytes_V
    sums: dict[str, float] = {}
    routing = RoutingStats({})  # summed over batches
    has_moe = bool(model.moe_layers)
    for b in batches:
        ob = objective.prepare(b.input_ids, b.labels, tokenizer, gen).to(device)
        with autocast_ctx():
            out = model(**ob.model_inputs(), return_routing=has_moe)
        add_sums(sums, objective.metric_sums(out.logits.float(), ob, tb.to(device) if tb is not None else None))
        if has_moe:
            routing = routing + RoutingStats.from_routing(out.routing)
    model.train(was_training)
    expert_load = routing.load_shares()
    return objective.summarize(sums), expert_load
