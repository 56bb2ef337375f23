"""DeepSeek-V3: MLA, sigmoid router with correction bias and groups, shared experts, first-k dense."""

from __future__ import annotations

import re

from moelab.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.convert import tables as T
from moelab.convert.families.base import (
    HF,
    Family,
    expect,
    llama_config_out,
    llama_fields,
    need,
    no_moe_extras,
    register,
    unsupported,
)
from moelab.moe.validate import router_option


def _deepseek_in(hf: HF) -> ModelConfig:
    for key, allowed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):  # keys of older configs
        if hf.get(key, allowed) != allowed:
            unsupported(hf, key, hf[key], f"moelab's DeepSeek-V3 router is {allowed!r}")
    base = llama_fields(hf)
    base.update(n_kv_heads=base["n_heads"], attn_head_dim=None)
    mla = MLAConfig(
        kv_lora_rank=need(hf, "kv_lora_rank"),
        q_lora_rank=hf.get("q_lora_rank"),
        qk_nope_head_dim=need(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=need(hf, "qk_rope_head_dim"),
        v_head_dim=need(hf, "v_head_dim"),
    )
    n_shared = hf.get("n_shared_experts") or 0
    first_dense = int(hf.get("first_k_dense_replace", 0) or 0)
    moe = MoEConfig(
        num_experts=hf.get("n_routed_experts") or need(hf, "num_local_experts"),
        top_k=need(hf, "num_experts_per_tok"),
        expert_hidden=need(hf, "moe_intermediate_size"),
        num_shared_experts=n_shared,
        router=RouterConfig(
            name="sigmoid_bias",
            renormalize=bool(hf.get("norm_topk_prob", True)),
            n_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        ),
        aux_loss_coef=0.0,
        placement="first_k_dense" if first_dense else "all",
        first_k_dense=first_dense,
    )
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**base, moe=moe, mla=mla, qkv_bias=bias, out_bias=bias)


def _deepseek_out(cfg: ModelConfig) -> HF:
    if cfg.moe is None or cfg.mla is None:
        raise ConfigError("cannot export as deepseek_v3: it needs model.moe and model.mla")
    m, a = cfg.moe, cfg.mla
    no_moe_extras(cfg, "deepseek_v3", router="sigmoid_bias")
    moe_layers = cfg.moe_layers
    first = moe_layers[0] if moe_layers else cfg.n_layers
    expect(cfg, "deepseek_v3", {"moe layers": (moe_layers, list(range(first, cfg.n_layers)))})
    expect(
        cfg,
        "deepseek_v3",
        {
            "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
            "model.mla.latent_norm_eps": (a.latent_norm_eps, 1e-6),
        },
    )
    if m.num_shared_experts:
        expect(
            cfg,
            "deepseek_v3",
            {
                "moe.shared_hidden": (m.shared_expert_hidden, m.expert_hidden),
                "moe.shared_gate": (m.shared_gate, False),
            },
        )
    out = llama_config_out(cfg, "deepseek_v3", "DeepseekV3ForCausalLM")
    out.update(
        num_key_value_heads=cfg.n_heads,
        head_dim=a.qk_rope_head_dim,
        kv_lora_rank=a.kv_lora_rank,
        q_lora_rank=a.q_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        rope_interleave=True,
        n_routed_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        moe_intermediate_size=m.expert_hidden,
        n_shared_experts=m.num_shared_experts,
        n_group=router_option(m, "n_group"),
        topk_group=router_option(m, "topk_group"),
        routed_scaling_factor=router_option(m, "routed_scaling_factor"),
        norm_topk_prob=router_option(m, "renormalize"),
        first_k_dense_replace=first,
        attention_bias=cfg.qkv_bias,
        num_nextn_predict_layers=0,
    )
    return out


def _deepseek_ignore(name: str, cfg: ModelConfig) -> bool:
    """Multi-token-prediction layers (index >= num_hidden_layers) are not part of the causal LM."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(match) and int(match.group(1)) >= cfg.n_layers


register(
    Family(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        lambda hf: T.deepseek_v3(bool(hf.get("rope_interleave", True))),
        _deepseek_in,
        _deepseek_out,
        _deepseek_ignore,
    )
)
