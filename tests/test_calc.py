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
    attention_params,
    count,
    decode_tokens_per_s,
    flops_per_token,
    hybrid_tokens_per_s,
    kv_bytes_per_token,
    memory,
    resolve,
)
from moelab.cli import main
from moelab.model.kv_cache import cache_for_config
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params

from helpers import tiny_config, tiny_mla, tiny_moe


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


@pytest.mark.parametrize("mla", [None, tiny_mla(), tiny_mla(q_lora_rank=10)], ids=["gqa", "mla", "mla-qlora"])
@pytest.mark.parametrize("moe", [None, tiny_moe(), tiny_moe(num_shared_experts=1, placement="every_n")])
@pytest.mark.parametrize("tie", [True, False])
def test_counts_from_config_equal_count_params(moe, tie: bool, mla) -> None:
    cfg = tiny_config(moe=moe, tie_embeddings=tie, mla=mla)
    ours = count(arch_from_config(cfg))
    theirs = count_params(Transformer(cfg))
    assert ours.total == theirs.total_with_embedding
    assert ours.active == theirs.active + theirs.embedding


FAMILY_OPTIONS = {
    # GPT-2: LayerNorm, GELU, biases everywhere, learned positions
    "gpt2-like": dict(
        norm="layernorm", activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned"
    ),
    "qwen2-like": dict(qkv_bias=True),
    "qwen3-like": dict(qk_norm="head"),
    "olmoe-like": dict(qk_norm="proj", moe=tiny_moe()),
    "qwen2-moe-like": dict(qkv_bias=True, moe=tiny_moe(num_shared_experts=1, shared_gate=True)),
}


@pytest.mark.parametrize("options", FAMILY_OPTIONS.values(), ids=FAMILY_OPTIONS.keys())
def test_counts_and_flops_of_imported_family_options(options) -> None:
    """Biases, learned positions, q/k norms and a shared-expert gate are counted like the model's
    own parameters; biases and lookups add no matmul FLOPs."""
    cfg = tiny_config(**options)
    model = Transformer(cfg).eval()
    ours, theirs = count(arch_from_config(cfg)), count_params(model)
    assert ours.total == theirs.total_with_embedding
    assert ours.active == theirs.active + theirs.embedding
    S = 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (1, S)))
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    weight_matmuls = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)  # addmm: a linear with bias
    flops = flops_per_token(arch_from_config(cfg), context=S)
    assert weight_matmuls / S == flops["forward"] - flops["forward_attention"]


@pytest.mark.parametrize("mla", [None, tiny_mla(q_lora_rank=10)], ids=["gqa", "mla"])
@pytest.mark.parametrize("moe", [None, tiny_moe()])
def test_forward_flops_equal_torch_flop_counter(moe, mla) -> None:
    cfg = tiny_config(moe=moe, mla=mla)
    model = Transformer(cfg).eval()
    S = 16
    ids = torch.randint(0, cfg.vocab_size, (1, S))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    ours = flops_per_token(arch_from_config(cfg), context=S)
    # the weight matmuls (aten.mm) are all but attention
    assert by_op.pop("aten.mm") / S == ours["forward"] - ours["forward_attention"]
    # attention: SDPA's fused CPU kernel is not counted (GQA); MLA's q/k and v head dims differ,
    # so SDPA takes its math path, whose QKᵀ and AV matmuls the counter sees over all S×S pairs
    assert sum(by_op.values()) / S == (0 if mla is None else ours["forward_attention"])
    # attention written out: QKᵀ and AV, 2·d_qk and 2·d_v FLOPs per (head, key), every layer
    d_qk, d_v = (cfg.head_dim, cfg.head_dim) if mla is None else (mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim)
    assert ours["forward_attention"] == cfg.n_layers * cfg.n_heads * (2 * d_qk + 2 * d_v) * S
    assert ours["training"] == 3 * ours["forward"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("mla", [None, tiny_mla()], ids=["gqa", "mla"])
def test_kv_bytes_equal_the_bytes_a_real_cache_holds(mla, kind: str, dtype: str) -> None:
    """Prefill 4 tokens, decode 6 more; the memory behind the cache (a static cache sized for
    exactly these 10 positions) is B · 10 · calc's bytes per token, for GQA (K and V per KV head)
    and MLA (latent + RoPE key)."""
    cfg = tiny_config(moe=tiny_moe(), mla=mla)
    model = Transformer(cfg).eval().to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    B, prompt, n_new = 2, 4, 6
    N = prompt + n_new
    ids = torch.randint(0, cfg.vocab_size, (B, N))
    cache = cache_for_config(kind, cfg, B, N, next(model.parameters()).dtype)
    with torch.no_grad():
        model(ids[:, :prompt], cache=cache)
        for t in range(prompt, N):
            model(ids[:, t : t + 1], cache=cache, past_mask=torch.ones(B, t, dtype=torch.long))
    assert cache.length == N
    per_token = kv_bytes_per_token(arch_from_config(cfg), dtype)
    assert cache.storage_bytes == cache.nbytes == B * N * per_token
    if mla is not None:  # the latent and the RoPE key, nothing per head: r + dr numbers per token and layer
        assert per_token == cfg.n_layers * (mla.kv_lora_rank + mla.qk_rope_head_dim) * (4 if dtype == "fp32" else 2)


def test_mla_kv_cache_is_the_latent() -> None:
    a = PRESETS["deepseek-v3"]
    assert kv_bytes_per_token(a, "bf16") == 61 * (512 + 64) * 2


def test_a_moelab_mla_config_maps_onto_the_deepseek_v3_preset() -> None:
    """DeepSeek-V3's attention written as a moelab ModelConfig (not built: 7168 wide) gives the
    preset's attention parameters and KV bytes."""
    from moelab.config import MLAConfig

    mla = MLAConfig(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    cfg = tiny_config(d_model=7168, n_layers=61, n_heads=128, n_kv_heads=128, mla=mla)
    ours, v3 = arch_from_config(cfg), PRESETS["deepseek-v3"]
    assert attention_params(ours) == attention_params(v3)
    assert kv_bytes_per_token(ours) == kv_bytes_per_token(v3)
    assert flops_per_token(ours, 4096)["forward_attention"] == flops_per_token(v3, 4096)["forward_attention"]


def test_published_models_take_arch_overrides_for_variants(capsys) -> None:
    """``moelab calc deepseek-v3 --set attention=gqa --set n_kv_heads=8``: the same model with
    GQA-8 (and MHA: all 128 heads); the docs' KV table is these numbers."""
    kv = {}
    for label, sets in (("mla", []), ("gqa8", ["attention=gqa", "n_kv_heads=8"]), ("mha", ["attention=gqa"])):
        argv = ["calc", "deepseek-v3", "--json"] + [x for s in sets for x in ("--set", s)]
        assert main(argv) == 0
        data = json.loads(capsys.readouterr().out)
        kv[label] = data["kv_cache_bytes_per_token"]
        assert ("published" in data) == (label == "mla")
    assert kv == {"mla": 61 * 576 * 2, "gqa8": 61 * 2 * 8 * 128 * 2, "mha": 61 * 2 * 128 * 128 * 2}
    assert resolve("deepseek-v3", ["attention=gqa"]).name == "deepseek-v3 (attention=gqa)"
    assert main(["calc", "deepseek-v3", "--set", "attention=mha"]) == 2  # Arch validation names the allowed values
    assert "calc.attention" in capsys.readouterr().err
    assert main(["calc", "small", "--set", "mla.kv_lora_rank=64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"]["attention"] == "mla"


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


def test_split_tokens_per_s_by_hand() -> None:
    """A model too big for the GPU: what fits is read at GPU bandwidth, the rest at CPU bandwidth."""
    from moelab.calc import Arch, split_tokens_per_s

    # MoE: attention 4·(1+2)·4 + 4·4 = 64, router 4·4 = 16, norms 3·4 = 12, head 40 (the input
    # embedding, 40, stays in RAM): 132 non-routed bytes read per token at 8 bits; 4 experts of
    # 3·4·2 = 24, top-1. GPU 180 B: the 132 non-routed bytes, then 48 of the 96 expert bytes →
    # f = 0.5. Per token: GPU 132 + 0.5·24 = 144 B at 100 B/s, CPU 12 B at 10 B/s → 1.44 s + 1.2 s.
    moe = Arch("t", 10, 4, 1, 1, 1, 4, 8, num_experts=4, top_k=1, expert_hidden=2, moe_layers=1)
    assert (count(moe).routed_experts, count(moe).routed_active) == (96, 24)
    s = split_tokens_per_s(moe, 100e-9, 10e-9, 180e-9, bits_per_weight=8)
    assert s["expert_fraction_on_gpu"] == pytest.approx(0.5)
    assert (s["gpu_bytes"], s["cpu_bytes"]) == (pytest.approx(144), pytest.approx(12))
    assert s["tokens_per_s"] == pytest.approx(1 / 2.64)
    assert s["gpu_resident_bytes"] == pytest.approx(180)
    assert s["cpu_resident_bytes"] == pytest.approx(count(moe).total - 180)
    # Dense, FFN 3·4·8 = 96: 212 B read per token; KV at context 2 in bf16 = 2·(2·4·2) = 32 B on
    # the GPU, so 144 B of GPU memory leave 112 B of weights: GPU 112 + 32 B, CPU 100 B.
    dense = Arch("d", 10, 4, 1, 1, 1, 4, 8)
    s = split_tokens_per_s(dense, 100e-9, 10e-9, 144e-9, context=2, bits_per_weight=8)
    assert (s["gpu_bytes"], s["cpu_bytes"]) == (pytest.approx(144), pytest.approx(100))
    assert s["tokens_per_s"] == pytest.approx(1 / (1.44 + 10.0))
    assert s["expert_fraction_on_gpu"] == 0.0
    # Limits: all on the GPU is decode_tokens_per_s at GPU bandwidth; exactly the non-routed
    # part on the GPU is hybrid_tokens_per_s; dtype bytes when no bits are given.
    a = PRESETS["mixtral-8x7b"]
    big = split_tokens_per_s(a, 1000, 50, 1e6, "int4", 512)["tokens_per_s"]
    assert big == pytest.approx(decode_tokens_per_s(a, 1000, "int4", 512))
    room = (count(a).non_expert - count(a).embedding) * 2 + kv_bytes_per_token(a) * 512
    assert split_tokens_per_s(a, 1000, 50, room / 1e9, "bf16", 512)["tokens_per_s"] == pytest.approx(
        hybrid_tokens_per_s(a, 1000, 50, "bf16", 512)
    )
