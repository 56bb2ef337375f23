"""Key/value caches for incremental decoding, for GQA and MLA layers.

Every layer cache holds two streams and has ``update(a, b) -> (all a, all b)``; which streams
depends on the attention:

- GQA (:class:`moelab.model.transformer.Attention`): keys and values ``[B, G, L, Dh]`` after RoPE
  (``k`` and ``v``).
- MLA (:class:`moelab.model.mla.MLAAttention`): the normalised KV latent ``[B, 1, L, r]`` and
  the decoupled RoPE key ``[B, 1, L, dr]`` (``latent`` and ``k_rope``, stored in ``k`` / ``v``);
  per-head keys and values are re-expanded from the latent inside attention, never cached.
  That is the memory saving: ``r + dr`` numbers per token and layer instead of ``2·G·Dh``.

One class, :class:`KVCache` of :class:`LayerCache`, in two modes: growing (``dynamic``: by
concatenation, simple and exact, the reference) or static (preallocated). :func:`make_cache`
picks the mode and the streams' shapes for a model. ``nbytes`` is what a cache holds for its
filled positions; ``storage_bytes`` what it has allocated.

Legend: B batch, G key/value heads, L cached length, S new tokens, M preallocated length,
Dh head dim, r MLA latent rank (``kv_lora_rank``), dr MLA RoPE key dim (``qk_rope_head_dim``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.config import ConfigError, MLAConfig, ModelConfig


def _storage_bytes(*tensors: Tensor | None) -> int:
    """Bytes of the memory behind ``tensors`` (a shared buffer counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class LayerCache:
    """One layer's two streams (GQA: keys and values ``[B, G, L, Dh]``; MLA: ``latent`` and ``k_rope``).

    Two modes behind one ``update(a, b) -> (all a, all b)``:

    - growing (:meth:`growing`): appended by concatenation; simple and exact, the reference;
    - static (:meth:`static`): buffers preallocated for ``M`` positions, into which only the new entries
      are written. Why: concatenation copies the whole cache every step (quadratic bytes over a
      generation). ``k``/``v`` are then the whole buffers (the native attention step writes into them
      at ``length``); ``update`` returns views of the filled part.
    """

    def __init__(self, k: Tensor | None = None, v: Tensor | None = None) -> None:
        self.k, self.v = k, v
        self.is_static = k is not None
        self.length = 0

    @classmethod
    def growing(cls) -> LayerCache:
        return cls()

    @classmethod
    def static(cls, k_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: torch.dtype, device) -> LayerCache:
        """Buffers ``k_shape``/``v_shape`` (``[B, G or 1, M, ·]``), zero-filled."""
        return cls(torch.zeros(k_shape, dtype=dtype, device=device), torch.zeros(v_shape, dtype=dtype, device=device))

    def update(self, k_BGSDh: Tensor, v_BGSDh: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k_BGSDh.shape[2]
        if not self.is_static:
            first = self.k is None or self.v is None
            self.k = k_BGSDh if first else torch.cat([self.k, k_BGSDh], dim=2)
            self.v = v_BGSDh if first else torch.cat([self.v, v_BGSDh], dim=2)
            self.length = end
            return self.k, self.v
        assert self.k is not None and self.v is not None
        if end > self.k.shape[2]:
            raise ValueError(f"static KV cache is full: {end} positions needed, {self.k.shape[2]} allocated")
        self.k[:, :, self.length : end] = k_BGSDh
        self.v[:, :, self.length : end] = v_BGSDh
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (speculative decoding drops the keys of rejected draft tokens).
        Static: only the fill mark moves (the stale entries are overwritten by the next ``update``)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if not self.is_static and self.k is not None and self.v is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]
        self.length = length

    @property
    def latent(self) -> Tensor | None:
        """MLA: the cached KV latent ``[B, 1, L, r]`` (the first stream, filled part)."""
        return None if self.k is None else self.k[:, :, : self.length]

    @property
    def k_rope(self) -> Tensor | None:
        """MLA: the cached RoPE key ``[B, 1, L, dr]`` (the second stream, filled part)."""
        return None if self.v is None else self.v[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of the filled positions."""
        return sum(t[:, :, : self.length].numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    @property
    def storage_bytes(self) -> int:
        """Bytes allocated (a static cache's whole buffers)."""
        return _storage_bytes(self.k, self.v)


class KVCache(list):
    """One :class:`LayerCache` per layer, passed as ``model(..., cache=...)``; all growing or all static."""

    @classmethod
    def growing(cls, n_layers: int) -> KVCache:
        return cls(LayerCache.growing() for _ in range(n_layers))

    @classmethod
    def static(
        cls,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        mla: MLAConfig | None = None,
    ) -> KVCache:
        """Preallocated for ``batch`` sequences of ``max_len`` positions: GQA (``n_kv_heads`` × ``head_dim``), or
        MLA latents when ``mla`` is given (then ``n_kv_heads`` and ``head_dim`` are unused)."""
        if mla is None:
            k_shape = v_shape = (batch, n_kv_heads, max_len, head_dim)
        else:
            k_shape, v_shape = (batch, 1, max_len, mla.kv_lora_rank), (batch, 1, max_len, mla.qk_rope_head_dim)
        return cls(LayerCache.static(k_shape, v_shape, dtype, device) for _ in range(n_layers))

    @property
    def length(self) -> int:
        return self[0].length if self else 0

    def truncate(self, length: int) -> None:
        """Keep every layer's first ``length`` positions (:meth:`LayerCache.truncate`)."""
        for c in self:
            c.truncate(length)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)

    @property
    def storage_bytes(self) -> int:
        return sum(c.storage_bytes for c in self)


CACHE_KINDS = ("dynamic", "static")


def cache_for_config(
    kind: str, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32, device="cpu"
) -> list:
    """A cache by name for a model of config ``cfg`` (``dynamic``: growing, ``static``: preallocated): GQA
    keys and values, or MLA latents and RoPE keys."""
    if kind == "dynamic":
        return KVCache.growing(cfg.n_layers)
    if kind == "static":
        return KVCache.static(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device, mla=cfg.mla)
    raise ConfigError(f"cache={kind!r} is invalid: expected one of {', '.join(map(repr, CACHE_KINDS))}")


def make_cache(kind: str, model, batch: int, max_len: int) -> list:
    """A cache for ``model`` by name: ``dynamic`` (concatenating) or ``static`` (preallocated),
    in the model's parameter dtype and device."""
    p = next(model.parameters())
    return cache_for_config(kind, model.cfg, batch, max_len, p.dtype, p.device)
