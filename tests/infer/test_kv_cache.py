"""Cached incremental decoding equals the full forward pass (GQA and MLA, dynamic and static
caches), and an MLA layer's cache holds the latent and the RoPE key, preallocated when static."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError
from moelab.model.kv_cache import (
    cache_for_config,
)
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_mla, tiny_moe

ARCHS = {
    "gqa": {},
    "gqa-moe": {"moe": tiny_moe()},
    "mla": {"mla": tiny_mla()},
    "mla-qlora-moe": {"mla": tiny_mla(q_lora_rank=10), "moe": tiny_moe()},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_decode_equals_full_forward(arch: str, kind: str) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config(**ARCHS[arch])).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = cache_for_config(kind, model.cfg, 2, 12)
        step = model(ids[:, :5], cache=cache).logits
        outs = [step]
        for t in range(5, 12):
            past = torch.ones(2, t, dtype=torch.long)
            outs.append(model(ids[:, t : t + 1], cache=cache, past_mask=past).logits)
    assert cache.length == 12
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_mla_cache_holds_the_latent_and_rope_key_not_expanded_keys(kind: str) -> None:
    """The cached entries are ``RMSNorm(x·W_DKV)`` and ``RoPE(x·W_KR)`` of each layer's input,
    recomputed here from the hidden states; a static cache writes them into its preallocated
    buffers (same storage before and after decoding)."""
    torch.manual_seed(0)
    mla = tiny_mla()
    model = Transformer(tiny_config(mla=mla)).eval()
    B, n, M = 2, 7, 10
    ids = torch.randint(0, 97, (B, n))
    cache = cache_for_config(kind, model.cfg, B, M)
    assert all(c.is_static == (kind == "static") for c in cache)
    if kind == "static":
        assert cache[0].k.shape == (B, 1, M, mla.kv_lora_rank) and cache[0].v.shape == (B, 1, M, mla.qk_rope_head_dim)
        ptrs = [(c.k.data_ptr(), c.v.data_ptr()) for c in cache]
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for t in range(4, n):
            model(ids[:, t : t + 1], cache=cache, past_mask=torch.ones(B, t, dtype=torch.long))
        full_inputs: dict[int, torch.Tensor] = {}  # each attention's input in a full pass
        hooks = [
            blk.attn_norm.register_forward_hook(lambda m, a, out, i=i: full_inputs.__setitem__(i, out))
            for i, blk in enumerate(model.blocks)
        ]
        model(ids)
        for h in hooks:
            h.remove()
        for i, (blk, c) in enumerate(zip(model.blocks, cache)):
            attn = blk.attn
            latent, k_rot = attn.kv_a_proj(full_inputs[i]).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
            cos, sin = model.rope(torch.arange(n).expand(B, n))
            half = mla.qk_rope_head_dim // 2
            k_rot = k_rot.unsqueeze(1)
            k_rope = k_rot * cos + torch.cat([-k_rot[..., half:], k_rot[..., :half]], -1) * sin
            assert c.length == n
            assert c.latent.shape == (B, 1, n, mla.kv_lora_rank)
            assert torch.allclose(c.latent, attn.kv_a_norm(latent).unsqueeze(1), atol=1e-5)
            assert torch.allclose(c.k_rope, k_rope, atol=1e-5)
    if kind == "static":
        assert ptrs == [(c.k.data_ptr(), c.v.data_ptr()) for c in cache]
        assert cache.storage_bytes == cache.nbytes * M // n


def test_gqa_models_get_key_value_caches_and_bad_kinds_are_refused() -> None:
    cfg = tiny_config()
    assert all(not c.is_static for c in cache_for_config("dynamic", cfg, 1, 4))
    static = cache_for_config("static", cfg, 1, 4)
    assert all(c.is_static for c in static)
    assert static[0].k.shape == (1, cfg.n_kv_heads, 4, cfg.head_dim)
    with pytest.raises(ConfigError, match="cache='paged'"):
        cache_for_config("paged", cfg, 1, 4)
    with pytest.raises(ValueError, match="full"):
        static[0].update(torch.zeros(1, cfg.n_kv_heads, 5, cfg.head_dim), torch.zeros(1, cfg.n_kv_heads, 5, cfg.head_dim))
