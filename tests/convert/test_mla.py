"""MLA: cached decoding equals the full pass, and the cache holds only the latent and the RoPE key."""

from __future__ import annotations

import torch

from moelab.config import MLAConfig
from moelab.model.kv_cache import KVCache
from moelab.model.transformer import Transformer

from helpers import tiny_config


def test_cached_decoding_matches_full_pass_and_stores_the_latent() -> None:
    mla = MLAConfig(kv_lora_rank=6, q_lora_rank=None, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=5)
    model = Transformer(tiny_config(mla=mla, n_kv_heads=4)).eval()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.growing(model.cfg.n_layers)
        steps = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 10):
            past = torch.ones(2, t, dtype=torch.long)
            steps.append(model(ids[:, t : t + 1], cache=cache, past_mask=past).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    layer = cache[0]
    assert layer.k.shape == (2, 1, 10, 6) and layer.v.shape == (
        2,
        1,
        10,
        4,
    )  # latent r and RoPE key dr per token
    # per token and layer: r + dr = 10 numbers, against 2 · G · Dh = 2 · 4 · 8 = 64 for the same model with MHA
    assert layer.k[0, 0, 0].numel() + layer.v[0, 0, 0].numel() == 10


def test_q_lora_bottleneck_changes_the_parameters() -> None:
    mla = MLAConfig(kv_lora_rank=6, q_lora_rank=5, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=5)
    model = Transformer(tiny_config(mla=mla))
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.attn.q_a_proj.weight" in names and "blocks.0.attn.q_proj.weight" not in names
    assert model.blocks[0].attn.q_b_proj.weight.shape == (4 * 8, 5)
