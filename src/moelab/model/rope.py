"""Rotary position embeddings (RoPE), shared by grouped-query and latent attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in the rotate-half convention (Llama/transformers layout).

    cos/sin are computed on the fly for the positions asked for, so any position works and
    nothing in the state dict depends on ``max_seq_len``.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``model.to(bf16)`` / ``.half()`` would round the frequencies to 8 bits (a cos off by 0.43 at
        position 1000): whatever a cast does to the module, ``inv_freq`` comes back fp32 and exact."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def reset_buffers(self) -> None:
        """Recompute ``inv_freq`` (fp32, on its device): checkpoints do not store it, so a model built
        on the meta device and then allocated gets it from here (``moelab.model.materialize``)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, positions_BS: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, S]`` positions → cos, sin ``[B, 1, S, Dh]`` (fp32)."""
        angles = positions_BS.float().unsqueeze(-1) * self.inv_freq  # [B, S, Dh/2]
        emb = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


def apply_rope(x_BHSDh: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x_BHSDh.shape[-1] // 2
    rotated = torch.cat([-x_BHSDh[..., half:], x_BHSDh[..., :half]], dim=-1)
    return (x_BHSDh.float() * cos + rotated.float() * sin).to(x_BHSDh.dtype)


__all__ = ["RotaryEmbedding", "apply_rope"]
