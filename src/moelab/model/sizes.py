"""How big a model is, from its config alone: parameters, and the bytes of training state and
activations. Nothing is built or allocated.

Why: counting by building (``count_params(Transformer(cfg))``) allocates the model to learn its
size: 9.9 GB of RSS for ``moe.num_experts=100000`` and an allocation traceback for 10⁸ experts.
The counts here are arithmetic on the config, so the memory guard
(:mod:`moelab.model.memory_guard`) can refuse an impossible model before a byte is allocated and
``moelab config`` can count any config.

Decoder-only counts are :mod:`moelab.calc`'s (``arch_from_config`` → ``count``); this module adds
the encoder–decoder (two stacks, one shared embedding, cross-attention, T5 relative biases). Both
equal the built model's parameter count over many configs (tests/model/test_sizes.py), the
independent source every formula here is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from moelab.calc import arch_from_config, count
from moelab.config import ModelConfig


class EncoderDecoderSizes(Protocol):
    """What the counts read of an :class:`~moelab.model.encoder_decoder.EncoderDecoderConfig` (matched by
    shape: this module sits below the builders, which import it)."""

    encoder: ModelConfig
    decoder: ModelConfig
    position: str
    relative_buckets: int


AnyModelConfig = ModelConfig | EncoderDecoderSizes

if TYPE_CHECKING:
    from moelab.model.twins import ParamCount


def is_encoder_decoder(cfg: AnyModelConfig) -> bool:
    """An :class:`~moelab.model.encoder_decoder.EncoderDecoderConfig` (checked by shape, not by
    import: this module is imported by the builders themselves)."""
    return hasattr(cfg, "encoder") and hasattr(cfg, "decoder")


def _norm_params(cfg: ModelConfig) -> int:
    """Weights of one norm over d_model: RMSNorm a scale, LayerNorm a scale and a bias."""
    return cfg.d_model * (1 if cfg.norm == "rmsnorm" else 2)


def cross_attention_params(cfg: ModelConfig) -> int:
    """One decoder layer's cross-attention (q, k, v, o without biases) and its pre-norm."""
    d, hd = cfg.d_model, cfg.head_dim
    return d * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * hd + _norm_params(cfg)


def encoder_decoder_params(cfg: EncoderDecoderSizes) -> int:
    """Unique parameters of ``EncoderDecoder(cfg)``: each stack as calc counts a decoder-only model
    (blocks, final norm) with one embedding table between them, no learned position table (the
    encoder–decoder has none), the LM head once unless tied, cross-attention in every decoder
    layer and, with ``position='t5_relative'``, one bias table (buckets × heads) per stack."""
    enc, dec = cfg.encoder, cfg.decoder
    encoder = count(replace(arch_from_config(enc), tie_embeddings=True, position_rows=0))  # the embedding, no head
    decoder = count(replace(arch_from_config(dec), position_rows=0))
    total = encoder.total + decoder.total - decoder.embedding
    total += dec.n_layers * cross_attention_params(dec)
    if cfg.position == "t5_relative":
        total += cfg.relative_buckets * (enc.n_heads + dec.n_heads)
    return total


def parameter_count(cfg: AnyModelConfig) -> int:
    """Unique parameters of the model ``cfg`` builds (a tied head counted once)."""
    if is_encoder_decoder(cfg):
        return encoder_decoder_params(cfg)  # type: ignore[arg-type]
    return count(arch_from_config(cfg)).total  # type: ignore[arg-type]


def config_param_count(cfg: ModelConfig) -> ParamCount:
    """What ``count_params(Transformer(cfg))`` reports, without building the model.

    ``count_params`` leaves the input embedding out of ``total`` and ``active``; calc counts it in
    both, so it is subtracted here.
    """
    from moelab.model.twins import ParamCount

    p = count(arch_from_config(cfg))
    return ParamCount(total=p.total - p.embedding, active=p.active - p.embedding, embedding=p.embedding, router=p.router)


def activation_values_per_token(cfg: ModelConfig) -> int:
    """A lower bound on the numbers backward keeps per token of one training micro-batch.

    Counted, per layer: the inputs of both norms and of every linear layer (the normed states,
    attention's output), q, k and v (kept by attention's backward), and the FFN's up projection
    and activation: ``(m + 1)·F`` for a dense layer (m = 2 gated, 1 otherwise), ``k`` routed copies
    of the input and of that hidden state plus the shared experts and the fp32 router logits for
    an MoE layer. Then the final norm and the logits. Not counted: softmax statistics, dropout
    masks, the router's bookkeeping and allocator slack. A lower bound by design: the guard must
    never refuse a run that would have fitted.
    """
    a = arch_from_config(cfg)
    heads_kv = a.n_heads if a.attention == "mla" else a.n_kv_heads  # MLA expands k, v per head
    attention = 4 * a.d_model + a.n_heads * (a.qk_dim + a.v_dim) + heads_kv * (a.qk_dim + a.v_dim)
    m = a.mult - 1  # rows of w_up per hidden unit
    hidden = a.dense_hidden or (a.ffn_hidden,) * a.dense_layers
    total = a.n_layers * attention + sum((m + 1) * h for h in hidden)
    if a.is_moe:
        routed = a.top_k * (a.d_model + (m + 1) * a.expert_hidden)
        shared = (m + 1) * a.num_shared_experts * a.shared_hidden
        total += a.moe_layers * (routed + shared + a.num_experts)
    return total + 2 * a.d_model + a.vocab_size


@dataclass(frozen=True)
class TrainingBytes:
    """Bytes one training process needs at least, by part (see :func:`training_bytes`)."""

    params: int
    weights: int  # parameters (fp32, or a LoRA run's frozen base in its dtype, plus fp32 adapters)
    gradients: int
    optimizer: int  # AdamW moments
    activations: int  # lower bound for one micro-batch (activation_values_per_token)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def training_bytes(
    cfg: AnyModelConfig,
    tokens: int,
    activation_bytes: int = 4,
    weight_bytes: int = 4,
    adapters: int = 0,
    trainable: int | None = None,
) -> TrainingBytes:
    """At least what training ``cfg`` with AdamW on micro-batches of ``tokens`` tokens holds:
    weights (``weight_bytes`` each: 4, or 2 for a LoRA run's bf16 base, plus ``adapters`` fp32
    LoRA parameters), fp32 gradients and two fp32 moments for each of the ``trainable``
    parameters (default: all), and activations of ``activation_bytes`` each (4 in fp32, 2 under
    bf16 autocast). An encoder–decoder's activations are those of its two stacks (the encoder's
    at the same token count)."""
    params = parameter_count(cfg)
    trainable = params if trainable is None else trainable
    stacks = [cfg.encoder, cfg.decoder] if is_encoder_decoder(cfg) else [cfg]  # type: ignore[union-attr]
    values = sum(activation_values_per_token(c) for c in stacks)
    return TrainingBytes(
        params=params,
        weights=weight_bytes * params + 4 * adapters,
        gradients=4 * trainable,
        optimizer=8 * trainable,
        activations=values * tokens * activation_bytes,
    )


__all__ = [
    "TrainingBytes",
    "activation_values_per_token",
    "config_param_count",
    "cross_attention_params",
    "encoder_decoder_params",
    "is_encoder_decoder",
    "parameter_count",
    "training_bytes",
]
