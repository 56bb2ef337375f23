"""Hugging Face families: config.json ↔ ModelConfig, and which mapping table each uses.

Every family is one :class:`Family` in the ``FAMILIES`` registry (keyed by ``model_type``).
``config_in`` reads a config.json dict and raises :class:`ConfigError` naming any option moelab
cannot reproduce exactly (a RoPE scaling kind, sliding windows, q/k/v clipping…): an import
that would compute something else is refused, never approximated. ``config_out`` writes the
config.json of an export and refuses models the family cannot express, naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moelab.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.convert import tables as T
from moelab.convert.rules import Tables
from moelab.registry import Registry

HF = dict[str, Any]


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    tables: Callable[[HF], Tables]  # the table for this config.json (layout flags such as rope_interleave)
    config_in: Callable[[HF], ModelConfig]
    config_out: Callable[[ModelConfig], HF]
    ignore: Callable[[str, ModelConfig], bool] = lambda name, cfg: False
    base_prefix: str = "model."  # prefix of the base model's tensors (absent in base-model-only checkpoints)


FAMILIES: Registry[Family] = Registry("Hugging Face model_type")


def _need(hf: HF, key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"config.json of model_type={hf.get('model_type')!r} has no {key!r}")
    return hf[key]


def _unsupported(hf: HF, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{hf.get('model_type')}: {key}={value!r} is not supported: {why}")


def _rope_theta(hf: HF) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        _unsupported(hf, "rope_parameters.rope_type", kind, "moelab implements plain RoPE ('default') only")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _base(hf: HF, act_key: str = "hidden_act") -> dict[str, Any]:
    """ModelConfig fields every Llama-shaped family shares."""
    act = hf.get(act_key, "silu")
    if act != "silu":
        _unsupported(hf, act_key, act, "Llama-shaped families are imported with SwiGLU (silu) only")
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True):
        _unsupported(hf, "sliding_window", window, "sliding-window attention is not implemented")
    kinds = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
    if kinds:
        _unsupported(hf, "layer_types", kinds, "only full attention layers are implemented")
    if hf.get("quantization_config"):
        _unsupported(
            hf, "quantization_config", hf["quantization_config"].get("quant_method", "?"), "dequantize first"
        )
    d, heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    return dict(
        vocab_size=_need(hf, "vocab_size"),
        d_model=d,
        n_layers=_need(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        attn_head_dim=head_dim if head_dim and head_dim * heads != d else None,
        ffn_hidden=_need(hf, "intermediate_size"),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _expect(cfg: ModelConfig, family: str, checks: dict[str, tuple[Any, Any]]) -> None:
    """``checks``: field path → (actual value, allowed value); a mismatch names the field."""
    for path, (value, allowed) in checks.items():
        if value != allowed:
            raise ConfigError(
                f"cannot export as {family}: {path}={value!r} (the {family} format needs {allowed!r})"
            )


def _base_out(cfg: ModelConfig, family: str, architecture: str) -> HF:
    _expect(
        cfg,
        family,
        {
            "model.activation": (cfg.activation, "swiglu"),
            "model.norm": (cfg.norm, "rmsnorm"),
            "model.positions": (cfg.positions, "rope"),
            "model.attention": (cfg.attention, "causal"),
        },
    )
    return dict(
        architectures=[architecture],
        model_type=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.ffn_hidden,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0,
        dtype="float32",
    )


def _no_moe_extras(cfg: ModelConfig, family: str, router: str = "topk") -> None:
    assert cfg.moe is not None
    m = cfg.moe
    _expect(
        cfg,
        family,
        {
            "moe.router.name": (m.router.name, router),
            "moe.capacity_factor": (m.capacity_factor, None),
            "model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ()),
        },
    )


def _moe_layers_out(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]


def _placement_in(n_layers: int, moe_layers: list[int]) -> dict[str, Any]:
    if len(moe_layers) == n_layers:
        return dict(placement="all")
    if not moe_layers:
        raise ConfigError(
            "the config makes no layer sparse (mlp_only_layers / decoder_sparse_step): import it as dense"
        )
    return dict(placement="explicit", layers=tuple(moe_layers))


# --------------------------------------------------------------------------- dense Llama, Qwen2, Qwen3


def _llama_in(hf: HF) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**_base(hf), qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _llama_out(cfg: ModelConfig) -> HF:
    _expect(
        cfg,
        "llama",
        {"model.moe": (cfg.moe, None), "model.mla": (cfg.mla, None), "model.qk_norm": (cfg.qk_norm, "none")},
    )
    _expect(
        cfg,
        "llama",
        {
            "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
            "model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ()),
        },
    )
    return {
        **_base_out(cfg, "llama", "LlamaForCausalLM"),
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
    }


def _qwen2_in(hf: HF) -> ModelConfig:
    return ModelConfig(**_base(hf), qkv_bias=True)


def _qwen2_out(cfg: ModelConfig) -> HF:
    checks = {
        "model.moe": (cfg.moe, None),
        "model.mla": (cfg.mla, None),
        "model.qk_norm": (cfg.qk_norm, "none"),
    }
    checks |= {"model.qkv_bias": (cfg.qkv_bias, True), "model.out_bias": (cfg.out_bias, False)}
    checks |= {"model.mlp_bias": (cfg.mlp_bias, False), "model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ())}
    _expect(cfg, "qwen2", checks)
    return {**_base_out(cfg, "qwen2", "Qwen2ForCausalLM"), "use_sliding_window": False}


def _qwen3_in(hf: HF) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**_base(hf), qkv_bias=bias, out_bias=bias, qk_norm="head")


def _qwen3_out(cfg: ModelConfig) -> HF:
    checks = {
        "model.moe": (cfg.moe, None),
        "model.mla": (cfg.mla, None),
        "model.qk_norm": (cfg.qk_norm, "head"),
    }
    checks |= {"model.out_bias": (cfg.out_bias, cfg.qkv_bias), "model.mlp_bias": (cfg.mlp_bias, False)}
    _expect(cfg, "qwen3", checks | {"model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ())})
    return {
        **_base_out(cfg, "qwen3", "Qwen3ForCausalLM"),
        "attention_bias": cfg.qkv_bias,
        "use_sliding_window": False,
    }


# --------------------------------------------------------------------------- Mixtral, Qwen-MoE, OLMoE


def _mixtral_in(hf: HF) -> ModelConfig:
    base = _base(hf)
    moe = MoEConfig(
        num_experts=_need(hf, "num_local_experts"),
        top_k=_need(hf, "num_experts_per_tok"),
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
    _expect(cfg, "mixtral", {"model.mla": (cfg.mla, None), "model.qk_norm": (cfg.qk_norm, "none")})
    _expect(
        cfg, "mixtral", {"model.qkv_bias": (cfg.qkv_bias, False), "model.out_bias": (cfg.out_bias, False)}
    )
    m = cfg.moe
    _no_moe_extras(cfg, "mixtral")
    _expect(
        cfg,
        "mixtral",
        {"moe.placement": ("all" if len(cfg.moe_layers) == cfg.n_layers else m.placement, "all")},
    )
    _expect(
        cfg,
        "mixtral",
        {
            "moe.num_shared_experts": (m.num_shared_experts, 0),
            "moe.router.renormalize": (m.router.renormalize, True),
        },
    )
    out = _base_out(cfg, "mixtral", "MixtralForCausalLM")
    out.update(
        intermediate_size=m.expert_hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.aux_loss_coef,
        router_jitter_noise=m.router.jitter_eps,
        sliding_window=None,
    )
    return out


def _qwen_moe_in(hf: HF, qk_norm: str) -> ModelConfig:
    base = _base(hf)
    n, step = base["n_layers"], int(hf.get("decoder_sparse_step", 1) or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    layers = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    shared = hf.get("shared_expert_intermediate_size") or 0
    moe = MoEConfig(
        num_experts=hf.get("num_experts") or _need(hf, "num_local_experts"),
        top_k=_need(hf, "num_experts_per_tok"),
        expert_hidden=_need(hf, "moe_intermediate_size"),
        num_shared_experts=1 if shared else 0,
        shared_hidden=shared or None,
        shared_gate=bool(shared),
        router=RouterConfig(name="topk", renormalize=bool(hf.get("norm_topk_prob", False))),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        **_placement_in(n, layers),
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
    _no_moe_extras(cfg, family)
    _expect(
        cfg,
        family,
        {
            "model.mla": (cfg.mla, None),
            "model.qk_norm": (cfg.qk_norm, qk_norm),
            "model.mlp_bias": (cfg.mlp_bias, False),
        },
    )
    if shared:
        _expect(
            cfg,
            family,
            {
                "moe.num_shared_experts": (min(m.num_shared_experts, 1), 1),
                "moe.shared_gate": (m.shared_gate, True),
            },
        )
        _expect(cfg, family, {"model.out_bias": (cfg.out_bias, False)})
    else:
        _expect(
            cfg,
            family,
            {
                "moe.num_shared_experts": (m.num_shared_experts, 0),
                "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
            },
        )
    out = _base_out(cfg, family, architecture)
    out.update(
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        moe_intermediate_size=m.expert_hidden,
        norm_topk_prob=m.router.renormalize,
        router_aux_loss_coef=m.aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=_moe_layers_out(cfg),
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
        _unsupported(hf, "clip_qkv", hf["clip_qkv"], "q/k/v clipping is not implemented")
    base = _base(hf)
    moe = MoEConfig(
        num_experts=_need(hf, "num_experts"),
        top_k=_need(hf, "num_experts_per_tok"),
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
    _no_moe_extras(cfg, "olmoe")
    _expect(
        cfg,
        "olmoe",
        {
            "model.mla": (cfg.mla, None),
            "model.qk_norm": (cfg.qk_norm, "proj"),
            "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
        },
    )
    _expect(
        cfg,
        "olmoe",
        {
            "moe.num_shared_experts": (m.num_shared_experts, 0),
            "moe.placement": ("all" if len(cfg.moe_layers) == cfg.n_layers else m.placement, "all"),
        },
    )
    out = _base_out(cfg, "olmoe", "OlmoeForCausalLM")
    out.update(
        intermediate_size=m.expert_hidden,
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        norm_topk_prob=m.router.renormalize,
        router_aux_loss_coef=m.aux_loss_coef,
        attention_bias=cfg.qkv_bias,
        clip_qkv=None,
    )
    return out


# --------------------------------------------------------------------------- DeepSeek-V3


def _deepseek_in(hf: HF) -> ModelConfig:
    for key, allowed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):  # keys of older configs
        if hf.get(key, allowed) != allowed:
            _unsupported(hf, key, hf[key], f"moelab's DeepSeek-V3 router is {allowed!r}")
    base = _base(hf)
    base.update(n_kv_heads=base["n_heads"], attn_head_dim=None)
    mla = MLAConfig(
        kv_lora_rank=_need(hf, "kv_lora_rank"),
        q_lora_rank=hf.get("q_lora_rank"),
        qk_nope_head_dim=_need(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=_need(hf, "qk_rope_head_dim"),
        v_head_dim=_need(hf, "v_head_dim"),
    )
    n_shared = hf.get("n_shared_experts") or 0
    first_dense = int(hf.get("first_k_dense_replace", 0) or 0)
    moe = MoEConfig(
        num_experts=hf.get("n_routed_experts") or _need(hf, "num_local_experts"),
        top_k=_need(hf, "num_experts_per_tok"),
        expert_hidden=_need(hf, "moe_intermediate_size"),
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
    _no_moe_extras(cfg, "deepseek_v3", router="sigmoid_bias")
    moe_layers = cfg.moe_layers
    first = moe_layers[0] if moe_layers else cfg.n_layers
    _expect(cfg, "deepseek_v3", {"moe layers": (moe_layers, list(range(first, cfg.n_layers)))})
    _expect(
        cfg,
        "deepseek_v3",
        {
            "model.out_bias": (cfg.out_bias, cfg.qkv_bias),
            "model.mla.latent_norm_eps": (a.latent_norm_eps, 1e-6),
        },
    )
    if m.num_shared_experts:
        _expect(
            cfg,
            "deepseek_v3",
            {
                "moe.shared_hidden": (m.shared_expert_hidden, m.expert_hidden),
                "moe.shared_gate": (m.shared_gate, False),
            },
        )
    out = _base_out(cfg, "deepseek_v3", "DeepseekV3ForCausalLM")
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
        n_group=m.router.n_group,
        topk_group=m.router.topk_group,
        routed_scaling_factor=m.router.routed_scaling_factor,
        norm_topk_prob=m.router.renormalize,
        first_k_dense_replace=first,
        attention_bias=cfg.qkv_bias,
        num_nextn_predict_layers=0,
    )
    return out


def _deepseek_ignore(name: str, cfg: ModelConfig) -> bool:
    """Multi-token-prediction layers (index >= num_hidden_layers) are not part of the causal LM."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(match) and int(match.group(1)) >= cfg.n_layers


# --------------------------------------------------------------------------- GPT-2


def _gpt2_in(hf: HF) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
    if approx is None:
        _unsupported(hf, "activation_function", act, "expected gelu_new, gelu_pytorch_tanh or gelu")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        _unsupported(
            hf, "scale_attn_by_inverse_layer_idx", True, "per-layer attention scaling is not implemented"
        )
    if hf.get("scale_attn_weights", True) is not True:
        _unsupported(
            hf,
            "scale_attn_weights",
            hf["scale_attn_weights"],
            "attention is always scaled by 1/sqrt(head_dim)",
        )
    d = _need(hf, "n_embd")
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size"),
        d_model=d,
        n_layers=_need(hf, "n_layer"),
        n_heads=_need(hf, "n_head"),
        ffn_hidden=hf.get("n_inner") or 4 * d,
        activation="gelu",
        gelu_approx=approx,
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions="learned",
        max_seq_len=_need(hf, "n_positions"),
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
    _expect(cfg, "gpt2", checks)
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


def _register(family: Family) -> None:
    FAMILIES.register(family.model_type)(family)


_register(Family("llama", "LlamaForCausalLM", lambda hf: T.LLAMA, _llama_in, _llama_out))
_register(Family("qwen2", "Qwen2ForCausalLM", lambda hf: T.LLAMA, _qwen2_in, _qwen2_out))
_register(Family("qwen3", "Qwen3ForCausalLM", lambda hf: T.LLAMA, _qwen3_in, _qwen3_out))
_register(Family("mixtral", "MixtralForCausalLM", lambda hf: T.MIXTRAL, _mixtral_in, _mixtral_out))
_register(
    Family(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        lambda hf: T.QWEN_MOE,
        lambda hf: _qwen_moe_in(hf, "none"),
        lambda cfg: _qwen_moe_out(cfg, "qwen2_moe", "Qwen2MoeForCausalLM", "none", shared=True),
    )
)
_register(
    Family(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        lambda hf: T.QWEN_MOE,
        lambda hf: _qwen_moe_in(hf, "head"),
        lambda cfg: _qwen_moe_out(cfg, "qwen3_moe", "Qwen3MoeForCausalLM", "head", shared=False),
    )
)
_register(Family("olmoe", "OlmoeForCausalLM", lambda hf: T.QWEN_MOE, _olmoe_in, _olmoe_out))
_register(
    Family(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        lambda hf: T.deepseek_v3(bool(hf.get("rope_interleave", True))),
        _deepseek_in,
        _deepseek_out,
        _deepseek_ignore,
    )
)
_register(
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
