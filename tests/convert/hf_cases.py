"""Tiny random Hugging Face models of every supported family, built in code (no downloads)."""

from __future__ import annotations

import torch

V = 61  # odd vocabulary


def hf_config(family: str):
    import transformers as tf

    common = dict(
        vocab_size=V, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20
    )
    cfgs = {
        "llama": lambda: tf.LlamaConfig(
            **common, num_key_value_heads=2, head_dim=8, attention_bias=True, mlp_bias=True
        ),
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: tf.Qwen3Config(
            **common, num_key_value_heads=2, head_dim=10, tie_word_embeddings=True
        ),
        "mixtral": lambda: tf.MixtralConfig(
            **common, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2
        ),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **{**common, "num_hidden_layers": 3},
            num_key_value_heads=2,
            num_experts=5,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=14,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **common,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=12,
            norm_topk_prob=True,
        ),
        "olmoe": lambda: tf.OlmoeConfig(
            **common, num_key_value_heads=2, num_experts=5, num_experts_per_tok=2
        ),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**common, "num_hidden_layers": 3},
            num_key_value_heads=4,
            n_routed_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            n_shared_experts=1,
            n_group=3,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=10,
            kv_lora_rank=8,
            qk_nope_head_dim=6,
            qk_rope_head_dim=4,
            v_head_dim=6,
            routed_scaling_factor=1.5,
        ),
        "deepseek_v3_noqlora": lambda: tf.DeepseekV3Config(
            **common,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            n_shared_experts=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=None,
            kv_lora_rank=8,
            qk_nope_head_dim=6,
            qk_rope_head_dim=4,
            v_head_dim=5,
            attention_bias=True,
        ),
        "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=24, n_layer=2, n_head=4, n_positions=48),
    }
    cfg = cfgs[family]()
    cfg._attn_implementation = "eager"
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, 0)
    return cfg


FAMILY_CASES = [
    "llama",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "deepseek_v3_noqlora",
    "gpt2",
]


def tiny_hf_model(family: str, seed: int = 0):
    """A transformers model with every float tensor (norms, biases, router bias too) perturbed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family)).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if (
                t.is_floating_point()
                and "inv_freq" not in name
                and not name.endswith(("attn.bias", "masked_bias"))
            ):
                t.add_(torch.randn_like(t) * 0.1)
    return model


def greedy(step, ids: torch.Tensor, n: int = 20) -> list[int]:
    """Greedy decoding with a full forward per token; ``step(ids) -> logits``."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = step(ids)[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt], dim=1)
    return out


SEQ2SEQ_CASES = ["t5", "switch_transformers"]


def tiny_seq2seq(kind: str, seed: int = 0):
    """A tiny T5 (gated GELU, v1.1 shape) or Switch Transformers (untied head) model, every float perturbed."""
    import transformers as tf

    common = dict(vocab_size=V, d_model=24, d_kv=6, d_ff=20, num_layers=2, num_decoder_layers=2, num_heads=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                  decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    if kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(**common, feed_forward_proj="gated-gelu"))
    else:
        cfg = tf.SwitchTransformersConfig(**common, num_experts=3, expert_capacity=64, encoder_sparse_step=1,
                                          decoder_sparse_step=2, tie_word_embeddings=False)  # fmt: skip
        model = tf.SwitchTransformersForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if kind != "t5":  # moelab's stacks share one embedding: transformers 5 keeps three when untied
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model.eval()
