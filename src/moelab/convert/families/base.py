"""Shared pieces of the family translations: the Family record, the registry, config helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moelab.config import ConfigError, ModelConfig
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


def need(hf: HF, key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"config.json of model_type={hf.get('model_type')!r} has no {key!r}")
    return hf[key]


def unsupported(hf: HF, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{hf.get('model_type')}: {key}={value!r} is not supported: {why}")


def rope_theta(hf: HF) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        unsupported(hf, "rope_parameters.rope_type", kind, "moelab implements plain RoPE ('default') only")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_fields(hf: HF, act_key: str = "hidden_act") -> dict[str, Any]:
    """ModelConfig fields every Llama-shaped family shares."""
    act = hf.get(act_key, "silu")
    if act != "silu":
        unsupported(hf, act_key, act, "Llama-shaped families are imported with SwiGLU (silu) only")
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True):
        unsupported(hf, "sliding_window", window, "sliding-window attention is not implemented")
    kinds = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
    if kinds:
        unsupported(hf, "layer_types", kinds, "only full attention layers are implemented")
    if hf.get("quantization_config"):
        unsupported(
            hf, "quantization_config", hf["quantization_config"].get("quant_method", "?"), "dequantize first"
        )
    d, heads = need(hf, "hidden_size"), need(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    return dict(
        vocab_size=need(hf, "vocab_size"),
        d_model=d,
        n_layers=need(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        attn_head_dim=head_dim if head_dim and head_dim * heads != d else None,
        ffn_hidden=need(hf, "intermediate_size"),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(hf),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def expect(cfg: ModelConfig, family: str, checks: dict[str, tuple[Any, Any]]) -> None:
    """``checks``: field path → (actual value, allowed value); a mismatch names the field."""
    for path, (value, allowed) in checks.items():
        if value != allowed:
            raise ConfigError(
                f"cannot export as {family}: {path}={value!r} (the {family} format needs {allowed!r})"
            )


def llama_config_out(cfg: ModelConfig, family: str, architecture: str) -> HF:
    expect(
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


def no_moe_extras(cfg: ModelConfig, family: str, router: str = "topk") -> None:
    assert cfg.moe is not None
    m = cfg.moe
    expect(
        cfg,
        family,
        {
            "moe.router.name": (m.router.name, router),
            "moe.capacity_factor": (m.capacity_factor, None),
            "model.layer_ffn_hidden": (cfg.layer_ffn_hidden, ()),
        },
    )


def dense_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]


def placement_in(n_layers: int, moe_layers: list[int]) -> dict[str, Any]:
    if len(moe_layers) == n_layers:
        return dict(placement="all")
    if not moe_layers:
        raise ConfigError(
            "the config makes no layer sparse (mlp_only_layers / decoder_sparse_step): import it as dense"
        )
    return dict(placement="explicit", layers=tuple(moe_layers))


def register(family: Family) -> None:
    FAMILIES.register(family.model_type)(family)
