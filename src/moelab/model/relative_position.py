"""T5's bucketed relative position bias (Raffel et al. 2020, §2.1), an alternative to RoPE.

Each head adds a learned scalar to its attention logits that depends only on the bucket of
the relative position ``key_pos - query_pos``. Buckets (Mesh TensorFlow's scheme, which T5 and
Switch Transformers use): for bidirectional attention half of the buckets are for keys after
the query and half for keys before; for causal attention only the distance to earlier keys
counts (later ones are masked anyway). Within a direction, the first half of the buckets are
exact distances 0, 1, …, n/2-1; the rest cover distances up to ``max_distance`` in
logarithmically growing bins, and everything farther shares the last bucket. One table per
stack is shared by all its layers (T5 computes it in the first layer and reuses it).

Legend: B batch, H heads, S query length, L key length, NB buckets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def relative_position_bucket(
    relative_SL: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """``key_pos - query_pos`` (long) → bucket ids in ``[0, num_buckets)``, same shape."""
    buckets = torch.zeros_like(relative_SL)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_SL > 0).long() * num_buckets  # keys after the query: upper half
        distance = relative_SL.abs()
    else:
        distance = (-relative_SL).clamp_min(0)  # only earlier keys have a distance
    exact = num_buckets // 2
    # log-spaced bins from `exact` to `max_distance`; clamp the log argument so distance 0 is finite
    log_ratio = torch.log(distance.clamp_min(1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp_max(num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """Learned per-head bias ``[NB, H]`` looked up by relative-position bucket."""

    def __init__(
        self, n_heads: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
    ) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, query_pos_S: Tensor, key_pos_L: Tensor) -> Tensor:
        """Absolute positions (cache-aware) → additive bias ``[1, H, S, L]``."""
        relative_SL = key_pos_L[None, :] - query_pos_S[:, None]
        buckets = relative_position_bucket(
            relative_SL, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.bias(buckets).permute(2, 0, 1).unsqueeze(0)


def biased_mask(bias_1HSL: Tensor, allowed_B1SL: Tensor | None) -> Tensor:
    """Bias plus a boolean mask as one additive float mask ``[B, H, S, L]`` (-inf where not allowed)."""
    if allowed_B1SL is None:
        return bias_1HSL
    return bias_1HSL.masked_fill(~allowed_B1SL, float("-inf"))


def identity_rope(batch: int, length: int, head_dim: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos = 1, sin = 0: :func:`~moelab.model.transformer.apply_rope` becomes the identity (no RoPE)."""
    ones = torch.ones(batch, 1, length, head_dim, device=like.device)
    return ones, torch.zeros_like(ones)
