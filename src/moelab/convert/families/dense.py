"""Dense Llama-shaped families: Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norm)."""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.convert import tables as T
from moelab.convert.families.base import (
    HF,
    Family,
    expect,
    llama_config_out,
    llama_fields,
    register,
)


def _llama_in(hf: HF) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **llama_fields(hf), qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False))
    )


def _llama_out(cfg: ModelConfig) -> HF:
    expect(
        cfg,
        "llama",
        {"model.moe": (cfg.moe, None), "model.mla": (cfg.mla, None), "model.qk_norm": (cfg.qk_norm, "none")},
    )
    expect(
        cfg,
        "llama",
        {
            "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
            "model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ()),
        },
    )
    return {
        **llama_config_out(cfg, "llama", "LlamaForCausalLM"),
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
    }


def _qwen2_in(hf: HF) -> ModelConfig:
    return ModelConfig(**llama_fields(hf), qkv_bias=True)


def _qwen2_out(cfg: ModelConfig) -> HF:
    checks = {
        "model.moe": (cfg.moe, None),
        "model.mla": (cfg.mla, None),
        "model.qk_norm": (cfg.qk_norm, "none"),
    }
    checks |= {"model.qkv_bias": (cfg.qkv_bias, True), "model.out_bias": (cfg.out_bias, False)}
    checks |= {"model.mlp_bias": (cfg.mlp_bias, False), "model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ())}
    expect(cfg, "qwen2", checks)
    return {**llama_config_out(cfg, "qwen2", "Qwen2ForCausalLM"), "use_sliding_window": False}


def _qwen3_in(hf: HF) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**llama_fields(hf), qkv_bias=bias, out_bias=bias, qk_norm="head")


def _qwen3_out(cfg: ModelConfig) -> HF:
    checks = {
        "model.moe": (cfg.moe, None),
        "model.mla": (cfg.mla, None),
        "model.qk_norm": (cfg.qk_norm, "head"),
    }
    checks |= {"model.out_bias": (cfg.out_bias, cfg.qkv_bias), "model.mlp_bias": (cfg.mlp_bias, False)}
    expect(cfg, "qwen3", checks | {"model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ())})
    return {
        **llama_config_out(cfg, "qwen3", "Qwen3ForCausalLM"),
        "attention_bias": cfg.qkv_bias,
        "use_sliding_window": False,
    }


register(Family("llama", "LlamaForCausalLM", lambda hf: T.LLAMA, _llama_in, _llama_out))
register(Family("qwen2", "Qwen2ForCausalLM", lambda hf: T.LLAMA, _qwen2_in, _qwen2_out))
register(Family("qwen3", "Qwen3ForCausalLM", lambda hf: T.LLAMA, _qwen3_in, _qwen3_out))
