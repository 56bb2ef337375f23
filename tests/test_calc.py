"""`moelab calc`: counts against transformers' real modules and the published numbers; FLOPs
against torch's FLOP counter; KV bytes against a real cache."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moelab.calc import (
    PRESETS,
    PUBLISHED,
    arch_from_config,
    count,
    decode_tokens_per_s,
    flops_per_token,
    hybrid_tokens_per_s,
    kv_bytes_per_token,
    memory,
    resolve,
)
from moelab.cli import main
from moelab.infer.kv_cache import DynamicKVCache
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params

from helpers import tiny_config, tiny_moe


def _hf_configs():
    tf = pytest.importorskip("transformers")
    return {
        "mixtral-8x7b": tf.MixtralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        ),
        "qwen3-235b-a22b": tf.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
            num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, tie_word_embeddings=False, mlp_only_layers=[], decoder_sparse_step=1,
        ),
        "deepseek-v3": tf.DeepseekV3Config(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
            n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536,
            kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8,
            topk_group=4, tie_word_embeddings=False,
        ),
        "olmoe-1b-7b": tf.OlmoeConfig(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
            tie_word_embeddings=False,
        ),
        "llama-3-70b": tf.LlamaConfig(
            vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
        ),
    }


@pytest.fixture(scope="module")
def hf_counts() -> dict[str, tuple[int, int]]:
    """(total, active) of transformers' own modules for each preset, built on the meta device.

    Active = total minus the routed experts' share a token does not use: every parameter under
    an ``experts`` module (not ``shared_experts``) counts k/E of itself.
    """
    from transformers import AutoModelForCausalLM

    out = {}
    for name, hf_cfg in _hf_configs().items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
        E = getattr(hf_cfg, "num_local_experts", None) or getattr(hf_cfg, "num_experts", None)
        E = E or getattr(hf_cfg, "n_routed_experts", None)
        k = getattr(hf_cfg, "num_experts_per_tok", None)
        total = active = 0
        tensors = list(model.named_parameters()) + [
            (n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")
        ]
        for n, p in tensors:
            total += p.numel()
            routed = ".experts." in n and "shared" not in n
            active += p.numel() * k // E if routed else p.numel()
        out[name] = (total, active)
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_equal_transformers_modules(name: str, hf_counts) -> None:
    p = count(PRESETS[name])
    assert (p.total, p.active) == hf_counts[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_match_published_numbers(name: str) -> None:
    p, pub = count(PRESETS[name]), PUBLISHED[name]
    active = getattr(p, pub.active_field)
    assert abs(p.total - pub.total) <= 0.01 * pub.total
    assert pub.matches(active, pub.active)


def test_published_match_rule_rejects_wrong_counts() -> None:
    pub = PUBLISHED["olmoe-1b-7b"]
    assert pub.matches(1.282e9, 1.3e9)  # rounds to the published 1.3B
    assert not pub.matches(1.24e9, 1.3e9) and not pub.matches(1.36e9, 1.3e9)
    assert not pub.matches(6.6e9, 6.9e9)


@pytest.mark.parametrize("moe", [None, tiny_moe(), tiny_moe(num_shared_experts=1, placement="every_n")])
@pytest.mark.parametrize("tie", [True, False])
def test_counts_from_config_equal_count_params(moe, tie: bool) -> None:
    cfg = tiny_config(moe=moe, tie_embeddings=tie)
    ours = count(arch_from_config(cfg))
    theirs = count_params(Transformer(cfg))
    assert ours.total == theirs.total_with_embedding
    assert ours.active == theirs.active + theirs.embedding


@pytest.mark.parametrize("moe", [None, tiny_moe()])
def test_forward_flops_equal_torch_flop_counter(moe) -> None:
    cfg = tiny_config(moe=moe)
    model = Transformer(cfg).eval()
    S = 16
    ids = torch.randint(0, cfg.vocab_size, (1, S))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    per_token = counter.get_total_flops() / S
    ours = flops_per_token(arch_from_config(cfg), context=S)
    # torch's counter sees the matmuls (SDPA's CPU kernel is not counted): all but attention
    assert per_token == ours["forward"] - ours["forward_attention"]
    # attention written out: QKᵀ and AV, 2·Dh FLOPs per (head, key) each, every layer
    assert ours["forward_attention"] == cfg.n_layers * cfg.n_heads * (2 * cfg.head_dim + 2 * cfg.head_dim) * S
    assert ours["training"] == 3 * ours["forward"]


def test_kv_bytes_equal_a_real_cache() -> None:
    cfg = tiny_config(moe=tiny_moe())
    model = Transformer(cfg).eval()
    cache = DynamicKVCache(cfg.n_layers)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 10)), cache=cache)
    real = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in cache)
    assert real / 10 == kv_bytes_per_token(arch_from_config(cfg), "fp32")


def test_mla_kv_cache_is_the_latent() -> None:
    a = PRESETS["deepseek-v3"]
    assert kv_bytes_per_token(a, "bf16") == 61 * (512 + 64) * 2


def test_memory_and_speed_relations() -> None:
    a = PRESETS["mixtral-8x7b"]
    p = count(a)
    mem = memory(a, "bf16")
    assert mem["weights_bf16"] == 2 * p.total and mem["weights_int4"] == p.total / 2
    assert mem["training_total"] == (2 + 2 + 8 + 4) * p.total
    # hybrid with equal bandwidths is the single-device estimate; slower CPU makes it slower
    assert hybrid_tokens_per_s(a, 100, 100, context=1000) == pytest.approx(decode_tokens_per_s(a, 100, context=1000))
    assert hybrid_tokens_per_s(a, 3000, 100) < decode_tokens_per_s(a, 3000)
    # a longer context reads more KV bytes per token
    assert decode_tokens_per_s(a, 1000, context=32000) < decode_tokens_per_s(a, 1000, context=0)
    assert p.dense_equivalent == pytest.approx((p.active * p.total) ** 0.5)


def test_resolve_and_errors(tmp_path) -> None:
    from moelab.config import ConfigError, save_config

    assert resolve("Mixtral-8x7B") is PRESETS["mixtral-8x7b"]
    assert resolve("smoke").moe_layers == 2
    path = tmp_path / "m.yaml"
    save_config(tiny_config(), path)
    assert resolve(str(path)).d_model == 32
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        resolve("gpt-9")


def test_calc_command(capsys) -> None:
    assert main(["calc", "qwen3-235b-a22b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total"] == count(PRESETS["qwen3-235b-a22b"]).total
    assert main(["calc", "deepseek-v3", "--dtype", "int4", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "published" in out and "hybrid" in out and "int4" in out
    assert main(["calc", "nope"]) == 2
    assert main(["calc", "smoke", "--set", "moe.num_experts=8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["arch"]["num_experts"] == 8
    assert main(["calc", "mixtral-8x7b", "--set", "moe.top_k=1"]) == 2
