"""Key/value caches for incremental decoding, for GQA and MLA layers.

Every layer cache holds two streams and has ``update(a, b) -> (all a, all b)``; which streams
depends on the attention:

- GQA (:class:`moelab.model.transformer.Attention`): keys and values ``[B, G, L, Dh]`` after RoPE
  (``k`` and ``v``).
- MLA (:class:`moelab.model.mla.MLAAttention`): the normalised KV latent ``[B, 1, L, r]`` and
  the decoupled RoPE key ``[B, 1, L, dr]`` (``latent`` and ``k_rope``, stored in ``k`` / ``v``);
  per-head keys and values are re-expanded from the latent inside attention, never cached.
  That is the memory saving: ``r + dr`` numbers per token and layer instead of ``2·G·Dh``.

:class:`DynamicKVCache` grows by concatenation: simple and exact, the reference for the
preallocated :class:`StaticKVCache`. :func:`make_cache` picks the right layer caches for a model.
``nbytes`` is what a cache holds for its filled positions; ``storage_bytes`` what it has allocated.

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


class DynamicLayerCache:
    """One layer's two streams (GQA: keys and values ``[B, G, L, Dh]``), appended to on every call."""

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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    @property
    def storage_bytes(self) -> int:
        return _storage_bytes(self.k, self.v)


class DynamicLatentCache(DynamicLayerCache):
    """One MLA layer's cache: the KV latent ``[B, 1, L, r]`` and the RoPE key ``[B, 1, L, dr]``.

    Same concatenation as :class:`DynamicLayerCache`; only what the two streams hold differs.
    """

    @property
    def latent(self) -> Tensor | None:
        return self.k

    @property
    def k_rope(self) -> Tensor | None:
        return self.v


class DynamicKVCache(list):
    """A list of dynamic layer caches, one per layer, passed as ``model(..., cache=...)``.

    ``latent=True`` gives MLA layer caches (:class:`DynamicLatentCache`).
    """

    def __init__(self, n_layers: int, latent: bool = False) -> None:
        layer = DynamicLatentCache if latent else DynamicLayerCache
        super().__init__(layer() for _ in range(n_layers))

    @property
    def length(self) -> int:
        return self[0].length if self else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)

    @property
    def storage_bytes(self) -> int:
        return sum(c.storage_bytes for c in self)


class StaticLayerCache:
    """One layer's two streams in buffers preallocated for ``max_len`` positions (GQA: keys and
    values ``[B, G, M, Dh]``).

    Why: concatenation copies the whole cache every step (quadratic bytes over a generation);
    writing into a preallocated buffer copies only the new entries. Returns views of the filled part.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self._allocate(shape, shape, dtype, device)

    def _allocate(self, k_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        self.k = torch.zeros(k_shape, dtype=dtype, device=device)
        self.v = torch.zeros(v_shape, dtype=dtype, device=device)
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

    @property
    def nbytes(self) -> int:
        return sum(t[:, :, : self.length].numel() * t.element_size() for t in (self.k, self.v))

    @property
    def storage_bytes(self) -> int:
        return _storage_bytes(self.k, self.v)


class StaticLatentCache(StaticLayerCache):
    """One MLA layer's preallocated cache: latent ``[B, 1, M, r]`` and RoPE key ``[B, 1, M, dr]``."""

    def __init__(self, batch: int, max_len: int, rank: int, rope_dim: int, dtype: torch.dtype, device) -> None:
        self._allocate((batch, 1, max_len, rank), (batch, 1, max_len, rope_dim), dtype, device)

    @property
    def latent(self) -> Tensor:
        return self.k[:, :, : self.length]

    @property
    def k_rope(self) -> Tensor:
        return self.v[:, :, : self.length]


class StaticKVCache(list):
    """Preallocated layer caches for ``batch`` sequences of ``max_len`` positions: GQA
    (``n_kv_heads`` × ``head_dim``), or MLA latents when ``mla`` is given (then ``n_kv_heads``
    and ``head_dim`` are unused)."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        mla: MLAConfig | None = None,
    ) -> None:
        if mla is None:
            layers = (StaticLayerCache(batch, n_kv_heads, max_len, head_dim, dtype, device) for _ in range(n_layers))
        else:
            layers = (
                StaticLatentCache(batch, max_len, mla.kv_lora_rank, mla.qk_rope_head_dim, dtype, device)
                for _ in range(n_layers)
            )
        super().__init__(layers)

    @property
    def length(self) -> int:
        return self[0].length if self else 0

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
    """A cache by name for a model of config ``cfg``: GQA layer caches, or latent caches for MLA."""
    if kind == "dynamic":
        return DynamicKVCache(cfg.n_layers, latent=cfg.mla is not None)
    if kind == "static":
        return StaticKVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device, mla=cfg.mla)
    raise ConfigError(f"cache={kind!r} is invalid: expected one of {', '.join(map(repr, CACHE_KINDS))}")


def make_cache(kind: str, model, batch: int, max_len: int) -> list:
    """A cache for ``model`` by name: ``dynamic`` (concatenating) or ``static`` (preallocated),
    in the model's parameter dtype and device."""
    p = next(model.parameters())
    return cache_for_config(kind, model.cfg, batch, max_len, p.dtype, p.device)
