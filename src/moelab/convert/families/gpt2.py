"""GPT-2: learned positions, LayerNorm, tanh GELU, biases everywhere, Conv1D weights."""

from __future__ import annotations

from moelab.config import ModelConfig
from moelab.convert import tables as T
from moelab.convert.families.base import (
    HF,
    Family,
    expect,
    need,
    register,
    unsupported,
)


def _gpt2_in(hf: HF) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
    if approx is None:
        unsupported(hf, "activation_function", act, "expected gelu_new, gelu_pytorch_tanh or gelu")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        unsupported(
            hf, "scale_attn_by_inverse_layer_idx", True, "per-layer attention scaling is not implemented"
        )
    if hf.get("scale_attn_weights", True) is not True:
        unsupported(
            hf,
            "scale_attn_weights",
            hf["scale_attn_weights"],
            "attention is always scaled by 1/sqrt(head_dim)",
        )
    d = need(hf, "n_embd")
    return ModelConfig(
        vocab_size=need(hf, "vocab_size"),
        d_model=d,
        n_layers=need(hf, "n_layer"),
        n_heads=need(hf, "n_head"),
        ffn_hidden=hf.get("n_inner") or 4 * d,
        activation="gelu",
        gelu_approx=approx,
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions="learned",
        max_seq_len=need(hf, "n_positions"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    )


def _gpt2_out(cfg: ModelConfig) -> HF:
    checks = {
        "model.moe": (cfg.moe, None),
        "model.mla": (cfg.mla, None),
        "model.positions": (cfg.positions, "learned"),
    }
    checks |= {"model.norm": (cfg.norm, "layernorm"), "model.activation": (cfg.activation, "gelu")}
    checks |= {
        "model.n_kv_heads": (cfg.n_kv_heads, cfg.n_heads),
        "model.attn_head_dim": (cfg.attn_head_dim, None),
    }
    checks |= {
        "model.qkv_bias": (cfg.qkv_bias, True),
        "model.out_bias": (cfg.out_bias, True),
        "model.mlp_bias": (cfg.mlp_bias, True),
    }
    checks |= {"model.qk_norm": (cfg.qk_norm, "none"), "model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ())}
    expect(cfg, "gpt2", checks)
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.ffn_hidden,
        n_positions=cfg.max_seq_len,
        activation_function="gelu_new" if cfg.gelu_approx == "tanh" else "gelu",
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        dtype="float32",
    )


register(
    Family(
        "gpt2",
        "GPT2LMHeadModel",
        lambda hf: T.GPT2,
        _gpt2_in,
        _gpt2_out,
        lambda name, cfg: name.endswith(T.GPT2.ignore),
        base_prefix="transformer.",
    )
)
