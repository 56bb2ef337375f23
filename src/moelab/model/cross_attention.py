"""Cross-attention for the encoder–decoder: decoder queries, encoder keys and values.

No rotary embedding: query and key positions belong to different sequences, so their
difference means nothing (T5 likewise puts no position bias on cross-attention). The keys and
values depend only on the encoder output, so generation computes them once per layer
(:meth:`CrossAttention.project_kv`) and reuses them at every decoding step.

Legend: B batch, S decoder length, L encoder length, D model dim, H heads, G key/value heads,
Dh head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import ModelConfig


def encoder_key_mask(encoder_mask_BL: Tensor | None) -> Tensor | None:
    """``[B, L]`` 1 = real encoder token → boolean ``[B, 1, 1, L]`` (True = may attend), or None."""
    if encoder_mask_BL is None:
        return None
    return encoder_mask_BL.bool()[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head (grouped-query) attention from decoder states to encoder states."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project_kv(self, enc_BLD: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states → keys and values ``[B, G, L, Dh]`` (cacheable for a whole generation)."""
        B, L, _ = enc_BLD.shape
        k = self.k_proj(enc_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(enc_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x_BSD: Tensor, kv: tuple[Tensor, Tensor], mask_B11L: Tensor | None) -> Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = kv
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask_B11L,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
