"""Shared test helpers: tiny configs small enough for a test to run in milliseconds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moelab.config import MLAConfig, ModelConfig, MoEConfig, RouterConfig

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


def tiny_mla(**overrides) -> MLAConfig:
    """Multi-head latent attention for ``tiny_config`` (r 12, dr 4; no query bottleneck unless
    ``q_lora_rank`` is given): 16 cached numbers per token and layer against 2·G·Dh = 32 for GQA."""
    base = MLAConfig(kv_lora_rank=12, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    return replace(base, **overrides)


class CharTestTokenizer:
    """A tokenizer for models of ``tiny_config`` (vocab 97): ids 0-89 are the characters
    chr(32)..chr(121), then PAD 94, EOS 95, BOS 96. Other characters encode as '?'."""

    vocab_size = 97
    pad_id, eos_id, bos_id = 94, 95, 96

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 if 32 <= ord(c) < 122 else ord("?") - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + i) for i in ids if 0 <= i < 90)


def study_cli(*args: str, cwd: Path):
    """``python -m moelab study ARGS`` in a subprocess on one thread, with this checkout's ``src`` first."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moelab", "study", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def all_finite(x) -> bool:
    """Every float in a nested JSON-like structure of dicts and lists is finite."""
    import math

    if isinstance(x, dict):
        return all(all_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(all_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)
