"""Cached incremental decoding equals the full forward pass."""

from __future__ import annotations

import pytest
import torch

from moelab.infer.kv_cache import DynamicKVCache
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


@pytest.mark.parametrize("moe", [None, tiny_moe()])
def test_cached_decode_equals_full_forward(moe) -> None:
    model = Transformer(tiny_config(moe=moe)).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicKVCache(model.cfg.n_layers)
        step = model(ids[:, :5], cache=cache).logits
        outs = [step]
        for t in range(5, 12):
            past = torch.ones(2, t, dtype=torch.long)
            outs.append(model(ids[:, t : t + 1], cache=cache, past_mask=past).logits)
    assert cache.length == 12
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)
