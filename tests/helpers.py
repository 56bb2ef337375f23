"""Shared test helpers: tiny configs small enough for a test to run in milliseconds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moelab.config import ModelConfig, MoEConfig, RouterConfig

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer model (vocab 97, d 32) with the given overrides."""
    moe = overrides.pop("moe", None)
    base = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
    return replace(base, moe=moe, **overrides)


def tiny_moe(**overrides) -> MoEConfig:
    """E=4, k=2, F=24 unless overridden."""
    router = overrides.pop("router", RouterConfig())
    return replace(MoEConfig(num_experts=4, top_k=2, expert_hidden=24), router=router, **overrides)
