"""Encoder–decoder transformer (T5 / Switch Transformer layout) from the decoder-only blocks.

- Encoder: :class:`~moelab.model.transformer.Block` layers with the bidirectional mask (padding
  hidden through ``attention_mask``), then a final norm.
- Decoder: :class:`DecoderBlock` = the same block plus cross-attention between self-attention
  and the feed-forward: ``x + self_attn(norm x)`` (causal, RoPE), ``+ cross_attn(norm x, enc)``,
  ``+ ffn(norm x)``.
- One embedding table shared by encoder, decoder and (``decoder.tie_embeddings``) the LM head,
  as in T5. By default the tied head is not rescaled, matching the decoder-only
  :class:`~moelab.model.transformer.Transformer` (same init, same logit scale);
  ``scale_decoder_output=True`` multiplies the final decoder states by d_model^-0.5 as T5 does.
- Positions: RoPE in both self-attentions (default), or ``position='t5_relative'``: T5's bucketed
  relative position bias (one table per stack, shared by its layers) and no RoPE
  (:mod:`moelab.model.relative_position`). Cross-attention has neither.
- Each stack is a :class:`ModelConfig`; its ``moe`` (None = dense) and placement choose MoE per
  stack and per layer with the same :class:`MoELayer` (routers, capacity, dispatch, losses) as
  the decoder-only model. The dense twin is :meth:`EncoderDecoderConfig.dense_twin`.

Layers are numbered globally in outputs (``aux_by_layer``, ``routing``): encoder layers
``0 … Ne-1``, decoder layers ``Ne … Ne+Nd-1``; :meth:`EncoderDecoder.layer_name` spells them.

Generation (:meth:`EncoderDecoder.generate`) runs the encoder once, computes each decoder
layer's cross-attention keys/values once, and decodes with a self-attention KV cache.

Legend: B batch, L encoder length, S decoder length, D model dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import ConfigError, ModelConfig
from moelab.model.cross_attention import CrossAttention, encoder_key_mask
from moelab.model.kv_cache import KVCache
from moelab.model.memory_guard import require_fits
from moelab.model.relative_position import RelativePositionBias, biased_mask, identity_rope
from moelab.model.transformer import (
    IGNORE_INDEX,
    Block,
    LayerCache,
    ModelOutput,
    RotaryEmbedding,
    build_attention_mask,
    init_weights,
    make_norm,
)
from moelab.moe.decision import RoutingDecision
from moelab.moe.layer import MoEOutput

POSITIONS = ("rope", "t5_relative")


ENCODER_DECODER_SECTION = "encoder_decoder"  # config.yaml section of an EncoderDecoder (instead of model:)


def encoder_decoder_section(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The :class:`EncoderDecoderConfig` part of a parsed ``config.yaml``: its ``encoder_decoder:`` section
    (moelab folders, runs), or the whole mapping when it is one (``save_checkpoint`` of an
    EncoderDecoderConfig); None for a decoder-only (``model:``) config."""
    if ENCODER_DECODER_SECTION in data:
        return data[ENCODER_DECODER_SECTION]
    return data if {"encoder", "decoder"} <= set(data) else None


@dataclass(frozen=True)
class EncoderDecoderConfig:
    """Two stacks sharing vocabulary and width: ``encoder`` (bidirectional), ``decoder`` (causal)."""

    encoder: ModelConfig = field(default_factory=lambda: ModelConfig(attention="bidirectional"))
    decoder: ModelConfig = field(default_factory=ModelConfig)
    position: str = "rope"  # rope | t5_relative (bucketed relative bias in self-attention, no RoPE)
    relative_buckets: int = 32  # t5_relative: buckets per stack (T5: 32)
    relative_max_distance: int = 128  # t5_relative: distances beyond this share the last bucket
    scale_decoder_output: bool = (
        False  # T5 with tied embeddings: final decoder states × d_model^-0.5 before the head
    )

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ConfigError(
                f"position = {self.position!r} is invalid: allowed {', '.join(map(repr, POSITIONS))}"
            )
        if not (isinstance(self.relative_buckets, int) and self.relative_buckets >= 4):
            raise ConfigError(
                f"relative_buckets = {self.relative_buckets!r} is invalid: must be an integer >= 4"
            )
        if not self.relative_max_distance > self.relative_buckets // 2:
            raise ConfigError(
                f"relative_max_distance = {self.relative_max_distance!r} is invalid: must exceed "
                f"relative_buckets / 2 = {self.relative_buckets // 2}"
            )
        enc, dec = self.encoder, self.decoder
        for name in ("vocab_size", "d_model"):
            if getattr(enc, name) != getattr(dec, name):
                raise ConfigError(
                    f"decoder.{name} = {getattr(dec, name)} is invalid: the stacks share one embedding, so it "
                    f"must equal encoder.{name} = {getattr(enc, name)}"
                )
        if enc.attention != "bidirectional":
            raise ConfigError(f"encoder.attention = {enc.attention!r} is invalid: allowed 'bidirectional'")
        if dec.attention != "causal":
            raise ConfigError(f"decoder.attention = {dec.attention!r} is invalid: allowed 'causal'")

    @classmethod
    def from_model(
        cls, cfg: ModelConfig, decoder_layers: int | None = None, **options
    ) -> EncoderDecoderConfig:
        """Both stacks from one config (T5: same sizes; ``decoder_layers`` defaults to ``cfg.n_layers``).

        ``options`` are the other fields (``position``, ``relative_buckets``, …).
        """
        dec = replace(cfg, attention="causal", n_layers=decoder_layers or cfg.n_layers)
        return cls(encoder=replace(cfg, attention="bidirectional"), decoder=dec, **options)

    def dense_twin(self, kind: str = "iso_active") -> EncoderDecoderConfig:
        """Each MoE stack replaced by its dense twin (``moelab.model.twins.dense_twin``)."""
        from moelab.model.twins import dense_twin

        def twin(c: ModelConfig) -> ModelConfig:
            return dense_twin(c, kind) if c.moe is not None else c

        return replace(self, encoder=twin(self.encoder), decoder=twin(self.decoder))

    @property
    def n_layers(self) -> int:
        return self.encoder.n_layers + self.decoder.n_layers


class DecoderBlock(Block):
    """:class:`Block` with cross-attention to the encoder between self-attention and the FFN."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.cross_norm = make_norm(cfg)
        self.cross_attn = CrossAttention(cfg)

    def forward(  # type: ignore[override]
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor],
        mask_B1SS: Tensor | None,
        cross_kv: tuple[Tensor, Tensor],
        cross_mask_B11L: Tensor | None,
        token_ids_BS: Tensor,
        token_mask_BS: Tensor | None,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, MoEOutput | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), rope, mask_B1SS, True, cache))
        x_BSD = x_BSD + self.drop(self.cross_attn(self.cross_norm(x_BSD), cross_kv, cross_mask_B11L))
        return self.ffn_residual(x_BSD, token_ids_BS, token_mask_BS)


@dataclass
class EncoderOutput:
    """The encoder's final states and what its MoE layers reported (reused across decoding)."""

    hidden: Tensor  # [B, L, D], after the encoder's final norm
    attention_mask: Tensor | None  # [B, L] 1 = real token
    aux_by_layer: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    loss_weights: dict[int, dict[str, float]] = field(default_factory=dict)  # layer → coefficients
    routing: dict[int, RoutingDecision] = field(default_factory=dict)


class EncoderDecoderCache:
    """Decoding state: a self-attention KV cache per decoder layer and the cross-attention K/V.

    ``cross`` is filled on the first decoding call from the encoder output and never again.
    """

    def __init__(self, n_decoder_layers: int) -> None:
        self.self_attn = KVCache.growing(n_decoder_layers)
        self.cross: list[tuple[Tensor, Tensor]] | None = None

    @property
    def length(self) -> int:
        return self.self_attn.length


class EncoderDecoder(nn.Module):
    """T5-style encoder–decoder with dense or MoE feed-forward layers in either stack."""

    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        require_fits(cfg)  # refuse a model bigger than free memory before allocating it
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.encoder, cfg.decoder
        self.embed = nn.Embedding(enc.vocab_size, enc.d_model)
        self.encoder_rope = RotaryEmbedding(enc.head_dim, enc.rope_theta)
        self.encoder_blocks = nn.ModuleList(Block(enc, i) for i in range(enc.n_layers))
        self.encoder_norm = make_norm(enc)
        self.decoder_rope = RotaryEmbedding(dec.head_dim, dec.rope_theta)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(dec, i) for i in range(dec.n_layers))
        self.decoder_norm = make_norm(dec)
        self.lm_head = nn.Linear(dec.d_model, dec.vocab_size, bias=False)
        self.encoder_relative: RelativePositionBias | None = None
        self.decoder_relative: RelativePositionBias | None = None
        if cfg.position == "t5_relative":
            nb, md = cfg.relative_buckets, cfg.relative_max_distance
            self.encoder_relative = RelativePositionBias(enc.n_heads, True, nb, md)
            self.decoder_relative = RelativePositionBias(dec.n_heads, False, nb, md)
        self.drop = nn.Dropout(dec.dropout)
        self.reset_parameters()
        if dec.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As :meth:`Transformer.reset_parameters`, over both stacks."""
        init_weights(self, self.cfg.decoder.init_std, self.cfg.n_layers)

    # ------------------------------------------------------------------ layers
    @property
    def blocks(self) -> list[nn.Module]:
        """All blocks in global layer order (encoder, then decoder)."""
        return [*self.encoder_blocks, *self.decoder_blocks]

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def layer_name(self, layer: int) -> str:
        """Global layer index → ``"encoder.i"`` / ``"decoder.j"``."""
        ne = len(self.encoder_blocks)
        return f"encoder.{layer}" if layer < ne else f"decoder.{layer - ne}"

    # ------------------------------------------------------------------ passes
    def encode(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, return_routing: bool = False
    ) -> EncoderOutput:
        """Run the encoder once: ``[B, L]`` ids (+ padding mask) → :class:`EncoderOutput`."""
        B, L = input_ids.shape
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        mask = (
            None
            if attention_mask is None
            else build_attention_mask("bidirectional", pos, pos, attention_mask, None)
        )
        x = self.drop(self.embed(input_ids))
        if self.encoder_relative is None:
            rope = self.encoder_rope(pos)
        else:
            rope = identity_rope(B, L, self.cfg.encoder.head_dim, x)
            mask = biased_mask(self.encoder_relative(pos[0], pos[0]).to(x.dtype), mask)
        out = EncoderOutput(hidden=x, attention_mask=attention_mask)
        for i, block in enumerate(self.encoder_blocks):
            x, moe_out = block(x, rope, mask, False, input_ids, attention_mask)
            _record(out.aux_by_layer, out.loss_weights, out.routing, i, block, moe_out, return_routing)
        out.hidden = self.encoder_norm(x)
        return out

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_out: EncoderOutput,
        decoder_attention_mask: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        return_routing: bool = False,
    ) -> tuple[Tensor, dict[int, dict[str, Tensor]], dict[int, dict[str, float]], dict[int, RoutingDecision]]:
        """Decoder pass → ``(logits [B, S, V], aux_by_layer, loss_weights, routing)``, keyed by global layer."""
        B, S = decoder_input_ids.shape
        if cache is not None and decoder_attention_mask is not None:
            raise ValueError(
                "cached decoding takes no decoder_attention_mask (decoder inputs are never padded)"
            )
        past = 0 if cache is None else cache.length
        dev = decoder_input_ids.device
        key_pos = torch.arange(past + S, device=dev).expand(B, past + S)
        query_pos = key_pos[:, past:]
        mask = None
        if past > 0 or decoder_attention_mask is not None or self.decoder_relative is not None:
            mask = build_attention_mask("causal", query_pos, key_pos, decoder_attention_mask, None)
        if self.decoder_relative is None:
            rope = self.decoder_rope(query_pos)
        else:
            rope = identity_rope(B, S, self.cfg.decoder.head_dim, decoder_input_ids)
            bias = self.decoder_relative(query_pos[0], key_pos[0]).to(self.embed.weight.dtype)
            mask = biased_mask(bias, mask)
        cross_mask = encoder_key_mask(encoder_out.attention_mask)
        if cache is not None and cache.cross is None:
            cache.cross = [blk.cross_attn.project_kv(encoder_out.hidden) for blk in self.decoder_blocks]
        x = self.drop(self.embed(decoder_input_ids))
        aux: dict[int, dict[str, Tensor]] = {}
        weights: dict[int, dict[str, float]] = {}
        routing: dict[int, RoutingDecision] = {}
        ne = len(self.encoder_blocks)
        for j, block in enumerate(self.decoder_blocks):
            kv = (
                cache.cross[j]
                if cache is not None and cache.cross is not None
                else block.cross_attn.project_kv(encoder_out.hidden)
            )
            layer_cache = None if cache is None else cache.self_attn[j]
            x, moe_out = block(
                x, rope, mask, kv, cross_mask, decoder_input_ids, decoder_attention_mask, layer_cache
            )
            _record(aux, weights, routing, ne + j, block, moe_out, return_routing)
        h = self.decoder_norm(x)
        if self.cfg.scale_decoder_output:
            h = h * self.cfg.decoder.d_model**-0.5
        return self.lm_head(h), aux, weights, routing

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_out: EncoderOutput | None = None,
        cache: EncoderDecoderCache | None = None,
        return_routing: bool = False,
    ) -> ModelOutput:
        """Full pass (teacher forcing), same output contract as the decoder-only model.

        Args:
            input_ids: ``[B, L]`` encoder ids; ``attention_mask`` ``[B, L]`` 1 = real, 0 = padding.
            decoder_input_ids: ``[B, S]`` decoder ids (targets shifted right behind a start token).
            labels: ``[B, S]`` target of each decoder position (``-100`` = ignore).
            encoder_out: reuse an :meth:`encode` result instead of running the encoder.
            cache: decode incrementally (see :meth:`generate`).
        """
        if encoder_out is None:
            encoder_out = self.encode(input_ids, attention_mask, return_routing)
        logits, aux, weights, routing = self.decode(
            decoder_input_ids, encoder_out, decoder_attention_mask, cache, return_routing
        )
        aux_by_layer = {**encoder_out.aux_by_layer, **aux}
        weights = {**encoder_out.loss_weights, **weights}
        out = ModelOutput(
            logits=logits,
            aux_by_layer=aux_by_layer,
            routing={**encoder_out.routing, **routing} if return_routing else None,
        )
        if aux_by_layer:
            # Each loss averaged over the MoE layers that report it (both stacks); a stack's own
            # coefficient weighs its layers, so stacks with different MoE configs add up correctly
            # (with one coefficient per name this is exactly the decoder-only model's formula).
            names = sorted({n for v in aux_by_layer.values() for n in v})
            out.aux = {n: torch.stack([v[n] for v in aux_by_layer.values() if n in v]).mean() for n in names}
            out.aux_loss = sum(  # type: ignore[assignment]
                torch.stack([weights[i][n] * v[n] for i, v in aux_by_layer.items() if n in v]).mean()
                for n in names
            )
        if labels is not None:
            out.loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        start_id: int,
        eos_id: int | None = None,
        attention_mask: Tensor | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Decode ``[B, ≤max_new_tokens]`` ids after ``start_id`` (greedy at temperature 0).

        The encoder runs once; each decoder layer's cross-attention K/V are computed once; the
        decoder feeds one token per step through its self-attention KV cache. Rows that emitted
        ``eos_id`` keep emitting it; decoding stops when all rows have.
        """
        B = input_ids.shape[0]
        enc = self.encode(input_ids, attention_mask)
        cache = EncoderDecoderCache(len(self.decoder_blocks))
        cur = torch.full((B, 1), start_id, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out: list[Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.decode(cur, enc, cache=cache)[0][:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
            else:
                nxt = logits.argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out.append(nxt)
            cur = nxt[:, None]
            if eos_id is not None and bool(done.all()):
                break
        return torch.stack(out, dim=1) if out else cur[:, :0]


def _record(
    aux: dict[int, dict[str, Tensor]],
    weights: dict[int, dict[str, float]],
    routing: dict[int, RoutingDecision],
    layer: int,
    block: nn.Module,
    moe_out: MoEOutput | None,
    return_routing: bool,
) -> None:
    if moe_out is None:
        return
    aux[layer] = moe_out.losses
    weights[layer] = block.ffn.loss_weights()
    if return_routing:
        routing[layer] = moe_out.decision
