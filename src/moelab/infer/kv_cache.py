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


class StaticLayerCache:
    """One layer's keys and values in buffers preallocated for ``max_len`` positions.

    Why: concatenation copies the whole cache every step (quadratic bytes over a generation);
    writing into a preallocated buffer copies only the new keys. Returns views of the filled part.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k_BGSDh: Tensor, v_BGSDh: Tensor) -> tuple[Tensor, Tensor]:
        S = k_BGSDh.shape[2]
        end = self.length + S
        if end > self.k.shape[2]:
            raise ValueError(f"static KV cache is full: {end} positions needed, {self.k.shape[2]} allocated")
        self.k[:, :, self.length : end] = k_BGSDh
        self.v[:, :, self.length : end] = v_BGSDh
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class StaticKVCache(list):
    """A list of :class:`StaticLayerCache` sized for ``batch`` sequences of ``max_len`` positions."""

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        super().__init__(StaticLayerCache(batch, n_kv_heads, max_len, head_dim, dtype, device) for _ in range(n_layers))

    @property
    def length(self) -> int:
        return self[0].length if self else 0


def make_cache(kind: str, model, batch: int, max_len: int) -> list:
    """A cache for ``model`` by name: ``dynamic`` (concatenating) or ``static`` (preallocated)."""
    cfg = model.cfg
    if kind == "dynamic":
        return DynamicKVCache(cfg.n_layers)
    if kind == "static":
        p = next(model.parameters())
        return StaticKVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, p.dtype, p.device)
    from moelab.config import ConfigError

    raise ConfigError(f"cache={kind!r} is invalid: expected 'dynamic' or 'static'")
