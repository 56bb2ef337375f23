"""Hugging Face families: config.json ↔ ModelConfig, and which mapping table each uses.

Every family is one :class:`Family` in the ``FAMILIES`` registry (keyed by ``model_type``).
``config_in`` reads a config.json dict and raises :class:`ConfigError` naming any option moelab
cannot reproduce exactly (a RoPE scaling kind, sliding windows, q/k/v clipping…): an import
that would compute something else is refused, never approximated. ``config_out`` writes the
config.json of an export and refuses models the family cannot express, naming the field.
"""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.convert.families import deepseek as _deepseek  # noqa: F401  (registers its families)
from moelab.convert.families import dense as _dense  # noqa: F401
from moelab.convert.families import gpt2 as _gpt2  # noqa: F401
from moelab.convert.families import moe as _moe  # noqa: F401
from moelab.convert.families.base import FAMILIES, Family


def default_family(cfg: ModelConfig) -> str:
    """The family a model exports to when none is named."""
    if cfg.mla is not None:
        return "deepseek_v3"
    if cfg.positions == "learned":
        return "gpt2"
    if cfg.moe is None:
        return {"head": "qwen3"}.get(cfg.qk_norm, "qwen2" if cfg.qkv_bias and not cfg.out_bias else "llama")
    if cfg.moe.shared_gate:
        return "qwen2_moe"
    if cfg.moe.router.name == "sigmoid_bias":
        return "deepseek_v3"
    return {"head": "qwen3_moe", "proj": "olmoe"}.get(cfg.qk_norm, "mixtral")


__all__ = ["FAMILIES", "Family", "default_family"]
