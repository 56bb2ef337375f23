"""The transformer: one block design, dense or MoE per layer, three mask kinds.

Pre-norm blocks (RMSNorm or LayerNorm), attention with RoPE and grouped-query attention
through ``F.scaled_dot_product_attention``, SwiGLU/GELU feed-forward or an :class:`MoELayer`,
final norm and a (tied) LM head.

Masks, chosen by ``ModelConfig.attention``:
- ``causal``: position i sees j ≤ i (GPT).
- ``bidirectional``: every position sees every other (BERT-style encoder).
- ``prefix``: bidirectional inside a per-sample prefix of length ``prefix_len[b]``, causal after it.

Legend: B batch, S query length, L key length (S plus cached tokens), D model dim, H heads,
G key/value heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import IGNORE_INDEX, ModelConfig
from moelab.model.memory_guard import require_fits
from moelab.model.mla import MLAAttention
from moelab.model.rope import RotaryEmbedding, apply_rope
from moelab.moe.decision import RoutingDecision
from moelab.moe.layer import MoELayer, MoEOutput
from moelab.nn.ffn import DenseMLP


class LayerCache(Protocol):
    """Per-layer key/value cache used by :class:`Attention` (see ``moelab.model.kv_cache``)."""

    def update(self, k_BGSDh: Tensor, v_BGSDh: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys/values and return all of them, ``[B, G, L, Dh]``."""
        ...


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def build_attention_mask(
    kind: str,
    query_pos_BS: Tensor,
    key_pos_BL: Tensor,
    key_valid_BL: Tensor | None,
    prefix_len_B: Tensor | None,
) -> Tensor | None:
    """Boolean mask ``[B, 1, S, L]`` (True = may attend), or None when nothing is masked.

    Positions are absolute, so the same function serves full passes and cached decoding.
    Every query may always see its own key, so padded rows never become all-masked (NaN).
    """
    q = query_pos_BS.unsqueeze(-1)  # [B, S, 1]
    k = key_pos_BL.unsqueeze(-2)  # [B, 1, L]
    if kind == "bidirectional":
        allowed = torch.ones(q.shape[0], q.shape[1], k.shape[-1], dtype=torch.bool, device=q.device)
    else:
        allowed = k <= q
        if kind == "prefix":
            if prefix_len_B is None:
                raise ValueError("attention='prefix' needs prefix_len (one prefix length per sample)")
            allowed = allowed | (k < prefix_len_B.view(-1, 1, 1))
    if key_valid_BL is not None:
        allowed = allowed & key_valid_BL.bool().unsqueeze(-2)
    allowed = allowed | (k == q)
    return allowed.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention with RoPE and grouped-query attention (G key/value heads).

    Options for imported families: q/k/v and output biases (Qwen2, GPT-2), RMSNorm on queries
    and keys per head (``qk_norm='head'``, Qwen3) or over the whole projection (``'proj'``,
    OLMoE), and no RoPE when positions are learned (GPT-2: ``rope`` is None).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(cfg.head_dim if per_head else cfg.n_heads * cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim if per_head else cfg.n_kv_heads * cfg.head_dim, eps=cfg.norm_eps)

    def forward(
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask_B1SL: Tensor | None,
        is_causal: bool,
        cache: LayerCache | None = None,
    ) -> Tensor:
        q, k, v = self.queries_keys_values(x_BSD, rope, cache)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask_B1SL,
            is_causal=is_causal and mask_B1SL is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.output(out)

    def queries_keys_values(
        self, x_BSD: Tensor, rope: tuple[Tensor, Tensor] | None, cache: LayerCache | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Projected, normed and rotated ``q [B, H, S, hd]``, and ``k, v [B, G, L, hd]`` with the
        cache's earlier positions in front (L = S without a cache). Split from :meth:`forward` so a
        decoder can run its own attention between this and :meth:`output`."""
        B, S, _ = x_BSD.shape
        q, k = self.q_proj(x_BSD), self.k_proj(x_BSD)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        return q, k, v

    def output(self, out_BHSd: Tensor) -> Tensor:
        """The heads' outputs ``[B, H, S, hd]`` → ``[B, S, D]`` through the output projection."""
        B, _, S, _ = out_BHSd.shape
        return self.o_proj(out_BHSd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``+ ffn(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = make_norm(cfg)
        if cfg.mla is not None:
            self.attn: nn.Module = MLAAttention(cfg)
        else:
            self.attn = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn: nn.Module
        if self.is_moe:
            assert cfg.moe is not None
            self.ffn = MoELayer(cfg.d_model, cfg.moe, cfg.activation)
        else:
            self.ffn = DenseMLP(
                cfg.d_model, cfg.ffn_hidden_at(layer), cfg.activation, bias=cfg.mlp_bias, gelu_approx=cfg.gelu_approx
            )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask_B1SL: Tensor | None,
        is_causal: bool,
        token_ids_BS: Tensor,
        token_mask_BS: Tensor | None,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, MoEOutput | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), rope, mask_B1SL, is_causal, cache))
        return self.ffn_residual(x_BSD, token_ids_BS, token_mask_BS)

    def ffn_residual(
        self, x_BSD: Tensor, token_ids_BS: Tensor, token_mask_BS: Tensor | None
    ) -> tuple[Tensor, MoEOutput | None]:
        """``x + ffn(norm(x))`` (dense FFN or MoE layer), and what the MoE layer reported (None when dense)."""
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            moe_out = self.ffn(h_BSD, token_ids_BS, token_mask_BS)
            return x_BSD + self.drop(moe_out.y), moe_out
        return x_BSD + self.drop(self.ffn(h_BSD)), None



@dataclass
class ModelOutput:
    """What :meth:`Transformer.forward` returns.

    ``loss`` is the LM cross-entropy over labelled positions; ``aux_loss`` the weighted sum of
    router losses (each averaged over MoE layers, then times its coefficient): train on
    ``total_loss``. ``aux`` holds each unweighted loss averaged over MoE layers and
    ``aux_by_layer`` the per-layer values; ``routing`` maps layer index → RoutingDecision when
    ``return_routing=True``.
    """

    logits: Tensor
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    aux_by_layer: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    routing: dict[int, RoutingDecision] | None = None

    @property
    def total_loss(self) -> Tensor:
        if self.loss is None:
            raise ValueError("no LM loss: call the model with labels=...")
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss



@torch.no_grad()
def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) for every matrix; output projections scaled by 1/sqrt(2·n_layers) (GPT-2);
    norm weights 1, biases 0. Shared by every moelab model so they start alike."""
    out_std = std / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "w_down.weight", "experts.w_down")):
            p.normal_(0.0, out_std)
        else:
            p.normal_(0.0, std)

class Transformer(nn.Module):
    """Decoder, encoder or prefix-LM transformer with dense or MoE feed-forward layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        require_fits(cfg)  # refuse a model bigger than free memory before allocating it
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.rope_dim, cfg.rope_theta)
        if cfg.positions == "learned":  # GPT-2: absolute positions, no RoPE
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.init_std, self.cfg.n_layers)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]  # type: ignore[misc]

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        prefix_len: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: list[LayerCache] | None = None,
        past_mask: Tensor | None = None,
        return_routing: bool = False,
    ) -> ModelOutput:
        """Run the model.

        Args:
            input_ids: ``[B, S]`` token ids.
            labels: ``[B, S]`` target of each position (already shifted for next-token
                prediction), ``-100`` to ignore.
            prefix_len: ``[B]`` prefix lengths (``attention='prefix'`` only).
            attention_mask: ``[B, S]`` 1 for real tokens, 0 for padding; padding is not attended
                to and is ignored by router losses.
            position_ids: ``[B, S]`` absolute positions; default ``past + arange(S)``.
            cache: one :class:`LayerCache` per layer for incremental decoding.
            past_mask: ``[B, P]`` validity of the P cached keys (with ``cache``).
            return_routing: put every MoE layer's RoutingDecision in the output.
        """
        B, S = input_ids.shape
        cfg = self.cfg
        past = 0 if past_mask is None else past_mask.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        key_valid = attention_mask
        if past_mask is not None:
            cur = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            key_valid = torch.cat([past_mask.to(cur.dtype), cur], dim=1)
        key_pos = torch.arange(past + S, device=input_ids.device).expand(B, past + S)
        query_pos = key_pos[:, past:]
        simple_causal = cfg.attention == "causal" and key_valid is None and past == 0
        if (cfg.attention == "bidirectional" and key_valid is None) or simple_causal:
            mask = None
        else:
            mask = build_attention_mask(cfg.attention, query_pos, key_pos, key_valid, prefix_len)
        rope = self.rope(position_ids) if cfg.positions == "rope" else None

        x = self.embed(input_ids)
        if cfg.positions == "learned":
            if int(position_ids.max()) >= cfg.max_seq_len:
                raise ValueError(f"position {int(position_ids.max())} >= model.max_seq_len={cfg.max_seq_len}")
            x = x + self.pos_embed(position_ids)
        x = self.drop(x)
        aux_by_layer: dict[int, dict[str, Tensor]] = {}
        routing: dict[int, RoutingDecision] = {}
        weights: dict[str, float] = {}
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x, moe_out = block(x, rope, mask, cfg.attention == "causal", input_ids, attention_mask, layer_cache)
            if moe_out is not None:
                aux_by_layer[i] = moe_out.losses
                weights.update(block.ffn.loss_weights())
                if return_routing:
                    routing[i] = moe_out.decision
        logits = self.lm_head(self.norm(x))

        out = ModelOutput(logits=logits, aux_by_layer=aux_by_layer, routing=routing if return_routing else None)
        if aux_by_layer:
            names = next(iter(aux_by_layer.values())).keys()
            out.aux = {n: torch.stack([v[n] for v in aux_by_layer.values()]).mean() for n in names}
            out.aux_loss = sum(weights[n] * out.aux[n] for n in names)  # type: ignore[assignment]
        if labels is not None:
            out.loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return out
