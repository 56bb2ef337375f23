"""Multi-head latent attention (MLA; DeepSeek-AI 2024, DeepSeek-V2 §2.1, reused in V3).

Keys and values come from one low-rank latent per token instead of per-head projections:

    c_kv = RMSNorm(x · W_DKV)                      [B, S, r]     (r = kv_lora_rank)
    k_rope = RoPE(x · W_KR)                        [B, 1, S, dr]  one RoPE key shared by all heads
    [k_nope | v] = c_kv · W_UKV                    [B, H, L, dn + dv]
    q = x · W_Q  or  RMSNorm(x · W_DQ) · W_UQ      [B, H, S, dn + dr]   (q_lora_rank bottleneck)
    k = [k_nope | k_rope],  q = [q_nope | RoPE(q_rope)],  softmax(q·kᵀ / sqrt(dn + dr)) · v

RoPE is *decoupled*: it touches only the dr extra dimensions, so the nope part of the key can be
re-expanded from the cached latent at any time. The KV cache therefore stores ``c_kv`` and
``k_rope`` only: r + dr numbers per token and layer instead of 2·G·Dh for GQA (DeepSeek-V3:
512 + 64 = 576 against 2·128·128 = 32768 for its 128 heads without compression).

Parameter names follow DeepSeek's (``q_a_proj``, ``kv_a_proj``, ``kv_b_proj``, …) so the
Hugging Face mapping is one name per tensor. RoPE uses the rotate-half layout; DeepSeek's
interleaved checkpoints are permuted at import (``moelab.convert``).

Legend: B batch, S new tokens, L keys (S plus cached), D model dim, H heads, r kv latent rank,
dn / dr / dv nope / rope / value head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import ModelConfig
from moelab.model.rope import apply_rope


class MLAAttention(nn.Module):
    """Multi-head latent attention; same call signature as :class:`moelab.model.transformer.Attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.mla is not None
        m = cfg.mla
        self._apply_rope = apply_rope
        self.n_heads = H = cfg.n_heads
        self.nope, self.rope_dim, self.v_dim, self.rank = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        )
        self.dropout = cfg.dropout
        qk = m.qk_head_dim
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.d_model, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.d_model, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = nn.RMSNorm(m.q_lora_rank, eps=m.latent_norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj = nn.Linear(cfg.d_model, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.qkv_bias)
        self.kv_a_norm = nn.RMSNorm(m.kv_lora_rank, eps=m.latent_norm_eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * m.v_head_dim, cfg.d_model, bias=cfg.out_bias)

    def forward(
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask_B1SL: Tensor | None,
        is_causal: bool,
        cache=None,
    ) -> Tensor:
        assert rope is not None, "MLA needs RoPE positions"
        B, S, _ = x_BSD.shape
        H = self.n_heads
        q = (
            self.q_proj(x_BSD)
            if hasattr(self, "q_proj")
            else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        )
        q_nope, q_rot = (
            q.view(B, S, H, self.nope + self.rope_dim).transpose(1, 2).split([self.nope, self.rope_dim], -1)
        )
        latent_BSr, k_rot_BSd = self.kv_a_proj(x_BSD).split([self.rank, self.rope_dim], dim=-1)
        latent_B1Sr = self.kv_a_norm(latent_BSr).unsqueeze(1)
        cos, sin = rope
        q_rot = self._apply_rope(q_rot, cos, sin)
        k_rot_B1Sd = self._apply_rope(k_rot_BSd.unsqueeze(1), cos, sin)
        if cache is not None:  # the cache holds the latent and the RoPE key, never per-head keys
            latent_B1Sr, k_rot_B1Sd = cache.update(latent_B1Sr, k_rot_B1Sd)
        L = latent_B1Sr.shape[2]
        kv = self.kv_b_proj(latent_B1Sr.squeeze(1)).view(B, L, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot_B1Sd.expand(B, H, L, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask_B1SL,
            is_causal=is_causal and mask_B1SL is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * self.v_dim))
