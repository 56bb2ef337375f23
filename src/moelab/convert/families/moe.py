"""Softmax-routed MoE families: Mixtral, Qwen2-MoE (gated shared expert), Qwen3-MoE, OLMoE."""

from __future__ import annotations

from moelab.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from moelab.convert import tables as T
from moelab.convert.families.base import (
    HF,
    Family,
    dense_layers,
    expect,
    llama_config_out,
    llama_fields,
    need,
    no_moe_extras,
    placement_in,
    register,
    unsupported,
)
from moelab.moe.validate import router_option


def _mixtral_in(hf: HF) -> ModelConfig:
    base = llama_fields(hf)
    moe = MoEConfig(
        num_experts=need(hf, "num_local_experts"),
        top_k=need(hf, "num_experts_per_tok"),
        expert_hidden=base["ffn_hidden"],
        router=RouterConfig(
            name="topk", renormalize=True, jitter_eps=float(hf.get("router_jitter_noise") or 0.0)
        ),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
    )
    return ModelConfig(**base, moe=moe)


def _mixtral_out(cfg: ModelConfig) -> HF:
    if cfg.moe is None:
        raise ConfigError("cannot export as mixtral: model.moe is null (export a dense model as llama)")
    expect(cfg, "mixtral", {"model.mla": (cfg.mla, None), "model.qk_norm": (cfg.qk_norm, "none")})
    expect(cfg, "mixtral", {"model.qkv_bias": (cfg.qkv_bias, False), "model.out_bias": (cfg.out_bias, False)})
    m = cfg.moe
    no_moe_extras(cfg, "mixtral")
    expect(
        cfg,
        "mixtral",
        {"moe.placement": ("all" if len(cfg.moe_layers) == cfg.n_layers else m.placement, "all")},
    )
    expect(
        cfg,
        "mixtral",
        {
            "moe.num_shared_experts": (m.num_shared_experts, 0),
            "moe.router.renormalize": (router_option(m, "renormalize"), True),
        },
    )
    out = llama_config_out(cfg, "mixtral", "MixtralForCausalLM")
    out.update(
        intermediate_size=m.expert_hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.aux_loss_coef,
        router_jitter_noise=router_option(m, "jitter_eps"),
        sliding_window=None,
    )
    return out


def _qwen_moe_in(hf: HF, qk_norm: str) -> ModelConfig:
    base = llama_fields(hf)
    n, step = base["n_layers"], int(hf.get("decoder_sparse_step", 1) or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    layers = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    shared = hf.get("shared_expert_intermediate_size") or 0
    moe = MoEConfig(
        num_experts=hf.get("num_experts") or need(hf, "num_local_experts"),
        top_k=need(hf, "num_experts_per_tok"),
        expert_hidden=need(hf, "moe_intermediate_size"),
        num_shared_experts=1 if shared else 0,
        shared_hidden=shared or None,
        shared_gate=bool(shared),
        router=RouterConfig(name="topk", renormalize=bool(hf.get("norm_topk_prob", False))),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        **placement_in(n, layers),
    )
    bias = (
        bool(hf.get("qkv_bias", True))
        if hf["model_type"] == "qwen2_moe"
        else bool(hf.get("attention_bias", False))
    )
    out_bias = False if hf["model_type"] == "qwen2_moe" else bias
    return ModelConfig(**base, moe=moe, qkv_bias=bias, out_bias=out_bias, qk_norm=qk_norm)


def _qwen_moe_out(cfg: ModelConfig, family: str, architecture: str, qk_norm: str, shared: bool) -> HF:
    if cfg.moe is None:
        raise ConfigError(f"cannot export as {family}: model.moe is null")
    m = cfg.moe
    no_moe_extras(cfg, family)
    expect(
        cfg,
        family,
        {
            "model.mla": (cfg.mla, None),
            "model.qk_norm": (cfg.qk_norm, qk_norm),
            "model.mlp_bias": (cfg.mlp_bias, False),
        },
    )
    if shared:
        expect(
            cfg,
            family,
            {
                "moe.num_shared_experts": (min(m.num_shared_experts, 1), 1),
                "moe.shared_gate": (m.shared_gate, True),
            },
        )
        expect(cfg, family, {"model.out_bias": (cfg.out_bias, False)})
    else:
        expect(
            cfg,
            family,
            {
                "moe.num_shared_experts": (m.num_shared_experts, 0),
                "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
            },
        )
    out = llama_config_out(cfg, family, architecture)
    out.update(
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        moe_intermediate_size=m.expert_hidden,
        norm_topk_prob=router_option(m, "renormalize"),
        router_aux_loss_coef=m.aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=dense_layers(cfg),
        use_sliding_window=False,
    )
    if family == "qwen2_moe":
        out.update(
            shared_expert_intermediate_size=m.num_shared_experts * m.shared_expert_hidden,
            qkv_bias=cfg.qkv_bias,
        )
    else:
        out.update(attention_bias=cfg.qkv_bias)
    return out


def _olmoe_in(hf: HF) -> ModelConfig:
    if hf.get("clip_qkv") is not None:
        unsupported(hf, "clip_qkv", hf["clip_qkv"], "q/k/v clipping is not implemented")
    base = llama_fields(hf)
    moe = MoEConfig(
        num_experts=need(hf, "num_experts"),
        top_k=need(hf, "num_experts_per_tok"),
        expert_hidden=base["ffn_hidden"],
        router=RouterConfig(name="topk", renormalize=bool(hf.get("norm_topk_prob", False))),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
    )
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**base, moe=moe, qkv_bias=bias, out_bias=bias, qk_norm="proj")


def _olmoe_out(cfg: ModelConfig) -> HF:
    if cfg.moe is None:
        raise ConfigError("cannot export as olmoe: model.moe is null")
    m = cfg.moe
    no_moe_extras(cfg, "olmoe")
    expect(
        cfg,
        "olmoe",
        {
            "model.mla": (cfg.mla, None),
            "model.qk_norm": (cfg.qk_norm, "proj"),
            "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
        },
    )
    expect(
        cfg,
        "olmoe",
        {
            "moe.num_shared_experts": (m.num_shared_experts, 0),
            "moe.placement": ("all" if len(cfg.moe_layers) == cfg.n_layers else m.placement, "all"),
        },
    )
    out = llama_config_out(cfg, "olmoe", "OlmoeForCausalLM")
    out.update(
        intermediate_size=m.expert_hidden,
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        norm_topk_prob=router_option(m, "renormalize"),
        router_aux_loss_coef=m.aux_loss_coef,
        attention_bias=cfg.qkv_bias,
        clip_qkv=None,
    )
    return out


register(Family("mixtral", "MixtralForCausalLM", lambda hf: T.MIXTRAL, _mixtral_in, _mixtral_out))
register(
    Family(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        lambda hf: T.QWEN_MOE,
        lambda hf: _qwen_moe_in(hf, "none"),
        lambda cfg: _qwen_moe_out(cfg, "qwen2_moe", "Qwen2MoeForCausalLM", "none", shared=True),
    )
)
register(
    Family(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        lambda hf: T.QWEN_MOE,
        lambda hf: _qwen_moe_in(hf, "head"),
        lambda cfg: _qwen_moe_out(cfg, "qwen3_moe", "Qwen3MoeForCausalLM", "head", shared=False),
    )
)
register(Family("olmoe", "OlmoeForCausalLM", lambda hf: T.QWEN_MOE, _olmoe_in, _olmoe_out))
