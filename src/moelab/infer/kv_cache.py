"""Key/value caches for incremental decoding.

:class:`DynamicKVCache` grows by concatenation: simple and exact, the reference for faster
(preallocated) caches. Each layer's cache holds keys and values ``[B, G, L, Dh]`` after RoPE.

Legend: B batch, G key/value heads, L cached length, S new tokens, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DynamicLayerCache:
    """One layer's keys and values, appended to on every call."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k_BGSDh: Tensor, v_BGSDh: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None or self.v is None:
            self.k, self.v = k_BGSDh, v_BGSDh
        else:
            self.k = torch.cat([self.k, k_BGSDh], dim=2)
            self.v = torch.cat([self.v, v_BGSDh], dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class DynamicKVCache(list):
    """A list of :class:`DynamicLayerCache`, one per layer, passed as ``model(..., cache=...)``."""

    def __init__(self, n_layers: int) -> None:
        super().__init__(DynamicLayerCache() for _ in range(n_layers))

    @property
    def length(self) -> int:
        return self[0].length if self else 0
